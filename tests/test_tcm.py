"""Truncated Consistency Models (cmbench.losses.tcm; new-methods.md §2): the loss by hand, the truncated Student-t
σ law against §2.2's measured quantiles and the exact CDF, stage 2 learning an injected stage-1 map on Gaussian data
(§2.6b), and the planned two-run DAG (tcm → its stage-1 ECT run → EDM)."""
import math
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from scipy import special, stats

from cmbench import losses
from cmbench.checks import check_run
from cmbench.config import ConfigError, Experiment, parse_overrides
from cmbench.draws import Draws
from cmbench.losses.tcm import truncated_t_log_sigma
from conftest import REPO

LOW, HIGH, LOC, SCALE, DF = 0.0, math.log(80.0), 0.0, 0.2, 0.01   # ln t′ = ln 1, ln σ_max; TCM's stage-2 law


def toy_cfg(overrides: str = "", dataset: str = "gauss1d"):
    return check_run(Experiment(REPO / "configs").resolve("toy", dataset, "tcm", 0, parse_overrides(overrides.split())))


def tcm_loss(cfg, teacher, **params):
    cls = losses.LOSSES["tcm"]
    return cls(cls.Params.model_validate({**cfg.loss, **params}), cfg, teacher)


def normal_for_sigma(sigma: float) -> float:
    """The standard normal draw that the inverse-CDF sampler maps to σ (test-side inverse of the sampler)."""
    law = stats.t(DF, LOC, SCALE)
    a, b = law.cdf([LOW, HIGH])
    return float(special.ndtri((law.cdf(math.log(sigma)) - a) / (b - a)))


class FixedDraws(Draws):
    """Draws with given values: normals for ln σ, the boundary mask, the noise z."""

    def __init__(self, n, boundary, z):
        super().__init__(torch.Generator(), len(n))
        self.queue, self.boundary = [torch.tensor(n), torch.tensor(z)], torch.tensor(boundary)

    def randn(self, shape, like):
        return self.queue.pop(0).to(like.dtype).reshape(self.batch, *shape)

    def choose(self, k):
        assert k == int(self.boundary.sum())
        return self.boundary


def test_loss_matches_a_hand_computation():
    """B = 4, ρ = 0.25: one boundary sample (σ = t′ = 1). Stage 0, constant mapping: r = σ/2, w = 1/(σ − r) = 2/σ,
    c = 0: d = |f(x0 + σz, σ) − target|. σ = 1 and 1.5 have r < t′ (targets from the frozen stage-1 model), 3 and 10
    have r ≥ t′ (the online model). Per-sample shares: w_b·B/K = 0.4 at the boundary, B/(B − K) = 4/3 elsewhere."""
    cfg = toy_cfg()
    student = lambda x, s, labels=None: x / (1 + s.reshape(-1, 1))                  # f_θ
    frozen = lambda x, s, labels=None: 0.9 * x / (1 + s.reshape(-1, 1)) + 0.1       # f_θ₁

    class Teacher:
        denoise = staticmethod(frozen)

    loss = tcm_loss(cfg, Teacher(), mapping="constant", double_every=1000, huber_c=0.0, resume_step=0)
    sig = [1.0, 1.5, 3.0, 10.0]
    x0, z = [0.5, -0.2, 0.3, 1.0], [1.0, -1.0, 0.5, 2.0]
    draws = FixedDraws([normal_for_sigma(1.7)] + [normal_for_sigma(s) for s in sig[1:]], [True, False, False, False], z)
    got = loss(student, student, torch.tensor(x0).reshape(4, 1), 0, draws)

    expected = []
    for i, (s, x, e) in enumerate(zip(sig, x0, z)):
        r = s / 2
        pred = (x + s * e) / (1 + s)
        tgt = 0.9 * (x + r * e) / (1 + r) + 0.1 if r < 1 else (x + r * e) / (1 + r)
        expected.append(abs(pred - tgt) / (s - r) * (0.1 * 4 / 1 if i == 0 else 4 / 3))
    torch.testing.assert_close(got, torch.tensor(expected), rtol=2e-5, atol=1e-7)
    raw = [e / (0.4 if i == 0 else 4 / 3) for i, e in enumerate(expected)]
    assert got.mean().item() == pytest.approx(np.mean(raw[1:]) + 0.1 * raw[0], rel=1e-5)


def test_boundary_is_exactly_floor_rho_b_and_the_same_on_every_shard():
    """⌊ρ·B⌋ samples sit at σ = t′ (float32: 1 + 1e-8 is 1), the rest above it; two ranks' shards together draw
    the single-rank batch's σ."""
    cfg = toy_cfg()
    loss = tcm_loss(cfg, None, resume_step=0)
    seen = []

    def record(x, s, labels=None):
        seen.append(s.clone())
        return x

    loss.teacher = type("T", (), {"denoise": staticmethod(record)})()
    x0 = torch.zeros(10, 1)
    loss(record, record, x0, 0, Draws(torch.Generator().manual_seed(3), 10))
    sigma = seen[0]
    assert int((sigma == 1.0).sum()) == 2 and bool((sigma > 1.0).sum() == 8)    # ⌊0.25·10⌋ = 2
    shards = []
    for part in (slice(0, 5), slice(5, 10)):
        seen.clear()
        loss(record, record, x0[part], 0, Draws(torch.Generator().manual_seed(3), 10, part))
        shards.append(seen[0])
    torch.testing.assert_close(torch.cat(shards), sigma, rtol=0, atol=0)


def test_student_t_sigma_law_matches_measured_quantiles_and_exact_cdf():
    """new-methods.md §2.2: σ quantiles 1.01 / 1.04 / 1.22 / 2.52 / 10.3 at 10/25/50/75/90 %, 70 % below σ = 2, 2.7 %
    above 40 (measured), and the exact truncated CDF."""
    n = torch.randn(200_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ln_s = truncated_t_log_sigma(n, LOW, HIGH, LOC, SCALE, DF).numpy()
    sigma = np.exp(ln_s)
    assert ln_s.min() >= LOW and ln_s.max() <= HIGH
    np.testing.assert_allclose(np.quantile(sigma, [0.1, 0.25, 0.5, 0.75, 0.9]), [1.01, 1.04, 1.22, 2.52, 10.3],
                               rtol=0.025)
    assert (sigma < 2).mean() == pytest.approx(0.70, abs=0.01) and (sigma > 40).mean() == pytest.approx(0.027, abs=0.002)
    law = stats.t(DF, LOC, SCALE)
    a, b = law.cdf([LOW, HIGH])
    grid = np.log([1.005, 1.1, 1.5, 3.0, 10.0, 50.0])
    np.testing.assert_allclose([(ln_s <= g).mean() for g in grid], (law.cdf(grid) - a) / (b - a), atol=0.004)


@pytest.mark.parametrize("override, match", [
    ("train.batch=3", "boundary samples"),                 # ⌊0.25·3⌋ = 0
    ("teacher.source=analytic teacher.variant=null teacher.init_student=false", "frozen stage-1 CM"),
    ("loss.p_mean=-1.1", "p_mean"),
])
def test_bad_stage_2_configs_fail_with_one_line(override, match):
    with pytest.raises(ConfigError, match=match) as e:
        losses.check(toy_cfg(override))
    assert "\n" not in str(e.value)


def test_stage_2_learns_the_injected_stage_1_map():
    """§2.6b: with the frozen stage-1 map f₁ = a·f* + b (a = 0.9, b = 0.1) of x ~ N(0.3, 0.5²), stage 2 must learn
    a·f* + b on [t′, 80] (f*(Ψ_{σ→t′}(z), t′) = f*(z, σ)), not the exact f*: the boundary's output is transported
    up the ODE. The student is a tiny MLP of ln σ giving f(z, σ) = α(σ) + β(σ)·z (the family the exact maps of
    Gaussian data lie in), trained from scratch through Δ stages 0–5 (100 steps each)."""
    mu, s, a, b = 0.3, 0.5, 0.9, 0.1
    f_star = lambda x, sig: mu + s * (x - mu) / torch.sqrt(s**2 + sig.reshape(-1, 1) ** 2)

    class Stage1:
        @staticmethod
        def denoise(x, sig, labels=None):
            return a * f_star(x, sig) + b

    threads = torch.get_num_threads()
    torch.set_num_threads(1)              # a tiny net: threads only contend (as the toy runs' train.threads 1)
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(1, 32), torch.nn.SiLU(), torch.nn.Linear(32, 2))

    def model(x, sig, labels=None):
        alpha, beta = mlp(sig.log().reshape(-1, 1) / 4).unbind(1)
        return alpha.reshape(-1, 1) + beta.reshape(-1, 1) * x / torch.sqrt(s**2 + sig.reshape(-1, 1) ** 2)

    loss = tcm_loss(toy_cfg(), Stage1(), resume_step=0, double_every=100)
    opt = torch.optim.Adam(mlp.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    for step in range(600):
        x0 = mu + s * torch.randn(256, 1, generator=gen)
        opt.zero_grad()
        loss(model, model, x0, step, gen).mean().backward()
        opt.step()
    torch.set_num_threads(threads)
    sig = torch.exp(torch.linspace(0.0, math.log(80.0), 30)).repeat_interleave(21)
    z = (mu + torch.sqrt(s**2 + sig**2) * torch.linspace(-2, 2, 21).repeat(30)).reshape(-1, 1)
    with torch.no_grad():
        f = model(z, sig)
    to_injected = (f - (a * f_star(z, sig) + b)).abs().mean().item()
    to_exact = (f - f_star(z, sig)).abs().mean().item()
    gap = ((a - 1) * f_star(z, sig) + b).abs().mean().item()      # |a·f* + b − f*|
    # seed 0: 0.18·gap and 0.94·gap; seeds 1, 2: 0.29 / 1.1 and 0.09 / 0.94
    assert to_injected < 0.35 * gap and to_exact > 0.65 * gap, (to_injected, to_exact, gap)


def test_snakemake_plans_tcm_after_its_stage_1_and_edm(tmp_path):
    """`snakemake -n` on a suite of tcm alone plans three runs per dataset: tcm, its stage-1 `ect` run (a teacher
    outside the suite, itself started from `edm`) and edm, each waiting for its teacher's final.pt; on digits the
    evaluated stage-1 run's ODE reference (against edm) has a job too."""
    import yaml
    configs = tmp_path / "configs"
    subprocess.run(["cp", "-r", str(REPO / "configs"), str(configs)], check=True)
    (configs / "experiment.yaml").write_text(yaml.safe_dump(
        {"suites": {"t": {"variants": ["tcm"], "datasets": ["gauss1d", "digits"], "seeds": [0]}}}))
    r = subprocess.run([sys.executable, "-m", "snakemake", "all", "-n", "--cores", "1", "-s",
                        str(REPO / "Snakefile"), "--directory", str(tmp_path), "--config", f"configs={configs}",
                        "suite=t"], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    inputs = {m[2]: m[1] for m in re.finditer(r"rule run:\n    input: (.*)\n    output: (\S+)/final.pt", r.stdout)}
    for d in ("gauss1d", "digits"):
        runs = f"results/runs/t/{d}"
        assert {f"{runs}/{v}/s0" for v in ("tcm", "ect", "edm")} <= set(inputs)
        assert f"{runs}/ect/s0/final.pt" in inputs[f"{runs}/tcm/s0"]
        assert f"{runs}/edm/s0/final.pt" in inputs[f"{runs}/ect/s0"]
    assert len(inputs) == 6
