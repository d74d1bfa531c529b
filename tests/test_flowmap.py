"""The two-time machinery of the flow-map methods: the time-axis conversion against the exact Gaussian maps of
both paths, the FlowMap model's σ-space jumps with an exact network inside, the flow-map sampler, and the
second time input of the nets (which leaves every existing net as it was)."""
import numpy as np
import pytest
import torch
from torch import nn

import gaussian_truth as gt
from cmbench import timeaxes
from cmbench.config import ConfigError, Experiment, FlowMapSpec
from cmbench.checks import check_run
from cmbench.nets.mlp import MLP
from cmbench.nets.precond import FlowMap
from cmbench.nets.unet import ADMUNet, SongUNet
from cmbench.sample import flowmap_sample

SIGMA_D = 0.5


@pytest.mark.parametrize("nu", [1.0, SIGMA_D])
def test_time_axes_turn_one_paths_exact_flow_into_the_others(nu):
    """Φ_{t→r}(z) = (1 − r)·Ψ_{σ(t)→σ(r)}(z/(1 − t)) for Gaussian data, with both maps in closed form
    (new-methods.md §0.2, §0.3), on the unit-noise path (MeanFlow, Shortcut) and the σ_d path (IMM)."""
    z = torch.linspace(-3, 3, 13, dtype=torch.float64)
    for t, r in [(0.9, 0.3), (0.5, 0.0), (80 / 81, 0.2), (0.994, 0.006)]:
        t, r = torch.tensor(t, dtype=torch.float64), torch.tensor(r, dtype=torch.float64)
        s_t, s_r = timeaxes.sigma_of_t(t, nu), timeaxes.sigma_of_t(r, nu)
        via_edm = timeaxes.to_path(gt.edm_flow(timeaxes.to_edm(z, t), s_t, s_r), s_r, nu)
        torch.testing.assert_close(via_edm, gt.flow(z, t, r, nu=nu), rtol=0, atol=1e-12)
        torch.testing.assert_close(timeaxes.t_of_sigma(s_t, nu), t, rtol=0, atol=1e-15)
    assert timeaxes.t_of_sigma(80.0) == pytest.approx(80 / 81) and timeaxes.t_of_sigma(80.0, 0.5) == pytest.approx(80 / 80.5)


class ExactVelocity(nn.Module):
    """u*(z, r, t) of N(0.3, 0.5²) as a 'velocity' net: inputs (z_t, t, labels, t − r)."""

    def forward(self, z, c1, labels=None, c2=None):
        t, r = c1[:, None], (c1 - c2)[:, None]
        return gt.average_velocity(z, r, t)


class ExactTrigFlow(nn.Module):
    """IMM's F* = (f* − c_skip·z)/c_out on the σ_d path (new-methods.md §4.9), as a 'trigflow' net: inputs
    (z_t/(σ_d ρ_t), 1000·t, labels, 1000·s)."""

    def forward(self, u, c1, labels=None, c2=None):
        t, s = c1[:, None] / 1000, c2[:, None] / 1000
        rho = ((1 - t) ** 2 + t**2) ** 0.5
        z = u * SIGMA_D * rho
        c_skip, c_out = ((1 - t) * (1 - s) + t * s) / rho**2, -((1 - s) * t - (1 - t) * s) * SIGMA_D / rho
        return (gt.flow(z, t, s, nu=SIGMA_D) - c_skip * z) / c_out


def flow_maps():
    return [FlowMap(ExactVelocity(), FlowMapSpec(), SIGMA_D),
            FlowMap(ExactTrigFlow(), FlowMapSpec(path="fm_sd", output="trigflow", second="end", time_scale=1000),
                    SIGMA_D)]


@pytest.mark.parametrize("model", flow_maps(), ids=["velocity", "trigflow"])
def test_flowmap_with_the_exact_net_jumps_along_edms_exact_flow(model):
    """With the exact average velocity (MeanFlow's form) or IMM's exact F* inside, the model's σ-space jump is EDM's
    exact flow Ψ, and its consistency function is Ψ to σ = 0: the wiring of times, scalings and conversions."""
    x = torch.linspace(-160, 160, 9, dtype=torch.float64)[:, None]
    for s_from, s_to in [(80.0, 0.0), (80.0, 0.8), (0.8, 0.0), (3.0, 1.0)]:
        got = model.jump(x * s_from / 80, torch.tensor(s_from, dtype=torch.float64),
                         torch.tensor(s_to, dtype=torch.float64))
        torch.testing.assert_close(got, gt.edm_flow(x * s_from / 80, s_from, s_to), rtol=0, atol=1e-10)
    torch.testing.assert_close(model(x, torch.tensor(80.0, dtype=torch.float64)), gt.edm_flow(x, 80.0, 0.0),
                               rtol=0, atol=1e-10)


def test_flowmap_sampler_returns_the_exact_ode_endpoint_at_every_step_count():
    """Jumps without re-noising: 1, 2 or 3 steps of the exact flow map all end at Ψ_{80→0}(x_T) (the endpoint the
    toy evaluation scores the ODE error against)."""
    model = flow_maps()[0]
    x_t = (80 * np.random.default_rng(0).standard_normal((50, 1))).astype(np.float64)
    exact = gt.edm_flow(torch.from_numpy(x_t), 80.0, 0.0).numpy()
    for sigmas in ([80.0], [80.0, 0.8], [80.0, 2.0, 0.3]):
        np.testing.assert_allclose(flowmap_sample(model, sigmas, x_t, batch=16), exact, rtol=0, atol=1e-10)


def test_flowmap_clips_times_to_its_trained_range():
    """IMM trains on t ∈ [0.006, 0.994] and its sampler ends at 0.006 (new-methods.md §4.6): a jump to σ = 0
    returns the exact state at t = 0.006 (σ = 0.003), not at 0."""
    spec = FlowMapSpec(path="fm_sd", output="trigflow", second="end", time_scale=1000, t_min=0.006, t_max=0.994)
    model = FlowMap(ExactTrigFlow(), spec, SIGMA_D)
    x = torch.linspace(-80, 80, 5, dtype=torch.float64)[:, None]
    end = timeaxes.sigma_of_t(0.006, SIGMA_D)
    torch.testing.assert_close(model(x, torch.tensor(80.0, dtype=torch.float64)), gt.edm_flow(x, 80.0, end),
                               rtol=0, atol=1e-10)


# Fingerprints of the nets before the second time input existed (commit 1e29669): parameter count and the sum of
# outputs on fixed inputs. The one-time nets must keep both.
BEFORE = {"mlp": (1730, -0.32083043456077576), "song": (189347, -6.279573742300272),
          "adm": (209203, -140.460018703714)}


def tiny_nets(time2="none"):
    def shown(net):
        for p in net.out_conv.parameters():   # zero-initialised: give the output something to show
            torch.nn.init.normal_(p, std=0.1)
        return net

    torch.manual_seed(0)
    mlp = MLP(2, 32, 2, 16, 4.0, time2=time2)
    torch.manual_seed(0)
    song = shown(SongUNet(8, 3, 3, model_channels=16, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(4,),
                          time2=time2))
    torch.manual_seed(0)
    adm = shown(ADMUNet(8, 3, 3, model_channels=16, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(4,),
                        head_channels=8, label_dim=4, time2=time2))
    return {"mlp": mlp, "song": song, "adm": adm}


def outputs(nets, c2=None):
    x = torch.randn(5, 2, generator=torch.Generator().manual_seed(1))
    xi = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    ci, y = torch.tensor([0.3, -0.2]), torch.tensor([1, 3])
    return {"mlp": nets["mlp"](x, torch.linspace(-1, 1, 5), None, None if c2 is None else c2.expand(5)),
            "song": nets["song"](xi, ci, None, c2), "adm": nets["adm"](xi, ci, y, c2)}


def test_one_time_nets_keep_their_parameters_and_outputs():
    nets = tiny_nets()
    for name, out in outputs(nets).items():
        count = sum(p.numel() for p in nets[name].parameters())
        assert (count, out.double().sum().item()) == pytest.approx(BEFORE[name], rel=1e-6), name


@pytest.mark.parametrize("time2", ["concat", "add"])
def test_two_time_nets_depend_on_the_second_time_and_require_it(time2):
    nets = tiny_nets(time2)
    torch.manual_seed(0)
    for net in nets.values():      # the U-Nets' zero-initialised convolutions hide every conditioning input at init
        for p in net.parameters():
            torch.nn.init.normal_(p, std=0.1)
    a, b = outputs(nets, torch.tensor([0.1])), outputs(nets, torch.tensor([0.7]))
    for name in nets:
        assert not torch.allclose(a[name], b[name]), name
        with pytest.raises(ValueError, match="needs c_noise2"):
            outputs({**nets, name: nets[name]})[name]
    with pytest.raises(ValueError, match="one-time net"):
        tiny_nets()["mlp"](torch.zeros(1, 2), torch.zeros(1), None, torch.zeros(1))


def test_flowmap_pieces_go_together_or_fail_in_one_line(configs):
    exp = Experiment(configs)
    with pytest.raises(ConfigError, match="go together"):
        check_run(exp.resolve("toy", "gauss1d", "ict", 0, {"sample": {"sampler": "flowmap"}}))
    with pytest.raises(ConfigError, match="needs precond.flowmap"):
        check_run(exp.resolve("toy", "gauss1d", "ict", 0, {"precond": {"name": "flowmap"}}))
