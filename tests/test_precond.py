"""Preconditioning: the consistency boundary condition and the EDM scalings."""
import torch

from cmbench.nets.mlp import MLP
from cmbench.nets.precond import Precond


def test_boundary_condition_is_exact():
    torch.manual_seed(0)
    f = Precond(MLP(3, 32, 2, 8, 4.0), 0.5, 0.002, boundary=True)
    x = torch.randn(64, 3) * 5
    assert torch.equal(f(x, torch.tensor(0.002)), x)               # f(x, σ_min) = x bit for bit
    assert not torch.allclose(f(x, torch.tensor(0.01)), x)
    edm = Precond(f.net, 0.5, 0.002, boundary=False)
    assert not torch.equal(edm(x, torch.tensor(0.002)), x)        # the unshifted EDM form has no exact boundary


def test_scalings_match_papers():
    f = Precond(torch.nn.Identity(), 0.5, 0.002, boundary=True)
    s = torch.tensor([0.002, 1.0, 80.0], dtype=torch.float64)
    c_skip, c_out, c_in, c_noise = f.scalings(s)
    assert torch.allclose(c_skip, 0.25 / ((s - 0.002) ** 2 + 0.25))            # Song et al. 2023, App. C
    assert torch.allclose(c_out, 0.5 * (s - 0.002) / (s**2 + 0.25).sqrt())
    assert torch.allclose(c_in, 1 / (s**2 + 0.25).sqrt())                      # EDM Table 1
    assert torch.allclose(c_noise, s.log() / 4)


def test_wrapped_edm_net_is_the_edm_denoiser_in_trigflow_time():
    """sCM from its EDM teacher: TrigFlow(edm_net) reads the teacher's network as trained, so its denoiser equals
    the EDM denoiser at σ = σ_d·tan t (to float64 round-off) and its TrigFlow consistency function at x_t = cos t·x_σ
    is that same denoiser; its F is −F_EDM at c_noise = ¼ ln σ."""
    from cmbench.nets.precond import TrigFlow
    torch.manual_seed(0)
    net = MLP(3, 32, 2, 8, 4.0).double()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    edm, trig = Precond(net, 0.5, 0.002, boundary=False), TrigFlow(net, 0.5, edm_net=True)
    x = torch.randn(7, 3, dtype=torch.float64) * 3
    sigma = torch.tensor([0.002, 0.05, 0.3, 1.0, 4.0, 20.0, 80.0], dtype=torch.float64)
    torch.testing.assert_close(trig(x, sigma), edm(x, sigma), rtol=1e-12, atol=1e-12)
    t = torch.atan(sigma / 0.5)
    x_t = t.cos()[:, None] * x
    torch.testing.assert_close(trig.consistency(x_t, t), edm(x, sigma), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(trig.raw(x_t, t), -net(x_t / 0.5, sigma.log() / 4), rtol=1e-12, atol=1e-12)
    # the unwrapped TrigFlow reading of the same weights (c_noise = t, F not negated) is another function
    assert not torch.allclose(TrigFlow(net, 0.5)(x, sigma), edm(x, sigma), atol=1e-3)


def test_jvp_through_the_wrapped_net_is_finite_and_matches_finite_differences():
    from cmbench.nets.precond import TrigFlow
    torch.manual_seed(1)
    net = MLP(2, 16, 2, 8, 4.0).double()
    trig = TrigFlow(net, 0.5, edm_net=True)
    x_t, t = torch.randn(5, 2, dtype=torch.float64), torch.tensor([0.01, 0.3, 0.8, 1.2, 1.56], dtype=torch.float64)
    tx, tt = torch.randn_like(x_t), torch.ones_like(t)
    _, jvp = torch.func.jvp(trig.raw, (x_t, t), (tx, tt))
    h = 1e-6
    fd = (trig.raw(x_t + h * tx, t + h * tt) - trig.raw(x_t - h * tx, t - h * tt)) / (2 * h)
    assert torch.isfinite(jvp).all()
    torch.testing.assert_close(jvp, fd, rtol=1e-5, atol=1e-6)
