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
