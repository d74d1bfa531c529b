"""The image backbones (cmbench.nets.unet): parameter counts against the papers, shapes, gradients and JVPs."""
import pytest
import torch

from cmbench.config import ADMNet, UNetNet
from cmbench.nets.unet import ADMUNet, Attention, SongUNet, build_unet


@pytest.fixture(autouse=True)
def one_thread():
    """These nets are small: one intra-op thread is faster, and far faster when the cores are shared (xdist)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def n_params(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def perturbed(net: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Float64 copy with every parameter jittered, so the zero-initialised convs don't make F ≡ 0 and every
    path (attention included) shows up in the output and its derivatives."""
    net = net.double().eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return net


def check_forward_backward_jvp(net: torch.nn.Module, shape: tuple[int, ...]):
    g = torch.Generator().manual_seed(1)
    x, c = torch.randn(shape, generator=g, dtype=torch.float64), torch.randn(shape[0], generator=g, dtype=torch.float64)
    tx, tc = torch.randn_like(x), torch.randn_like(c)
    f = lambda x, c: net(x, c)

    out = f(x, c)
    assert out.shape == x.shape
    out.square().mean().backward()
    grads = [p.grad for p in net.parameters()]
    assert all(gr is not None and torch.isfinite(gr).all() for gr in grads)
    assert sum(gr.abs().sum() for gr in grads) > 0

    with torch.no_grad():
        primal, tangent = torch.func.jvp(f, (x, c), (tx, tc))
        # central difference, O(h²) truncation: small h because the Fourier features (frequencies ~2π·16·N(0,1))
        # make F curve fast in c_noise; float64 round-off stays ~1e-9 relative at this h
        h = 1e-6
        fd = (f(x + h * tx, c + h * tc) - f(x - h * tx, c - h * tc)) / (2 * h)
    torch.testing.assert_close(primal, out.detach(), rtol=1e-12, atol=1e-12)
    assert tangent.norm() > 0
    assert (tangent - fd).norm() / fd.norm() < 1e-5


def test_ddpmpp_cifar10_parameter_count():
    # EDM's DDPM++ CIFAR-10 (ECT README: 55.7M); EDM's own count adds 9×128 for its augmentation labels.
    with torch.device("meta"):
        net = build_unet(UNetNet(name="unet"), (3, 32, 32))
    assert isinstance(net, SongUNet)
    assert abs(n_params(net) / 55.7e6 - 1) < 0.01


def test_adm_imagenet64_parameter_count():
    # EDM reports 296M for its class-conditional ImageNet-64 ADM; ours lacks the 1000×768 label embedding.
    with torch.device("meta"):
        net = build_unet(ADMNet(name="adm"), (3, 64, 64))
    assert isinstance(net, ADMUNet)
    assert abs((n_params(net) + 1000 * 768) / 296e6 - 1) < 0.01


@pytest.mark.parametrize("embedding", ["positional", "fourier"])
@pytest.mark.parametrize("encoder", ["standard", "residual"])
def test_songunet_cifar_shape_grad_jvp(embedding, encoder):
    torch.manual_seed(0)
    fir = (1, 1) if encoder == "standard" else (1, 3, 3, 1)
    net = SongUNet(32, 3, 3, model_channels=16, channel_mult=(1, 2, 2), num_blocks=1, attn_resolutions=(16,),
                   embedding=embedding, channel_mult_noise=2 if embedding == "fourier" else 1, encoder=encoder,
                   resample_filter=fir)
    assert sum(isinstance(m, Attention) for m in net.modules()) == 3   # enc 16², bottom 8², last dec 16²
    check_forward_backward_jvp(perturbed(net), (2, 3, 32, 32))


def test_admunet_shape_grad_jvp():
    torch.manual_seed(0)
    net = ADMUNet(16, 3, 3, model_channels=32, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(8,),
                  head_channels=16, dropout=0.1)
    assert net.dec[0][0].attn.heads == 4                  # 64 channels / 16 per head
    check_forward_backward_jvp(perturbed(net), (2, 3, 16, 16))


def test_zero_init_output_and_digits_config():
    torch.manual_seed(0)
    cfg = UNetNet(name="unet", model_channels=32, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4])
    net = build_unet(cfg, (1, 8, 8))
    x = torch.randn(4, 1, 8, 8)
    out = net(x, torch.randn(4))
    # zero-initialised output conv: F starts at exactly 0, so a preconditioned model starts as c_skip·x
    assert out.shape == x.shape and (out == 0).all()
    out.sum().backward()                                  # only the output conv gets a gradient at init
    assert net.out_conv.weight.grad.abs().sum() > 0
    assert net.stem.weight.grad.abs().sum() == 0
    # a scalar c_noise broadcasts over the batch; the dropout config and ADM build from their configs too
    assert net(x, torch.tensor(0.3)).shape == x.shape
    adm = build_unet(ADMNet(name="adm", model_channels=32, channel_mult=[1, 2], num_blocks=1,
                            attn_resolutions=[4], head_channels=32), (1, 8, 8))
    assert adm.train()(x, torch.randn(4)).shape == x.shape


def test_bad_configs_are_refused():
    with pytest.raises(ValueError, match="even length"):
        SongUNet(8, 1, 1, model_channels=32, channel_mult=(1, 2), num_blocks=1, resample_filter=(1, 2, 1))
    with pytest.raises(ValueError, match="halve"):
        SongUNet(12, 1, 1, model_channels=32, channel_mult=(1, 1, 1, 1), num_blocks=1)
    with pytest.raises(ValueError, match="square"):
        build_unet(UNetNet(name="unet"), (3, 32, 16))


def test_dropout_only_at_low_resolutions():
    """iCT, sCM and ECT on ImageNet 64 apply dropout only at feature resolutions ≤ 16: the ADM built with
    dropout_res 16 has p > 0 exactly in its 16×16 and 8×8 blocks."""
    net = ADMUNet(64, 3, 3, model_channels=16, num_blocks=1, head_channels=16, dropout=0.45, dropout_res=16)
    dropouts = {n: m for n, m in net.named_modules() if isinstance(m, torch.nn.Dropout)}
    res = {}

    def record(name):
        def hook(module, inputs, output):
            res[name] = output.shape[-1]
        return hook

    for n, m in dropouts.items():
        m.register_forward_hook(record(n))
    with torch.no_grad():
        net.eval()(torch.randn(1, 3, 64, 64), torch.zeros(1))
    assert set(res) == set(dropouts)
    assert all((m.p == 0.45) == (res[n] <= 16) and m.p in (0.0, 0.45) for n, m in dropouts.items())
    assert {res[n] for n, m in dropouts.items() if m.p > 0} == {16, 8}
