"""Load, merge, validate and hash run configs.

One schema (the pydantic models below) serves the Snakefile (through cmbench.workflow) and the package.
Merge order, lowest first: the schema's defaults < configs/defaults.yaml < datasets/<dataset>.yaml
< variants/<variant>.yaml < the variant's `per_kind: {<dataset kind>: ...}` block (e.g. `image`: what changes on images)
< its `per_dataset: {<dataset>: ...}` block (a paper's settings for that dataset) < a scale's layers
(`--config scale=smoke`: configs/scales/smoke.yaml, sizes only) < `--set key.path=value`.
"""
from __future__ import annotations

import copy
import hashlib
import json
import re
import shlex
import sys
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, FilePath, ValidationError, model_validator

from cmbench import io, paths
from cmbench.grids import karras_sigmas
from cmbench.metrics.keys import FID_SPECS

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")


class ConfigError(ValueError):
    """A bad config: the message is one line that names the file or key at fault."""


def check_name(kind: str, name: Any) -> str:
    """Suite, dataset and variant names become path components: keep them safe and boring."""
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise ConfigError(f"{kind} name {name!r} is not a safe path component "
                          f"(letters, digits, '_' and '-', starting with a letter or digit)")
    return name


class Strict(BaseModel):
    # no NaN or ±inf anywhere (`optim.lr: .inf` would train nothing but NaNs)
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)


PosInt = Annotated[int, Field(gt=0)]
PosFloat = Annotated[float, Field(gt=0)]
# A step count above 10⁹ is a typo (1e29): the papers' longest runs are under 10⁶ steps, and 10⁹ steps of even a
# 1 ms toy step take 12 days; the bound also keeps every step index well inside torch's int64.
MAX_STEPS = 10**9
Steps = Annotated[int, Field(gt=0, le=MAX_STEPS)]


class RunId(Strict):
    suite: str
    dataset: str
    variant: str
    seed: Annotated[int, Field(ge=0)]


class ToyData(Strict):
    dim: PosInt

    @property
    def shape(self) -> tuple[int]:
        return (self.dim,)

    @property
    def conditional(self) -> bool:
        return False


class GaussianData(ToyData):
    """N(mean, std² I): closed-form score, flow and consistency map (papers.md §8.1)."""
    kind: Literal["gaussian"]
    mean: float | list[float] = 0.0
    std: PosFloat

    @model_validator(mode="after")
    def _mean_matches_dim(self):
        if isinstance(self.mean, list) and len(self.mean) != self.dim:
            raise ValueError(f"mean has {len(self.mean)} entries but dim is {self.dim}")
        return self


class MixtureData(ToyData):
    """Equal-weight isotropic Gaussian mixture; its flow is integrated exactly in float64 (papers.md §8.3)."""
    kind: Literal["gmm"]
    layout: Literal["ring", "random"]
    modes: Annotated[int, Field(ge=2)]
    radius: PosFloat = 1.0
    std: PosFloat
    layout_seed: Annotated[int, Field(ge=0)] = 0

    @model_validator(mode="after")
    def _ring_is_2d(self):
        if self.layout == "ring" and self.dim != 2:
            raise ValueError(f"layout 'ring' needs dim 2, got {self.dim}")
        return self


NUM_CLASSES = {"imagenet64": 1000}     # sources whose labels are wired: class count


class ImageData(Strict):
    """Images in [−1, 1], channels first. digits: scikit-learn's 8×8 digits (optionally resized); patches:
    32×32 RGB crops of the photos bundled with scikit-learn and matplotlib (real images with CIFAR's shape);
    cifar10 / imagenet64: a local copy of the dataset (cmbench.data.images documents the layouts)."""
    kind: Literal["image"]
    source: Literal["digits", "patches", "cifar10", "imagenet64"]
    resolution: PosInt
    channels: Literal[1, 3]
    path: str | None = None             # cifar10 / imagenet64: the local copy (checked at dry-run time)
    xflip: bool = False                 # random horizontal flips in training (the papers' CIFAR-10 setting)
    size: PosInt | None = None          # patches: how many crops; others: use the first `size` images
    # class-conditional training and sampling on the dataset's labels (imagenet64: the npz `labels`, as every
    # ImageNet 64 number of the papers); labels are drawn uniformly per sample seed when sampling
    conditional: bool = False

    @model_validator(mode="after")
    def _source(self):
        if (self.path is None) != (self.source in ("digits", "patches")):
            raise ValueError(f"source '{self.source}' " + ("needs a path" if self.path is None else "takes no path"))
        fixed = {"digits": (None, 1), "patches": (32, 3), "cifar10": (32, 3), "imagenet64": (64, 3)}[self.source]
        if self.channels != fixed[1] or self.resolution != (fixed[0] or self.resolution):
            raise ValueError(f"source '{self.source}' has {fixed[1]} channel(s)"
                             + (f" at resolution {fixed[0]}" if fixed[0] else ""))
        if self.conditional and self.source not in NUM_CLASSES:
            raise ValueError(f"source '{self.source}' has no class labels wired (conditional: "
                             f"{', '.join(NUM_CLASSES)})")
        return self

    @property
    def num_classes(self) -> int:
        return NUM_CLASSES[self.source]

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.channels, self.resolution, self.resolution)

    @property
    def dim(self) -> int:
        return self.channels * self.resolution**2


Dataset = Annotated[Union[GaussianData, MixtureData, ImageData], Field(discriminator="kind")]


# a second time input of the net (the flow-map methods' (r, t), (s, t) or step size: new-methods.md §5): 'concat'
# embeds it beside the first time (MeanFlow's U-Net), 'add' through its own mapping added to the first (IMM,
# Shortcut); the flow-map preconditioning needs one, every other needs 'none' (cmbench.nets)
Time2 = Literal["none", "concat", "add"]


class MLPNet(Strict):
    """Toy-data backbone (cmbench.nets.mlp)."""
    name: Literal["mlp"] = "mlp"
    width: PosInt = 128
    depth: PosInt = 3                   # hidden layers
    emb_features: PosInt = 16           # sin/cos features of c_noise
    emb_max_freq: PosFloat = 4.0        # rad per unit c_noise; low works best on toys (2π·4 was 10× worse in W2)
    time2: Time2 = "none"


Dropout = Annotated[float, Field(ge=0, lt=1)]


class UNetNet(Strict):
    """DDPM++ / NCSN++ (Song et al. 2021), the CIFAR-10 backbone of EDM, CM, iCT, ECT and sCM. Defaults are
    EDM's DDPM++ CIFAR-10 configuration (55.7M parameters); NCSN++ is embedding fourier, encoder residual,
    resample_filter [1, 3, 3, 1] (cmbench.nets.unet)."""
    name: Literal["unet"]
    model_channels: PosInt = 128
    channel_mult: Annotated[list[PosInt], Field(min_length=1)] = [2, 2, 2]
    num_blocks: PosInt = 4              # residual blocks per resolution (iCT-deep: 8)
    attn_resolutions: list[PosInt] = [16]
    dropout: Dropout = 0.0
    dropout_res: PosInt | None = None   # dropout only at feature resolutions ≤ this (None: everywhere)
    embedding: Literal["positional", "fourier"] = "positional"
    fourier_scale: PosFloat = 16.0
    channel_mult_noise: PosInt = 1
    encoder: Literal["standard", "residual"] = "standard"
    resample_filter: Annotated[list[PosInt], Field(min_length=1)] = [1, 1]
    time2: Time2 = "none"


class ADMNet(Strict):
    """ADM (Dhariwal & Nichol 2021), the ImageNet-64 backbone of EDM, CM and iCT. Defaults are EDM's
    ImageNet-64 configuration (cmbench.nets.unet)."""
    name: Literal["adm"]
    model_channels: PosInt = 192
    channel_mult: Annotated[list[PosInt], Field(min_length=1)] = [1, 2, 3, 4]
    num_blocks: PosInt = 3
    attn_resolutions: list[PosInt] = [32, 16, 8]
    head_channels: PosInt = 64
    dropout: Dropout = 0.1
    dropout_res: PosInt | None = None   # dropout only at feature resolutions ≤ this (iCT, sCM, ECT on ImageNet 64)
    time2: Time2 = "none"


Net = Annotated[Union[MLPNet, UNetNet, ADMNet], Field(discriminator="name")]


class FlowMapSpec(Strict):
    """The two-time model of the flow-map methods (new-methods.md §0.2, §5), in the time t ∈ [0, 1] of the linear
    path z_t = (1 − t)·x + t·ν·ε (t = 0 is data): ν = 1 on 'fm' (MeanFlow, Shortcut), σ_d on 'fm_sd' (IMM). It maps
    z_t to z_r (r ≤ t) as z_t − (t − r)·F ('velocity': F is the average velocity u, MeanFlow Eq. 12) or as IMM's
    'trigflow' form c_skip·z_t + c_out·F(c_in·z_t) (§4.3: sCM's TrigFlow step ending at r instead of 0)."""
    path: Literal["fm", "fm_sd"] = "fm"
    output: Literal["velocity", "trigflow"] = "velocity"
    # the net's second time: t − r (MeanFlow's h), r (IMM's s) or log2(1/(t − r)) (Shortcut's step label k, d = 2^−k)
    second: Literal["gap", "end", "log2_gap"] = "gap"
    time_scale: PosFloat = 1.0             # c_noise = scale·t: raw t (MeanFlow), 1000·t (IMM)
    t_min: Annotated[float, Field(ge=0, lt=1)] = 0.0   # the times it trains on; sampling clips to them (IMM:
    t_max: Annotated[float, Field(gt=0, le=1)] = 1.0   # [0.006, 0.994], new-methods.md §4.2)

    @model_validator(mode="after")
    def _range(self):
        if not self.t_min < self.t_max:
            raise ValueError(f"t_min {self.t_min} must be below t_max {self.t_max}")
        return self


class Precond(Strict):
    # cm: EDM scalings shifted so f(x, sigma_min) = x exactly (Song et al. 2023, App. C); edm: unshifted (Karras
    # et al. 2022); trigflow: f(x_t, t) = cos t·x_t − sin t·σ_d·F(x_t/σ_d, t) with t = arctan(σ/σ_d) (Lu & Song 2024,
    # §2); flowmap: a two-time flow map Φ_{t→r} of the linear path (`flowmap`; cmbench.nets.precond.FlowMap)
    name: Literal["cm", "edm", "trigflow", "flowmap"] = "cm"
    flowmap: FlowMapSpec | None = None    # precond 'flowmap' only (required there)
    # trigflow only: the network is parameterised as trained in TrigFlow (c_noise = t), or as an EDM denoiser's
    # network (F_trig = −F_edm at c_noise = ¼ ln(σ_d tan t)), so that a trained EDM teacher's weights start the
    # student exactly (cmbench.nets.precond.TrigFlow)
    trigflow_net: Literal["trigflow", "edm"] = "trigflow"
    # c_noise = scale·¼ ln σ: EDM feeds ¼ ln σ to every net; the CM code's ADM (ImageNet 64) gets 1000·¼ ln σ
    # (papers.md §2.1), which makes its positional embedding 1000× more sensitive to σ
    c_noise_scale: PosFloat = 1.0
    sigma_data: PosFloat = 0.5
    sigma_min: PosFloat = 0.002
    sigma_max: PosFloat = 80.0
    rho: PosFloat = 7.0

    @model_validator(mode="after")
    def _ordered(self):
        if not self.sigma_min < self.sigma_max:
            raise ValueError(f"sigma_min {self.sigma_min} must be below sigma_max {self.sigma_max}")
        if self.trigflow_net != "trigflow" and self.name != "trigflow":
            raise ValueError(f"trigflow_net is for precond 'trigflow', not {self.name!r}")
        if self.name == "trigflow" and self.trigflow_net == "trigflow" and self.c_noise_scale != 1:
            raise ValueError("c_noise_scale scales ¼ ln σ: a TrigFlow net takes c_noise = t")
        if (self.flowmap is None) == (self.name == "flowmap"):
            raise ValueError("precond 'flowmap' needs precond.flowmap (its path and parameterisation)"
                             if self.name == "flowmap" else f"precond.flowmap is for precond 'flowmap', not {self.name!r}")
        if self.name == "flowmap" and self.c_noise_scale != 1:
            raise ValueError("c_noise_scale scales ¼ ln σ: a flow-map net takes its time t (precond.flowmap.time_scale)")
        return self


class Optim(Strict):
    name: Literal["adam", "radam", "adamw"] = "adam"
    lr: PosFloat = 3e-4
    betas: Annotated[list[Annotated[float, Field(ge=0, lt=1)]], Field(min_length=2, max_length=2)] = [0.9, 0.999]
    eps: PosFloat = 1e-8
    # adamw: decoupled decay θ ← θ − lr·wd·θ (Shortcut's optax.adamw, wd 0.1); adam/radam add wd·θ to the gradient
    weight_decay: Annotated[float, Field(ge=0)] = 0.0


class Train(Strict):
    steps: Steps
    batch: PosInt = 512                 # global batch, whatever the number of ranks
    batch_per_device: PosInt | None = None   # micro-batch per rank; the rest is gradient accumulation
    ema_decay: Annotated[float, Field(ge=0, lt=1)] = 0.999   # sampling EMA; must suit the run length (calibration.md)
    # EDM2's power-function EMA with this relative length (Karras et al. 2024, Eq. 3; sCM's ImageNet EMA): when
    # set, it replaces ema_decay by β_k = (k/(k + 1))^(γ + 1) at step k, γ from σ_rel
    ema_sigma_rel: Annotated[float, Field(gt=0, lt=0.2886)] | None = None
    checkpoint_every: Steps = 1000
    keep_checkpoints: PosInt = 2
    log_every: Steps = 100
    # seconds between progress lines on stderr when no terminal shows tqdm's bar (a job's log); 0: every step
    progress_seconds: Annotated[float, Field(ge=0)] = 30.0
    threads: PosInt = 1                 # torch intra-op threads; two 1-thread runs beat one 2-thread run on toys
    init_from: Annotated[FilePath, Field(strict=False)] | None = None   # a checkpoint whose EMA weights start this run
    # autocast dtype of the network and loss forward (fp16 adds a dynamic loss scale: cmbench.train.loop.LossScale)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    compile: bool = False               # torch.compile the network (nn.Module.compile: same state_dict keys)

    @model_validator(mode="after")
    def _micro_batches(self):
        """On one rank; the ranks of a cluster job are checked when the workflow is planned (cmbench.workflow)."""
        if self.batch_per_device is not None and self.batch % self.batch_per_device:
            raise ValueError(f"batch_per_device {self.batch_per_device} does not divide batch {self.batch}")
        return self


class Teacher(Strict):
    """The denoiser a distillation loss follows: the exact one of toy data, or a trained run of this suite."""
    source: Literal["analytic", "run"]
    variant: str | None = None          # source 'run': the teacher's variant (same suite, dataset and seed)
    init_student: bool = False          # start the student from the teacher's EMA weights (CD: papers.md §2.2)
    # source 'run': the teacher run's training hash, filled in by checks.resolve_run (never set by hand), so that the
    # student's own training hash changes, and the student retrains, whenever its teacher's training does
    hash: str | None = None

    @model_validator(mode="after")
    def _source(self):
        if self.source == "run":
            if self.variant is None:
                raise ValueError("teacher.source 'run' needs teacher.variant (e.g. edm)")
            check_name("teacher variant", self.variant)
        elif self.variant is not None or self.init_student or self.hash is not None:
            raise ValueError("teacher.source 'analytic' takes no teacher.variant, init_student or hash")
        return self


class Sample(Strict):
    n: PosInt = 10_000
    seed_start: Annotated[int, Field(ge=0)] = 0   # sample i uses seed seed_start + i: independent of batch size
    batch: PosInt = 10_000
    nfe: Annotated[list[PosInt], Field(min_length=1)] = [1, 2]   # evaluated numbers of function evaluations
    # consistency: CM Alg. 1 on the σ list; heun: EDM Alg. 1 (deterministic) over the σ list plus a last step to 0;
    # flowmap: a flow-map model's jumps along the σ list to 0, no re-noising (MeanFlow, Shortcut, IMM)
    sampler: Literal["consistency", "heun", "flowmap"] = "consistency"
    # re-noising before step k > 1: cm adds sqrt(σ_k² − σ_min²)·z (CM, iCT); plain adds σ_k·z (ECT; sCM's
    # cos(t)x + sin(t)z in σ-space) — papers.md §9.8
    renoise: Literal["cm", "plain"] = "cm"
    # clamp each step's denoised image to [−1, 1] before re-noising (the CM code's clip_denoised; ECT's does not)
    clip_denoised: bool = False
    # NFE → explicit descending σ list; "karras" (heun only) is the precond's Karras grid of (NFE + 1)/2 points
    sigmas: dict[str, Union[list[PosFloat], Literal["karras"]]] = {"1": [80.0], "2": [80.0, 0.8]}


class Evaluate(Strict):
    ref_n: PosInt = 10_000              # toy: fresh true data for data-space Fréchet / sliced W2
    floor_repeats: PosInt = 5           # draws of n true samples that estimate a metric's sampling-noise floor
    sliced_projections: PosInt = 256
    pixel_fd: bool = True               # images: Fréchet distance in pixel space (no network; off for 64×64)
    # images: how many of the sample seeds (the first, at most sample.n) the 1-step ODE error of a run with a
    # trained teacher uses (the teacher's 511-evaluation Heun solution of each is its reference: metrics.ode_ref)
    ode_n: PosInt = 64
    # images: FID backends, each reading the same sample file (cmbench.metrics.fid); needs Inception weights
    fid: list[Literal[FID_SPECS]] = []
    # clean-fid's network: its own TorchScript Inception ("own", as the CM paper's clean-fid numbers) or
    # torch-fidelity's weights file, so that the two libraries are compared on identical weights
    cleanfid_network: Literal["own", "torch-fidelity"] = "own"
    # Inception feature dimensions of the FID: 2048 (pool3, every paper's); 64, 192 or 768 (earlier pooled layers
    # of the same network, on torch-fidelity's network only) make the Fréchet distance cheap for smoke runs
    fid_dims: Literal[64, 192, 768, 2048] = 2048
    batch: PosInt = 250                 # images per feature-extraction batch
    # also evaluate the sampling EMA every this many training steps (same sampler and metrics as the final
    # weights; training keeps an EMA-only snapshot at each): learning curves. None: the final weights only
    every: Steps | None = None

    @model_validator(mode="after")
    def _dims(self):
        if self.fid_dims != 2048 and self.cleanfid_network == "own" and any(s.startswith("clean-fid") for s in self.fid):
            raise ValueError(f"fid_dims {self.fid_dims} runs on torch-fidelity's Inception only: clean-fid's own "
                             f"network gives 2048-d features (set cleanfid_network: torch-fidelity)")
        return self


class RunConfig(Strict):
    run: RunId
    dataset: Dataset
    net: Net = MLPNet()
    precond: Precond = Precond()
    loss: dict[str, Any]                # checked by cmbench.losses against the registered loss's own schema
    teacher: Teacher | None = None
    optim: Optim = Optim()
    train: Train
    sample: Sample = Sample()
    evaluate: Evaluate = Evaluate()

    @model_validator(mode="after")
    def _sigma_lists(self):
        p, heun = self.precond, self.sample.sampler == "heun"
        for nfe in self.sample.nfe:
            sigmas = self.sample.sigmas.get(str(nfe))
            if sigmas is None:
                raise ValueError(f"sample.nfe lists {nfe} but sample.sigmas has no list for it")
            if sigmas == "karras":
                if not heun or nfe % 2 == 0:
                    raise ValueError(f"sample.sigmas[{nfe!r}] = 'karras' needs the heun sampler and an odd NFE")
                continue
            if (2 * len(sigmas) - 1 if heun else len(sigmas)) != nfe:
                raise ValueError(f"sample.sigmas[{nfe!r}] has {len(sigmas)} sigmas, which is not NFE {nfe} "
                                 f"with the {self.sample.sampler} sampler")
            if sigmas[0] > p.sigma_max or sigmas[-1] <= p.sigma_min or sorted(sigmas, reverse=True) != sigmas:
                raise ValueError(f"sample.sigmas[{nfe!r}] = {sigmas} must descend within "
                                 f"(sigma_min {p.sigma_min}, sigma_max {p.sigma_max}]")
        flowmap = self.precond.name == "flowmap"
        if (self.sample.sampler == "flowmap") != flowmap or (self.net.time2 != "none") != flowmap:
            raise ValueError("precond 'flowmap', sample.sampler 'flowmap' and a two-time net (net.time2 'concat' or "
                             "'add') go together: set all three or none")
        image = isinstance(self.dataset, ImageData)
        if image != (self.net.name != "mlp"):
            raise ValueError(f"net '{self.net.name}' does not fit {'image' if image else 'toy'} data "
                             f"({'unet or adm' if image else 'mlp'} does)")
        if not image and (self.evaluate.fid or not self.evaluate.pixel_fd or self.sample.clip_denoised):
            raise ValueError("evaluate.fid, evaluate.pixel_fd and sample.clip_denoised are for image data")
        if self.dataset.conditional and self.net.name != "adm":
            raise ValueError(f"conditional data needs the class-conditional net 'adm', not {self.net.name!r}")
        if image and self.teacher is not None and self.teacher.source == "analytic":
            raise ValueError("teacher.source 'analytic' needs toy data (image data has no exact denoiser): "
                             "use source 'run'")
        if "name" not in self.loss or not isinstance(self.loss["name"], str):
            raise ValueError("loss.name is required (a registered loss)")
        return self

    def deterministic(self, nfe: int) -> bool:
        """Whether a sample is a function of its initial noise alone (one step, an ODE solver, flow-map jumps): it
        then has an exact endpoint to be compared with (the ODE error's floor is 0)."""
        return nfe == 1 or self.sample.sampler in ("heun", "flowmap")

    def metric_sets(self) -> list[str]:
        """What one evaluation job computes, each in its own record file: "data" (exact-ground-truth metrics of
        toy data, pixel-space FD of images) and each FID backend."""
        sets = [] if isinstance(self.dataset, ImageData) and not self.evaluate.pixel_fd else ["data"]
        return sets + list(self.evaluate.fid)

    def evaluated_steps(self) -> list[int]:
        """The training steps whose sampling EMA is evaluated before the last (evaluate.every), oldest first."""
        every = self.evaluate.every
        return list(range(every, self.train.steps, every)) if every else []

    def sigma_list(self, nfe: int) -> list[float]:
        """The explicit, descending σ list of the sampler at this NFE."""
        sigmas, p = self.sample.sigmas[str(nfe)], self.precond
        if sigmas == "karras":
            return karras_sigmas((nfe + 1) // 2, p.sigma_min, p.sigma_max, p.rho)[::-1]
        return list(sigmas)

    def to_dict(self) -> dict:
        return self.model_dump(mode="json")

    def _hashed(self) -> dict:
        """to_dict() less the fields added after runs existed, while at their defaults: their hashes stay."""
        d = self.to_dict()
        for block, defaults in UNHASHED_DEFAULTS.items():
            for key, default in defaults.items():
                if d[block][key] == default:
                    del d[block][key]
        return d

    @property
    def hash(self) -> str:
        """The training hash, which checkpoints and final weights carry: every field but sampling, evaluation and
        RESOURCES, so that a run is retrained (and its old artifacts set aside) only when its training changes."""
        d = self._hashed()
        del d["sample"], d["evaluate"]
        for key in RESOURCES["train"]:
            d["train"].pop(key, None)
        return config_hash(d)

    def sample_hash(self, nfe: int) -> str:
        """What the sample file of one NFE depends on (its npz and metric records carry it): the training hash, this
        NFE's σ list and the sampling settings but sample.nfe's other entries and RESOURCES."""
        s = {k: v for k, v in self.sample.model_dump(mode="json").items()
             if k not in ("nfe", "sigmas", *RESOURCES["sample"])}
        return config_hash({"train": self.hash, "nfe": nfe, "sigmas": self.sigma_list(nfe), **s})

    @property
    def content_hash(self) -> str:
        """The whole config's hash: what RUN/config.json is checked against."""
        return config_hash(self._hashed())

    def saved(self) -> dict:
        """RUN/config.json: the whole config with its hashes (training, each NFE's samples, the whole)."""
        return {"hash": self.hash, "sample_hashes": {str(n): self.sample_hash(n) for n in self.sample.nfe},
                "content_hash": self.content_hash, "config": self.to_dict()}


# how a run is carried out (cores, memory per device, how often it saves and logs), not what it computes: a run
# resumed or re-planned with other values goes on (bit-identical, or within float round-off for the batch splits;
# samples and features do not depend on their batch size, DESIGN.md property 5), so no hash covers them
RESOURCES = {"train": ("batch_per_device", "threads", "checkpoint_every", "keep_checkpoints", "log_every",
                       "progress_seconds", "compile"),
             "sample": ("batch",)}

# fields added later, left out of every hash while at these defaults (what ran before they existed): fp32, no
# compile, a one-time net, no flow-map model, no weight decay
UNHASHED_DEFAULTS = {"train": {"precision": "fp32", "compile": False}, "net": {"time2": "none"},
                     "precond": {"flowmap": None}, "optim": {"weight_decay": 0.0}}


def config_hash(d: dict) -> str:
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


class YamlLoader(yaml.SafeLoader):
    """YAML as a person writes it, for every config file and override: `3e-4`, `1e10` and `-2E+5` are floats (YAML
    1.2; PyYAML's YAML 1.1 reads an exponent without a dot or sign as a string), and a key given twice in one
    mapping is an error (PyYAML keeps the last one silently)."""

    def construct_mapping(self, node, deep=False):
        seen = {}     # key → its line; the keys a `<<` merge brings in may be overridden, as YAML says
        for key_node, _ in node.value:
            key = None if key_node.tag == "tag:yaml.org,2002:merge" else self.construct_object(key_node, deep=True)
            if not isinstance(key, (str, int, float, bool)):
                continue
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first on line {seen[key] + 1})", key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep)


YamlLoader.add_implicit_resolver(   # only the exponent forms YAML 1.1 misses; its float resolver comes first
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."))


def parse_yaml(text: str):
    return yaml.load(text, Loader=YamlLoader)


def yaml_error(e: yaml.YAMLError) -> str:
    """A YAML error in one line, with the line it is on."""
    if isinstance(e, yaml.MarkedYAMLError) and e.problem_mark is not None:
        return f"line {e.problem_mark.line + 1}: {e.problem}"
    return " ".join(str(e).split())


def load_yaml(path: Path) -> dict:
    try:
        data = parse_yaml(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({yaml_error(e)})") from None
    if data is None:
        raise ConfigError(f"{path}: empty (a config file is a mapping of keys; write {{}} to set nothing)")
    return mapping(data, str(path))


def mapping(layer: Any, where: str) -> dict:
    """A layer of the merge: a mapping, or nothing (None)."""
    if layer is not None and not isinstance(layer, dict):
        raise ConfigError(f"{where}: must be a mapping of keys, not {type(layer).__name__}")
    return layer or {}


# top-level blocks whose tag picks a schema: a block with another tag replaces the lower one, since its keys are
# another net's, dataset kind's or loss's; every other block (precond, optim, ...) merges key by key, so that
# a value set low (configs/defaults.yaml) reaches every variant that does not set it itself
SCHEMA_TAGS = {"dataset": "kind", "net": "name", "loss": "name"}


def deep_merge(base: dict, over: dict, top: bool = True) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        lower, tag = out.get(k), SCHEMA_TAGS.get(k) if top else None
        merge = isinstance(v, dict) and isinstance(lower, dict)
        if merge and tag is not None and v.get(tag, lower.get(tag)) != lower.get(tag):
            merge = False
        out[k] = deep_merge(lower, v, top=False) if merge else copy.deepcopy(v)
    return out


def parse_overrides(items: list[str] | str | None) -> dict:
    """`key.path=value` strings (value parsed as YAML) → nested dict. A string (Snakemake's `--config set=...`)
    holds items separated by spaces, split as a shell would: quotes keep a value with spaces together. Setting a
    key twice keeps the last value; setting a key and a key inside it is an error (which one was meant?)."""
    if items is None or items == "":
        return {}
    if isinstance(items, str):
        try:
            items = shlex.split(items)
        except ValueError as e:
            raise ConfigError(f"overrides {items!r}: {e}") from None
    if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
        raise ConfigError(f"overrides must be key.path=value strings, got {items!r} "
                          f"(e.g. --set train.steps=100, or --config set='train.steps=100 optim.lr=3e-4')")
    out: dict = {}
    given: dict[tuple, str] = {}       # key path → the item that set it
    for item in items:
        key, sep, value = item.partition("=")
        path = tuple(key.split("."))
        if not sep or not all(path):
            raise ConfigError(f"override {item!r} is not of the form key.path=value with non-empty keys "
                              f"(e.g. train.steps=100)")
        for other, earlier in given.items():
            if other != path and other[:len(path)] == path[:len(other)]:
                raise ConfigError(f"overrides {earlier!r} and {item!r} conflict: one sets "
                                  f"{'.'.join(min(other, path, key=len))} as a whole, the other a key inside it")
        given[path] = item
        try:
            parsed = parse_yaml(value)
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: value is not valid YAML ({yaml_error(e)})") from None
        node = out
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = parsed
    return out


def format_validation_error(e: ValidationError, where: str) -> str:
    err = e.errors()[0]
    loc = ".".join(str(x) for x in err["loc"] if not str(x).startswith("function-after"))
    if err["type"] == "extra_forbidden":
        return f"{where}: unknown key '{loc}'"
    more = f" (and {len(e.errors()) - 1} more)" if len(e.errors()) > 1 else ""
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] in ("value_error", "missing"):   # a cross-field check names the values; a missing key has none
        return f"{where}: {loc + ': ' if loc else ''}{msg}{more}"
    got = repr(err.get("input"))
    return f"{where}: {loc}: {msg} (got {got if len(got) <= 80 else got[:77] + '...'}){more}"


def schema_defaults() -> dict:
    """The lowest layer of the merge: the schema's default blocks (net, precond, optim, sample, evaluate), so that a
    layer above merges into them like into any other (e.g. `sample.sigmas.2` keeps the default list for NFE 1)."""
    return {k: f.default.model_dump(mode="json") for k, f in RunConfig.model_fields.items()
            if isinstance(f.default, BaseModel)}


class Experiment:
    """configs/: experiment.yaml (suites), defaults.yaml, datasets/*.yaml, variants/*.yaml."""

    def __init__(self, root: str | Path = "configs"):
        self.root = Path(root)
        self.suites = load_yaml(self.root / "experiment.yaml").get("suites") or {}
        if not isinstance(self.suites, dict):
            raise ConfigError(f"{self.root / 'experiment.yaml'}: 'suites' must be a mapping")

    def suite(self, name: str) -> dict:
        check_name("suite", name)
        where = f"{self.root / 'experiment.yaml'}: suite '{name}'"
        if name not in self.suites:
            raise ConfigError(f"{where}: no such suite (known: {', '.join(sorted(self.suites))})")
        s = self.suites[name]
        allowed = {"variants", "datasets", "seeds"}
        if not isinstance(s, dict) or set(s) - allowed - {"settings"} or not allowed <= set(s):
            raise ConfigError(f"{where}: must have the keys {sorted(allowed)} and may have 'settings'")
        mapping(s.get("settings"), f"{where}: settings")
        for key in ("variants", "datasets"):
            if not isinstance(s[key], list) or not s[key]:
                raise ConfigError(f"{where}: {key} must be a non-empty list")
            for n in s[key]:
                check_name(key[:-1], n)
        if not isinstance(s["seeds"], list) or not s["seeds"] or not all(isinstance(v, int) and v >= 0 for v in s["seeds"]):
            raise ConfigError(f"{where}: seeds must be a non-empty list of non-negative integers")
        return s

    def _named(self, kind: str, name: str) -> dict:
        path = self.root / f"{kind}s" / f"{check_name(kind, name)}.yaml"
        if not path.exists():
            known = sorted(p.stem for p in (self.root / f"{kind}s").glob("*.yaml"))
            raise ConfigError(f"{path}: no such {kind} (known: {', '.join(known)})")
        return load_yaml(path)

    def scale(self, name: str) -> dict:
        """configs/scales/<name>.yaml: what a scale changes (sizes only), as layers `all`, `per_dataset`,
        `per_variant` applied in that order above the variant's blocks and below the command line."""
        data = self._named("scale", name)
        layers = {"all", "per_dataset", "per_variant"}
        if set(data) - layers:
            raise ConfigError(f"{self.root}/scales/{name}.yaml: unknown key(s) {sorted(set(data) - layers)} "
                              f"(known: {sorted(layers)})")
        for key in ("per_dataset", "per_variant"):
            if not isinstance(data.get(key) or {}, dict):
                raise ConfigError(f"{self.root}/scales/{name}.yaml: {key} must be a mapping")
        return data

    def resolve(self, suite: str, dataset: str, variant: str, seed: int, overrides: dict | None = None,
                scale: str | None = None) -> RunConfig:
        check_name("suite", suite)       # a path component of the run dir
        where = f"config {suite}/{dataset}/{variant}/s{seed}" + (f" (scale {scale})" if scale else "")
        merged = deep_merge(schema_defaults(), load_yaml(self.root / "defaults.yaml"))
        merged = deep_merge(merged, self._named("dataset", dataset))
        variant_cfg, vfile = self._named("variant", variant), self.root / "variants" / f"{variant}.yaml"
        per_kind, per_dataset = (mapping(variant_cfg.pop(k, None), f"{vfile}: {k}")
                                 for k in ("per_kind", "per_dataset"))
        merged = deep_merge(merged, variant_cfg)
        kind = merged["dataset"].get("kind") if isinstance(merged.get("dataset"), dict) else None
        # a suite's own settings (e.g. one budget for every variant) sit above the variants, below a scale
        suite_cfg = self.suites.get(suite) if isinstance(self.suites.get(suite), dict) else {}
        layers = [(per_kind.get(kind), f"{vfile}: per_kind.{kind}"),
                  (per_dataset.get(dataset), f"{vfile}: per_dataset.{dataset}"),
                  (suite_cfg.get("settings"), f"{self.root / 'experiment.yaml'}: suite '{suite}' settings")]
        if scale is not None:
            sc, sfile = self.scale(scale), self.root / "scales" / f"{scale}.yaml"
            layers += [(sc.get("all"), f"{sfile}: all"),
                       ((sc.get("per_dataset") or {}).get(dataset), f"{sfile}: per_dataset.{dataset}"),
                       ((sc.get("per_variant") or {}).get(variant), f"{sfile}: per_variant.{variant}")]
        for layer, at in [*layers, (overrides, "--set")]:
            merged = deep_merge(merged, mapping(layer, at))
        if "run" in merged:
            raise ConfigError(f"{where}: 'run' is not a setting (the suite's experiment.yaml entry names the runs)")
        merged["run"] = {"suite": suite, "dataset": dataset, "variant": variant, "seed": seed}
        try:
            return RunConfig.model_validate(merged)
        except ValidationError as e:
            raise ConfigError(format_validation_error(e, where)) from None


def write_run_config(cfg: RunConfig, rdir: str | Path) -> bool:
    """Write RUN/config.json (the config and its hashes, computed once; atomically), the one address every stage
    reads. An unchanged file is not rewritten, so nothing downstream of it is re-run; returns whether it changed.
    Artifacts of an earlier config are set aside when training starts (cmbench.checkpoint)."""
    path, saved = paths.config_file(rdir), cfg.saved()
    try:
        if json.loads(path.read_text()) == saved:
            return False
    except FileNotFoundError:
        pass
    except ValueError as e:     # damaged (torn, truncated): keep it, write anew
        print(f"cmbench: {path}: damaged ({type(e).__name__}); set aside as {io.set_aside(path).name} and "
              f"rewritten", file=sys.stderr)
    io.write_text(path, json.dumps(saved, indent=2))
    return True


def load_run_config(rdir: str | Path) -> RunConfig:
    """The resolved config of a run dir (its config.json, written when the workflow was planned)."""
    path = paths.config_file(rdir)
    try:
        saved = json.loads(path.read_text())
        cfg = RunConfig.model_validate_json(json.dumps(saved["config"]))
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file (plan the run first: snakemake, or cmbench resolve --write)") from None
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{path}: damaged, not a run config ({type(e).__name__}): re-run snakemake (or cmbench "
                          f"resolve --write) to set it aside and write it anew") from None
    if cfg.content_hash != saved.get("content_hash"):
        raise ConfigError(f"{path}: its config hashes to {cfg.content_hash}, not the stored "
                          f"{saved.get('content_hash')} (edited by hand, or written by another version of cmbench): "
                          f"re-run snakemake to write it anew")
    return cfg


# how `cmbench launch` runs a stage (cmbench.launch): in this process, submitit's debug or local executor, Slurm
LAUNCHERS = ("inline", "debug", "local", "slurm")


JobKind = Literal["teacher", "train", "sample", "evaluate"]


class SlurmJob(Strict):
    partition: str | None = None
    account: str | None = None
    nodes: PosInt = 1                        # a training job's ranks may span nodes (tasks_per_node on each)
    gpus_per_node: Annotated[int, Field(ge=0)] = 0
    tasks_per_node: PosInt | None = None     # ranks of a training job; None: one per GPU (one without GPUs)
    cpus_per_task: PosInt = 1
    mem_gb: PosFloat = 4.0
    timeout_min: PosInt = 60


class LaunchConfig(Strict):
    """configs/launch/*.yaml: the longest wait between two polls, and the resources of each kind of job: `jobs` for
    every suite, and under `suites.NAME` the keys that differ for one suite (merged into `jobs` per kind)."""
    poll_s: PosFloat = 30.0
    jobs: dict[JobKind, SlurmJob]
    suites: dict[str, dict[JobKind, SlurmJob]] = {}

    @model_validator(mode="before")
    @classmethod
    def _merge_suites(cls, data: Any) -> Any:
        """Each suite's entry becomes whole: its keys over those of `jobs`, kind by kind (anything that is not a
        mapping is left as it is, for the field validation to name)."""
        jobs, suites = (data.get(k) if isinstance(data, dict) else None for k in ("jobs", "suites"))
        if not isinstance(jobs, dict) or not isinstance(suites, dict):
            return data

        def whole(over):
            over = {} if over is None else over        # `toy:` alone: the suite takes `jobs` as they are
            if not isinstance(over, dict):
                return over
            return {kind: {**jobs[kind], **over[kind]} if isinstance(jobs.get(kind), dict)
                    and isinstance(over.get(kind), dict) else over.get(kind, jobs.get(kind))
                    for kind in {**jobs, **over}}

        return {**data, "suites": {name: whole(over) for name, over in suites.items()}}

    @model_validator(mode="after")
    def _every_kind(self) -> "LaunchConfig":
        missing = [k for k in JobKind.__args__ if k not in self.jobs]
        if missing:
            raise ValueError(f"jobs: no entry for {', '.join(missing)} (every job kind needs its resources)")
        return self

    def job(self, suite: str, kind: str) -> SlurmJob:
        """The resources of one kind of job of a suite."""
        return self.suites.get(suite, self.jobs)[kind]


def load_launch_config(path: str | Path) -> LaunchConfig:
    try:
        return LaunchConfig.model_validate(load_yaml(Path(path)))
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, str(path))) from None
