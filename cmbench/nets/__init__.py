"""Networks and preconditioning, built from the resolved config."""
from cmbench.config import RunConfig
from cmbench.nets.mlp import MLP
from cmbench.nets.precond import Precond


def build_model(cfg: RunConfig) -> Precond:
    n, p = cfg.net, cfg.precond
    net = MLP(cfg.dataset.dim, n.width, n.depth, n.emb_features, n.emb_max_freq)
    return Precond(net, p.sigma_data, p.sigma_min, boundary=p.name == "cm")
