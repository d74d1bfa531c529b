"""Networks and preconditioning, built from the resolved config."""
from torch import nn

from cmbench.config import MLPNet, RunConfig
from cmbench.nets.precond import FlowMap, Precond, TrigFlow


def build_model(cfg: RunConfig) -> nn.Module:
    n, p = cfg.net, cfg.precond
    if isinstance(n, MLPNet):
        from cmbench.nets.mlp import MLP
        net = MLP(cfg.dataset.dim, n.width, n.depth, n.emb_features, n.emb_max_freq, n.time2)
    else:
        from cmbench.nets.unet import build_unet
        net = build_unet(n, cfg.dataset.shape, cfg.dataset.num_classes if cfg.dataset.conditional else 0)
    if p.name == "flowmap":
        return FlowMap(net, p.flowmap, p.sigma_data)
    if p.name == "trigflow":
        return TrigFlow(net, p.sigma_data, edm_net=p.trigflow_net == "edm", c_noise_scale=p.c_noise_scale)
    return Precond(net, p.sigma_data, p.sigma_min, boundary=p.name == "cm", c_noise_scale=p.c_noise_scale)
