"""Networks and preconditioning, built from the resolved config."""
from torch import nn

from cmbench.config import RunConfig
from cmbench.nets.mlp import MLP
from cmbench.nets.precond import Precond, TrigFlow


def build_model(cfg: RunConfig) -> nn.Module:
    n, p = cfg.net, cfg.precond
    net = MLP(cfg.dataset.dim, n.width, n.depth, n.emb_features, n.emb_max_freq)
    if p.name == "trigflow":
        return TrigFlow(net, p.sigma_data)
    return Precond(net, p.sigma_data, p.sigma_min, boundary=p.name == "cm")
