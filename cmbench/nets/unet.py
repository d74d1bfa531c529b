"""Image backbones F(x, c_noise): DDPM++ / NCSN++ (SongUNet) and ADM (ADMUNet).

Both follow the layouts that EDM (Karras et al. 2022, App. F.2) uses for its reimplementations of DDPM++ / NCSN++
(Song et al. 2021, "Score-based generative modeling through SDEs", App. H) and ADM (Dhariwal & Nichol 2021), which
are also the backbones of CM, iCT, ECT and sCM. The two nets share one encoder/decoder skeleton (_UNet), one
residual block (ResBlock) and one attention layer (Attention); they differ only in the options they pass.

Attention is written out as softmax(QᵀK/√d)V rather than with F.scaled_dot_product_attention: in torch 2.14 the
CPU SDPA dispatches to a flash kernel with no forward-mode derivative (torch.func.jvp raises), and the JVP-based
losses (sCM) need one.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from cmbench.config import ADMNet, UNetNet
from cmbench.nets.mlp import check_time2

# ---------------------------------------------------------------------------------------------------------------
# Building blocks


def group_norm(channels: int, eps: float) -> nn.GroupNorm:
    """32 groups as in DDPM/ADM, but at least 4 channels a group so narrow test/toy widths still divide."""
    groups = min(32, channels // 4) or 1
    while channels % groups:        # odd widths: fall back to the largest divisor below
        groups -= 1
    return nn.GroupNorm(groups, channels, eps=eps)


def init_layer(layer: nn.Module, mode: str, gain: float = 1.0) -> nn.Module:
    """'xavier': EDM's SongUNet (Xavier-uniform weights × gain, zero bias); 'default': PyTorch's own, which equals
    EDM's ADM init (Kaiming-uniform × √(1/3)); 'zero': weights and bias 0 — the last conv of each residual branch and
    the output conv, so every block starts as the identity and F starts at 0 (Dhariwal & Nichol 2021, App. A)."""
    if mode == "xavier":
        nn.init.xavier_uniform_(layer.weight, gain=gain)
        nn.init.zeros_(layer.bias)
    elif mode == "zero":
        nn.init.zeros_(layer.weight)
        nn.init.zeros_(layer.bias)
    elif mode != "default":
        raise ValueError(f"unknown init mode {mode!r}")
    return layer


class PositionalEmbedding(nn.Module):
    """Transformer sinusoids of c_noise (DDPM++, ADM): frequencies (1/max_positions)^(i/(n/2 − endpoint))."""

    def __init__(self, channels: int, endpoint: bool, max_positions: float = 10_000.0):
        super().__init__()
        if channels % 2:
            raise ValueError(f"noise embedding width must be even (cos/sin pairs), got {channels}")
        self.half, self.endpoint, self.max_positions = channels // 2, endpoint, max_positions

    def forward(self, c_noise: torch.Tensor) -> torch.Tensor:
        i = torch.arange(self.half, device=c_noise.device, dtype=c_noise.dtype)
        freqs = (1 / self.max_positions) ** (i / (self.half - int(self.endpoint)))
        angles = torch.outer(c_noise, freqs)
        return torch.cat([angles.cos(), angles.sin()], dim=1)


class FourierEmbedding(nn.Module):
    """Random Fourier features of c_noise (NCSN++; Tancik et al. 2020): fixed frequencies N(0, scale²)."""

    def __init__(self, channels: int, scale: float):
        super().__init__()
        if channels % 2:
            raise ValueError(f"noise embedding width must be even (cos/sin pairs), got {channels}")
        self.register_buffer("freqs", torch.randn(channels // 2) * scale)   # persistent: they are random

    def forward(self, c_noise: torch.Tensor) -> torch.Tensor:
        angles = torch.outer(c_noise, 2 * math.pi * self.freqs.to(c_noise.dtype))
        return torch.cat([angles.cos(), angles.sin()], dim=1)


class Resample(nn.Module):
    """×2 up- or down-sampling with a separable FIR filter, applied per channel (BigGAN-style resampling in DDPM++ /
    NCSN++). [1, 1] is 2×2 average pooling / nearest-neighbour upsampling; NCSN++ uses [1, 3, 3, 1]."""

    def __init__(self, mode: str, fir: Sequence[int]):
        super().__init__()
        if mode not in ("up", "down"):
            raise ValueError(f"resample mode must be 'up' or 'down', got {mode!r}")
        if len(fir) % 2:
            raise ValueError(f"resample_filter must have an even length (centred ×2 resampling), got {list(fir)}")
        f = torch.as_tensor(fir, dtype=torch.float32)
        self.register_buffer("kernel", torch.outer(f, f) / f.sum() ** 2, persistent=False)
        self.mode, self.pad = mode, (len(fir) - 1) // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[1]
        w = self.kernel.to(x.dtype).expand(c, 1, *self.kernel.shape)
        if self.mode == "down":
            return F.conv2d(x, w, stride=2, padding=self.pad, groups=c)
        return F.conv_transpose2d(x, 4 * w, stride=2, padding=self.pad, groups=c)   # ×4 keeps the mean


class Attention(nn.Module):
    """Multi-head self-attention over pixels, residual: x + proj(attn(norm(x))) (DDPM / ADM)."""

    def __init__(self, channels: int, heads: int, eps: float, init: str, qkv_gain: float):
        super().__init__()
        if channels % heads:
            raise ValueError(f"{channels} channels do not split into {heads} attention heads")
        self.heads = heads
        self.norm = group_norm(channels, eps)
        self.qkv = init_layer(nn.Conv2d(channels, 3 * channels, 1), init, qkv_gain)
        self.proj = init_layer(nn.Conv2d(channels, channels, 1), "zero")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w).unbind(1)
        logits = torch.einsum("bncq,bnck->bnqk", q, k) / math.sqrt(c // self.heads)
        # softmax in at least float32 (half-precision logits overflow); plain ops so forward-mode AD works
        weights = logits.to(torch.promote_types(logits.dtype, torch.float32)).softmax(dim=-1).to(v.dtype)
        out = torch.einsum("bnqk,bnck->bncq", weights, v).reshape(b, c, h, w)
        return x + self.proj(out)


class ResBlock(nn.Module):
    """Residual block with noise conditioning, optional ×2 resampling and optional attention after it.

    Branch: GroupNorm → SiLU → [resample] → conv3×3 → condition on emb → GroupNorm → SiLU → dropout → conv3×3 (zero
    init). Conditioning is additive before the second norm (DDPM++) or an adaptive scale-shift after it
    (AdaGN, ADM). The skip path is resampled, then projected by a 1×1 conv when the width changes (or always, with
    resample_proj, as in DDPM++). Outputs are multiplied by skip_scale (1/√2 in DDPM++: Song et al. 2021, App. H).
    """

    def __init__(self, in_ch: int, out_ch: int, emb_ch: int, *, up: bool = False, down: bool = False,
                 attention: bool = False, heads: int = 1, dropout: float = 0.0, skip_scale: float = 1.0,
                 eps: float = 1e-5, resample_filter: Sequence[int] = (1, 1), resample_proj: bool = False,
                 adaptive_scale: bool = True, init: str = "default", attn_gain: float = 1.0):
        super().__init__()
        self.in_ch, self.out_ch = in_ch, out_ch
        self.skip_scale, self.adaptive_scale = skip_scale, adaptive_scale
        self.resample = Resample("up" if up else "down", resample_filter) if up or down else nn.Identity()
        self.norm0 = group_norm(in_ch, eps)
        self.conv0 = init_layer(nn.Conv2d(in_ch, out_ch, 3, padding=1), init)
        self.affine = init_layer(nn.Linear(emb_ch, out_ch * (2 if adaptive_scale else 1)), init)
        self.norm1 = group_norm(out_ch, eps)
        self.dropout = nn.Dropout(dropout)
        self.conv1 = init_layer(nn.Conv2d(out_ch, out_ch, 3, padding=1), "zero")
        project = in_ch != out_ch or (resample_proj and (up or down))
        self.skip = init_layer(nn.Conv2d(in_ch, out_ch, 1), init) if project else nn.Identity()
        self.attn = Attention(out_ch, heads, eps, init, attn_gain) if attention else None

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv0(self.resample(F.silu(self.norm0(x))))
        cond = self.affine(emb)[:, :, None, None].to(h.dtype)
        if self.adaptive_scale:
            scale, shift = cond.chunk(2, dim=1)
            h = F.silu(self.norm1(h) * (1 + scale) + shift)
        else:
            h = F.silu(self.norm1(h + cond))
        h = self.conv1(self.dropout(h))
        x = (h + self.skip(self.resample(x))) * self.skip_scale
        if self.attn is not None:
            x = self.attn(x) * self.skip_scale
        return x


# ---------------------------------------------------------------------------------------------------------------
# The shared U-Net skeleton


class _UNet(nn.Module):
    """Encoder / decoder of EDM's SongUNet and DhariwalUNet, which differ only in the options passed here.

    Encoder: stem conv3×3, then per resolution level [a downsampling ResBlock (levels > 0)] + num_blocks ResBlocks,
    every output kept as a skip. Decoder, coarsest level first: [two ResBlocks, the first with attention (bottom
    level) | an upsampling ResBlock], then num_blocks + 1 ResBlocks each taking one skip by concatenation. Output:
    GroupNorm → SiLU → conv3×3 (zero init). residual_encoder adds NCSN++'s progressive input: a downsampled copy of
    the image is carried alongside and mixed in after every downsampling block, (h + conv(aux)) / √2.
    """

    # sin/cos features (count, top frequency) for a learned function of the noise level beside this net: sCM's
    # adaptive weight w_φ(t), t ∈ [0, π/2] (papers.md §5.3)
    noise_features = (64, 16.0)

    def __init__(self, img_resolution: int, in_channels: int, out_channels: int, *, model_channels: int,
                 channel_mult: Sequence[int], num_blocks: int, attn_resolutions: Sequence[int],
                 embed: nn.Module, noise_channels: int, stem_channels: int, block: Callable[..., ResBlock],
                 attn_every_decoder_block: bool, residual_encoder: bool, resample_filter: Sequence[int],
                 init: str, eps: float, dropout: float, dropout_res: int | None, label_dim: int = 0,
                 embed2: nn.Module | None = None, time2: str = "none"):
        super().__init__()
        levels = len(channel_mult)
        if img_resolution % 2 ** (levels - 1):
            raise ValueError(f"img_resolution {img_resolution} does not halve {levels - 1} times")
        emb_ch = 4 * model_channels
        self.embed, self.embed2, self.time2 = embed, embed2, time2
        if (embed2 is None) != (time2 == "none"):
            raise ValueError("a second time input needs its embedding (embed2) and a time2 mode, 'concat' or 'add'")

        def mapping(width: int) -> nn.Sequential:
            return nn.Sequential(init_layer(nn.Linear(width, emb_ch), init), nn.SiLU(),
                                 init_layer(nn.Linear(emb_ch, emb_ch), init), nn.SiLU())

        # a second time (the two-time methods, new-methods.md §1.3, §4.3): 'concat' feeds both embeddings to one
        # mapping of twice the width (MeanFlow's U-Net); 'add' gives it its own mapping, summed with the first before
        # the last SiLU (IMM's s-embedding, Shortcut's step-size embedding)
        self.map = mapping(noise_channels * (2 if time2 == "concat" else 1))
        self.map2 = mapping(noise_channels) if time2 == "add" else None
        # class conditioning as EDM's DhariwalUNet: a one-hot label through a bias-free N(0, 1)-initialised
        # linear map, added to the embedding before its last SiLU
        self.label_dim = label_dim
        self.map_label = nn.Linear(label_dim, emb_ch, bias=False) if label_dim else None
        if self.map_label is not None:
            nn.init.normal_(self.map_label.weight)

        def block_at(res: int, *args, **kw) -> ResBlock:
            # dropout everywhere, or (iCT/sCM/ECT on ImageNet 64) only at feature resolutions ≤ dropout_res
            rate = dropout if dropout_res is None or res <= dropout_res else 0.0
            return block(*args, emb_ch=emb_ch, dropout=rate, **kw)

        self.stem = init_layer(nn.Conv2d(in_channels, stem_channels, 3, padding=1), init)
        self.enc, self.aux = nn.ModuleList(), nn.ModuleList()
        skips, ch, aux_ch = [stem_channels], stem_channels, in_channels
        for level, mult in enumerate(channel_mult):
            res, blocks = img_resolution >> level, nn.ModuleList()
            make = partial(block_at, res)
            if level > 0:
                blocks.append(make(ch, ch, down=True))
                skips.append(ch)
                if residual_encoder:
                    self.aux.append(nn.Sequential(init_layer(nn.Conv2d(aux_ch, ch, 3, padding=1), init),
                                                  Resample("down", resample_filter)))
                    aux_ch = ch
            for _ in range(num_blocks):
                blocks.append(make(ch, model_channels * mult, attention=res in attn_resolutions))
                ch = model_channels * mult
                skips.append(ch)
            self.enc.append(blocks)

        self.dec_head, self.dec = nn.ModuleList(), nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            make = partial(block_at, res)
            if level == levels - 1:
                self.dec_head.append(nn.ModuleList([make(ch, ch, attention=True), make(ch, ch)]))
            else:
                self.dec_head.append(nn.ModuleList([make(ch, ch, up=True)]))
            blocks = nn.ModuleList()
            for i in range(num_blocks + 1):
                attn = res in attn_resolutions and (attn_every_decoder_block or i == num_blocks)
                blocks.append(make(ch + skips.pop(), model_channels * mult, attention=attn))
                ch = model_channels * mult
            self.dec.append(blocks)
        self.out_norm = group_norm(ch, eps)
        self.out_conv = init_layer(nn.Conv2d(ch, out_channels, 3, padding=1), "zero")

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, labels: torch.Tensor | None = None,
                c_noise2: torch.Tensor | None = None) -> torch.Tensor:
        """F(x, c_noise[, labels][, c_noise2]): labels are class indices [B] (int64) of a conditional net, else
        None; c_noise2 the second time of a two-time net, else None."""
        if (labels is None) != (self.map_label is None):
            raise ValueError("a class-conditional net needs labels" if labels is None else
                             "labels given to an unconditional net")

        def embed(module, c):
            return module(c.to(x.dtype).reshape(-1).expand(x.shape[0]))

        emb = embed(self.embed, c_noise)
        if check_time2(self.embed2 is not None, c_noise2) and self.time2 == "concat":
            emb = torch.cat([emb, embed(self.embed2, c_noise2)], dim=1)
        emb = self.map[:3](emb)
        if self.map2 is not None:
            emb = emb + self.map2[:3](embed(self.embed2, c_noise2))
        if self.map_label is not None:
            one_hot = F.one_hot(labels.reshape(-1).expand(x.shape[0]), self.label_dim).to(x.dtype)
            emb = emb + self.map_label(one_hot)
        emb = F.silu(emb)
        h = self.stem(x)
        skips, aux = [h], x
        for level, blocks in enumerate(self.enc):
            for i, blk in enumerate(blocks):
                h = blk(h, emb)
                if level > 0 and i == 0 and len(self.aux):
                    h = aux = (h + self.aux[level - 1](aux)) / math.sqrt(2)
                skips.append(h)
        for head, blocks in zip(self.dec_head, self.dec):
            for blk in head:
                h = blk(h, emb)
            for blk in blocks:
                h = blk(torch.cat([h, skips.pop()], dim=1), emb)
        return self.out_conv(F.silu(self.out_norm(h)))


class SongUNet(_UNet):
    """DDPM++ / NCSN++ (Song et al. 2021) as reimplemented in EDM (Karras et al. 2022), unconditional.

    Defaults are the DDPM++ CIFAR-10 configuration (55.7M parameters). NCSN++ is embedding="fourier",
    channel_mult_noise=2, encoder="residual", resample_filter=(1, 3, 3, 1). Left out: NCSN++'s progressive *output*
    (skip decoder) — EDM's NCSN++ uses the standard decoder too — and class / augmentation labels.
    DDPM++ specifics: additive noise conditioning, 1/√2 skip scaling, 1×1-projected resampling skips, one attention
    head, GroupNorm eps 1e-6, Xavier init (attention qkv × √0.2), the first conv at model_channels.
    """

    def __init__(self, img_resolution: int, in_channels: int, out_channels: int, *, model_channels: int = 128,
                 channel_mult: Sequence[int] = (2, 2, 2), num_blocks: int = 4, attn_resolutions: Sequence[int] = (16,),
                 dropout: float = 0.0, dropout_res: int | None = None, embedding: str = "positional",
                 fourier_scale: float = 16.0, channel_mult_noise: int = 1, encoder: str = "standard",
                 resample_filter: Sequence[int] = (1, 1), time2: str = "none"):
        noise_channels = model_channels * channel_mult_noise
        if embedding == "positional":
            make_embed = partial(PositionalEmbedding, noise_channels, endpoint=True)
        elif embedding == "fourier":
            make_embed = partial(FourierEmbedding, noise_channels, fourier_scale)
        else:
            raise ValueError(f"embedding must be 'positional' or 'fourier', got {embedding!r}")
        embed = make_embed()
        embed2 = make_embed() if time2 != "none" else None
        if encoder not in ("standard", "residual"):
            raise ValueError(f"encoder must be 'standard' or 'residual', got {encoder!r}")
        block = partial(ResBlock, heads=1, skip_scale=math.sqrt(0.5), eps=1e-6,
                        resample_filter=tuple(resample_filter), resample_proj=True, adaptive_scale=False,
                        init="xavier", attn_gain=math.sqrt(0.2))
        super().__init__(img_resolution, in_channels, out_channels, model_channels=model_channels,
                         channel_mult=channel_mult, num_blocks=num_blocks, attn_resolutions=attn_resolutions,
                         embed=embed, noise_channels=noise_channels, stem_channels=model_channels, block=block,
                         attn_every_decoder_block=False, residual_encoder=encoder == "residual",
                         resample_filter=tuple(resample_filter), init="xavier", eps=1e-6, dropout=dropout,
                         dropout_res=dropout_res, embed2=embed2, time2=time2)


class ADMUNet(_UNet):
    """ADM (Dhariwal & Nichol 2021) as reimplemented in EDM's DhariwalUNet; defaults are its ImageNet-64 config.

    label_dim > 0 makes it class-conditional as EDM's ImageNet-64 net (a label_dim × 4·model_channels label
    embedding). ADM specifics: adaptive GroupNorm scale-shift conditioning, 64 channels per
    attention head, attention in every block at attn_resolutions, unscaled skips, parameter-free resampling skips,
    [1, 1] resampling, PyTorch default init.
    """

    def __init__(self, img_resolution: int, in_channels: int, out_channels: int, *, model_channels: int = 192,
                 channel_mult: Sequence[int] = (1, 2, 3, 4), num_blocks: int = 3,
                 attn_resolutions: Sequence[int] = (32, 16, 8), head_channels: int = 64, dropout: float = 0.1,
                 dropout_res: int | None = None, label_dim: int = 0, time2: str = "none"):
        def block(in_ch, out_ch, **kw):    # heads follow the block width: out_ch / head_channels (at least one)
            return ResBlock(in_ch, out_ch, heads=max(1, out_ch // head_channels), **kw)

        super().__init__(img_resolution, in_channels, out_channels, model_channels=model_channels,
                         channel_mult=channel_mult, num_blocks=num_blocks, attn_resolutions=attn_resolutions,
                         embed=PositionalEmbedding(model_channels, endpoint=False), noise_channels=model_channels,
                         stem_channels=model_channels * channel_mult[0], block=block, attn_every_decoder_block=True,
                         residual_encoder=False, resample_filter=(1, 1), init="default", eps=1e-5, dropout=dropout,
                         dropout_res=dropout_res, label_dim=label_dim, time2=time2,
                         embed2=PositionalEmbedding(model_channels, endpoint=False) if time2 != "none" else None)


def build_unet(net_cfg: UNetNet | ADMNet, shape: tuple[int, int, int], label_dim: int = 0) -> nn.Module:
    """The image backbone of a run: F(x, c_noise[, labels]) with x of shape [B, *shape], output of the same
    shape; label_dim > 0 (ADM only) makes it class-conditional."""
    c, h, w = shape
    if h != w:
        raise ValueError(f"U-Nets here take square images, got {h}×{w}")
    if net_cfg.name == "unet":
        if label_dim:
            raise ValueError("class conditioning is wired for the ADM net only (EDM's ImageNet-64 config)")
        return SongUNet(h, c, c, model_channels=net_cfg.model_channels, channel_mult=net_cfg.channel_mult,
                        num_blocks=net_cfg.num_blocks, attn_resolutions=net_cfg.attn_resolutions,
                        dropout=net_cfg.dropout, dropout_res=net_cfg.dropout_res, embedding=net_cfg.embedding,
                        fourier_scale=net_cfg.fourier_scale,
                        channel_mult_noise=net_cfg.channel_mult_noise, encoder=net_cfg.encoder,
                        resample_filter=net_cfg.resample_filter, time2=net_cfg.time2)
    if net_cfg.name == "adm":
        return ADMUNet(h, c, c, model_channels=net_cfg.model_channels, channel_mult=net_cfg.channel_mult,
                       num_blocks=net_cfg.num_blocks, attn_resolutions=net_cfg.attn_resolutions,
                       head_channels=net_cfg.head_channels, dropout=net_cfg.dropout, dropout_res=net_cfg.dropout_res,
                       label_dim=label_dim, time2=net_cfg.time2)
    raise ValueError(f"build_unet takes a 'unet' or 'adm' net config, got {net_cfg.name!r}")
