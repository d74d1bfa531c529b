"""FID (metric "fid") through torch-fidelity or clean-fid, offline, from local Inception weights.

Backends, each named by a spec string:

    "torch-fidelity"               torch-fidelity's InceptionV3 ("inception-v3-compat"): TF1-compatible bilinear
                                   resize to 299 inside the network, 2048-d pool features
    "clean-fid/legacy_tensorflow"  clean-fid, resize inside the network (meant to match the TF original)
    "clean-fid/clean"              clean-fid, PIL bicubic resize to 299 on float images before the network

`network` picks the Inception weights clean-fid runs: "own" is clean-fid's TorchScript file
(inception-2015-12-05.pt, loaded with InceptionV3W(download=False)); "torch-fidelity" is torch-fidelity's network
and weights file, wrapped as clean-fid's custom feature extractor (clean-fid still does its own per-mode
preprocessing), so that both libraries can be compared on identical weights. torch-fidelity always runs its own
network. Every record says which network and weights file (with its sha256 prefix) were used, and whether the file
is the official one (`weights_verified`).

Weights come from the directory in $CMBENCH_WEIGHTS (default: weights/ relative to the working directory) and are
never downloaded: a missing file raises MissingWeights with the path, the URL the library would fetch it from, and
the variable to set. A file whose SHA-256 is not the official one raises UnverifiedWeights before it is loaded,
unless CMBENCH_UNVERIFIED_WEIGHTS=1. For a dry run without the real weights, `write_random_inception` writes a
He-initialised torch-fidelity InceptionV3 (real architecture and keys; it needs that opt-in); FID values from it
mean nothing beyond the tests.

Statistics and the Fréchet distance are each library's own: torch-fidelity's fid_features_to_statistics and
fid_statistics_to_metric, clean-fid's fid_from_feats formula and frechet_distance. With the same network,
"torch-fidelity" and "clean-fid/legacy_tensorflow" agree to rounding; "clean-fid/clean" differs by design.

torch and the FID libraries are imported inside the functions: importing this module is cheap.
"""
from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from functools import lru_cache
from importlib.metadata import version
from pathlib import Path

import numpy as np

from cmbench import io
from cmbench.config import config_hash
from cmbench.io import file_sha256
from cmbench.metrics.keys import FID, FID_SPECS
from cmbench.errors import DamagedFile, MissingWeights, UnverifiedWeights
from cmbench.metrics.files import read_npz, set_aside

SPECS = FID_SPECS
NETWORKS = ("own", "torch-fidelity")
WEIGHTS_ENV = "CMBENCH_WEIGHTS"
DEFAULT_WEIGHTS_DIR = "weights"
# torch-fidelity's InceptionV3 state dict. The name is pytorch-fid's; torch-fidelity's URL serves the file as
# weights-inception-2015-12-05-6726825d.pth (same sha256 prefix), which is accepted too.
TF_WEIGHTS = "pt_inception-2015-12-05-6726825d.pth"
TF_WEIGHTS_ALIASES = ("weights-inception-2015-12-05-6726825d.pth",)
CF_WEIGHTS = "inception-2015-12-05.pt"  # clean-fid's TorchScript file (the name InceptionV3W loads)
# Official SHA-256 of each weights file, compared before any load (torch-fidelity unpickles its file with
# weights_only=False and clean-fid's is TorchScript: loading either can run code). torch-fidelity's file (also served
# as pytorch-fid's pt_inception-…, the same bytes): its name carries the first 8 hex digits of its SHA-256
# (torch.hub's convention); the full value is the one independent users of the file publish beside it (95,628,359
# bytes) and it starts with those 8 digits. clean-fid's file: no published SHA-256 was found, so cmbench cannot
# verify it and accepts it only with the opt-in below.
OFFICIAL_SHA256 = {TF_WEIGHTS: "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2", CF_WEIGHTS: None}
UNVERIFIED_ENV = "CMBENCH_UNVERIFIED_WEIGHTS"   # "1": accept other weights (tests, dry runs); records say so
TF_EXTRACTOR = "inception-v3-compat"
DIMS = 2048         # the FID features: Inception's 2048-d pool (every paper's)
# torch-fidelity's InceptionV3 also gives spatially pooled features after earlier blocks: FID on them is the same
# code path with a smaller Fréchet distance (clean-fid's scipy sqrtm of 2048 × 2048 takes ~15 s on 2 CPU cores;
# the smoke scale uses 64). Feature dims → the last module of torch-fidelity's forward() before that feature.
FEATURE_LAYERS = {64: "MaxPool_1", 192: "MaxPool_2", 768: "Mixed_6e", 2048: "AvgPool"}
SIZE = 299
# torch-fidelity's InceptionV3 modules from the input to the 2048-d pool, in the order its forward() runs them
_TF_TRUNK = ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "MaxPool_1", "Conv2d_3b_1x1", "Conv2d_4a_3x3",
             "MaxPool_2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d",
             "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c", "AvgPool")


# ----------------------------------------------------------------------------------------------------- backends

@dataclass(frozen=True)
class Backend:
    spec: str
    library: str          # "torch-fidelity" | "clean-fid"
    mode: str | None      # clean-fid's mode; None for torch-fidelity (it has one preprocessing path)
    network: str          # whose Inception runs: "torch-fidelity" | "clean-fid"

    @property
    def library_version(self) -> str:
        return version(self.library)

    @property
    def slug(self) -> str:
        """File-name part: the spec, and the network where it is not the library's own."""
        s = self.spec.replace("/", "-")
        return s if self.network == self.library else f"{s}-net-{self.network}"

    def weights_path(self) -> Path:
        return tf_weights_path() if self.network == "torch-fidelity" else cf_weights_path()


def backend(spec: str, network: str = "own") -> Backend:
    if spec not in SPECS:
        raise ValueError(f"unknown FID backend {spec!r}; choose one of {', '.join(SPECS)}")
    if network not in NETWORKS:
        raise ValueError(f"unknown FID network {network!r}; choose one of {', '.join(NETWORKS)}")
    if spec == "torch-fidelity":
        return Backend(spec, "torch-fidelity", None, "torch-fidelity")
    return Backend(spec, "clean-fid", spec.split("/", 1)[1], "clean-fid" if network == "own" else "torch-fidelity")


# ------------------------------------------------------------------------------------------------------ weights

def weights_dir() -> Path:
    return Path(os.environ.get(WEIGHTS_ENV) or DEFAULT_WEIGHTS_DIR)


def tf_weights_path() -> Path:
    """torch-fidelity's InceptionV3 weights (state dict) in the weights directory, or MissingWeights."""
    d = weights_dir()
    for name in (TF_WEIGHTS, *TF_WEIGHTS_ALIASES):
        if (d / name).is_file():
            verify_weights(d / name)
            return d / name
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
    raise MissingWeights(
        f"{(d / TF_WEIGHTS).absolute()}: torch-fidelity InceptionV3 weights not found (nothing is downloaded); "
        f"get them from {URL_INCEPTION_V3} and save them under that name (or keep the name "
        f"{TF_WEIGHTS_ALIASES[0]}), or point {WEIGHTS_ENV} to the directory that holds them")


def cf_weights_path() -> Path:
    """clean-fid's TorchScript Inception in the weights directory, or MissingWeights."""
    p = weights_dir() / CF_WEIGHTS
    if p.is_file():
        verify_weights(p)
        return p
    from cleanfid.downloads_helper import inception_url
    raise MissingWeights(
        f"{p.absolute()}: clean-fid Inception weights not found (nothing is downloaded); get them from "
        f"{inception_url} and save them under that name, or point {WEIGHTS_ENV} to the directory that holds them")


def verify_weights(path: Path) -> bool:
    """True for the official file; False for another file accepted with CMBENCH_UNVERIFIED_WEIGHTS=1; otherwise
    UnverifiedWeights, before anything loads the file."""
    sha = file_sha256(path)
    official = OFFICIAL_SHA256[CF_WEIGHTS if path.name == CF_WEIGHTS else TF_WEIGHTS]
    if sha == official:
        return True
    if os.environ.get(UNVERIFIED_ENV) == "1":
        return False
    why = (f"its SHA-256 {sha[:16]}… is not the official file's {official[:16]}…" if official
           else "cmbench knows no official SHA-256 for this file")
    raise UnverifiedWeights(
        f"{path.absolute()}: refused and not loaded (loading a weights file can run code): {why}; put the official "
        f"file there, or set {UNVERIFIED_ENV}=1 to accept unverified weights (the records say weights_verified: false)")


def write_random_inception(path: str | Path, seed: int = 0) -> Path:
    """Write a randomly initialised torch-fidelity InceptionV3 state dict (its own class, keys and shapes) to path,
    loadable with feature_extractor_weights_path: for tests and offline dry runs. Conv weights are He (kaiming-normal,
    fan-in) initialised: with PyTorch's default init the features are ~1e-8 and every FID would be 0."""
    import torch
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class Skeleton(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict=True, assign=False):  # build the architecture, load nothing
            return None

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    empty = path.with_name(f".{path.name}.{os.getpid()}.empty")
    try:
        torch.save({}, empty)  # a local path, so the constructor never reaches for its download URL
        net = Skeleton(TF_EXTRACTOR, [str(DIMS)], feature_extractor_weights_path=str(empty))
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for m in net.modules():
                if isinstance(m, torch.nn.Conv2d):
                    torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu", generator=g)
                elif isinstance(m, torch.nn.Linear):
                    torch.nn.init.normal_(m.weight, std=m.in_features ** -0.5, generator=g)
                    torch.nn.init.zeros_(m.bias)
        io.save_torch(path, net.state_dict())
    finally:
        empty.unlink(missing_ok=True)
    return path


# ----------------------------------------------------------------------------------------------------- features

def as_rgb(images) -> np.ndarray:
    """uint8 [N, H, W, 3]; grayscale ([N, H, W] or [N, H, W, 1]) is repeated to three channels."""
    x = np.asarray(images)
    if x.dtype != np.uint8:
        raise ValueError(f"FID images must be uint8 in 0..255, got {x.dtype}")
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise ValueError(f"FID images must be [N, H, W, C] with C = 1 or 3, got shape {x.shape}")
    if x.shape[-1] == 1:
        x = np.repeat(x, 3, axis=-1)
    return np.ascontiguousarray(x)


def check_dims(dims: int, network: str = "own", specs=SPECS) -> None:
    if dims not in FEATURE_LAYERS:
        raise ValueError(f"FID features of {dims} dimensions: choose one of {sorted(FEATURE_LAYERS)}")
    if dims != DIMS and network == "own" and any(backend(s).library == "clean-fid" for s in specs):
        raise ValueError(f"clean-fid's own TorchScript Inception gives {DIMS}-d features only: {dims}-d needs "
                         f"evaluate.cleanfid_network 'torch-fidelity'")


def features(images, spec: str, *, device="cpu", batch_size: int = 64, network: str = "own",
             dims: int = DIMS) -> np.ndarray:
    """Pool features [N, dims] (float64 holding the network's float32 values exactly) of uint8 NHWC images,
    through the backend's own preprocessing path."""
    b = backend(spec, network)
    check_dims(dims, network, [spec])
    x = as_rgb(images)
    if len(x) == 0:
        raise ValueError("FID needs at least one image")
    if b.library == "torch-fidelity":
        f = _tf_features(x, device, batch_size, dims)
    else:
        f = _cf_features(x, b, device, batch_size, dims)
    return f.astype(np.float64)


def _device(device):
    import torch
    return torch.device(device)


@contextmanager
def _on(dev):
    """Make dev the current CUDA device (torch-fidelity moves its network with .cuda())."""
    import torch
    with torch.cuda.device(dev) if dev.type == "cuda" else nullcontext():
        yield


@lru_cache(maxsize=2)
def _tf_extractor(path: str, sha: str, device: str, dims: int):
    from torch_fidelity.utils import create_feature_extractor
    dev = _device(device)
    with _on(dev):
        return create_feature_extractor(TF_EXTRACTOR, [str(dims)], cuda=dev.type == "cuda",
                                        feature_extractor_weights_path=path, verbose=False)


def _tf_net(device, dims: int = DIMS):
    p = tf_weights_path()
    return _tf_extractor(str(p), file_sha256(p), str(_device(device)), dims)


def uint8_dataset(x: np.ndarray):
    """torch-fidelity input: a Dataset of uint8 [3, H, W] tensors."""
    import torch

    class Images(torch.utils.data.Dataset):
        def __len__(self):
            return len(x)

        def __getitem__(self, i):
            return torch.from_numpy(np.ascontiguousarray(x[i].transpose(2, 0, 1)))

    return Images()


def _tf_features(x: np.ndarray, device, batch_size: int, dims: int = DIMS) -> np.ndarray:
    from torch_fidelity.utils import get_featuresdict_from_dataset
    dev = _device(device)
    net = _tf_net(dev, dims)
    with _on(dev):
        fd = get_featuresdict_from_dataset(uint8_dataset(x), net, batch_size, dev.type == "cuda",
                                           True, False)  # save_cpu_ram (no DataLoader workers), verbose
    return fd[str(dims)].numpy()


def _tf_net_for_cleanfid(device, resize_inside: bool, dims: int = DIMS):
    """torch-fidelity's network as a clean-fid feature extractor: float [B, 3, H, W] in 0..255 -> [B, dims].
    Same contract as clean-fid's InceptionV3W: resize inside (legacy_tensorflow; here torch-fidelity's
    TF1-compatible bilinear resize) or expect 299x299 (clean). Runs torch-fidelity's own modules in its forward()'s
    order up to the feature's layer, spatially averaged as torch-fidelity does, without its uint8 check (clean
    mode hands over non-integer values)."""
    import torch
    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x
    net = _tf_net(device, dims)
    trunk = _TF_TRUNK[:_TF_TRUNK.index(FEATURE_LAYERS[dims]) + 1]

    def fn(x):
        x = x.to(net.feature_extractor_internal_dtype)
        if resize_inside:
            x = interpolate_bilinear_2d_like_tensorflow1x(x, size=(SIZE, SIZE), align_corners=False)
        elif tuple(x.shape[2:]) != (SIZE, SIZE):
            raise ValueError(f"expected {SIZE}x{SIZE} images from clean-fid, got {tuple(x.shape)}")
        x = (x - 128) / 128
        for name in trunk:
            x = getattr(net, name)(x)
        if dims != DIMS:
            x = torch.nn.functional.adaptive_avg_pool2d(x, output_size=(1, 1))
        return torch.flatten(x, 1).to(torch.float32)

    return fn


@lru_cache(maxsize=2)
def _cf_model(dirname: str, sha: str, device: str, resize_inside: bool):
    from cleanfid.inception_torchscript import InceptionV3W
    return InceptionV3W(dirname, download=False, resize_inside=resize_inside).to(_device(device)).eval()


def _cf_extractor(b: Backend, device, dims: int = DIMS):
    resize_inside = b.mode == "legacy_tensorflow"  # as cleanfid.features.build_feature_extractor
    if b.network == "torch-fidelity":
        return _tf_net_for_cleanfid(device, resize_inside, dims)
    p = cf_weights_path()
    model = _cf_model(str(p.parent), file_sha256(p), str(_device(device)), resize_inside)
    return lambda x: model(x)


class _Batches:
    """A clean-fid 'generator' G(z) that returns the next batch of the given images as float [B, 3, H, W] in
    0..255 (z is ignored). clean-fid always asks for full batches and keeps the first num_gen features: the last
    batch is padded by repeating the last image."""

    def __init__(self, x: np.ndarray, batch_size: int):
        self.x, self.batch_size, self.i = x, batch_size, 0

    def __call__(self, z):
        import torch
        b = self.x[self.i:self.i + self.batch_size]
        self.i += self.batch_size
        if len(b) < self.batch_size:
            b = np.concatenate([b, np.repeat(b[-1:], self.batch_size - len(b), axis=0)])
        return torch.from_numpy(b.transpose(0, 3, 1, 2).astype(np.float32))


def _cf_features(x: np.ndarray, b: Backend, device, batch_size: int, dims: int = DIMS) -> np.ndarray:
    import torch
    from cleanfid.fid import get_model_features
    dev = _device(device)
    fn = _cf_extractor(b, dev, dims)
    n = len(x)
    bs = math.ceil(n / math.ceil(n / batch_size))  # same number of batches, least padding
    with torch.random.fork_rng(devices=[]):  # clean-fid draws latents we do not use: leave the caller's RNG alone
        return get_model_features(_Batches(x, bs), fn, mode=b.mode, z_dim=1, num_gen=n, batch_size=bs, device=dev,
                                  verbose=False)


# ------------------------------------------------------------------------------------ statistics and distance

def stats(feats: np.ndarray, spec: str = "torch-fidelity") -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) as the backend's library computes them: from the float32 features (the float64 values of
    `features` convert back exactly), mu float32, sigma float64 (np.cov)."""
    import torch
    f = np.asarray(feats, dtype=np.float32)
    if f.ndim != 2 or len(f) < 2:
        raise ValueError(f"FID statistics need features [N >= 2, D], got shape {f.shape}")
    if backend(spec).library == "torch-fidelity":
        from torch_fidelity.metric_fid import fid_features_to_statistics
        s = fid_features_to_statistics(torch.from_numpy(f))
        return s["mu"], s["sigma"]
    return np.mean(f, axis=0), np.cov(f, rowvar=False)  # as cleanfid.fid.fid_from_feats


def frechet(mu1, sigma1, mu2, sigma2, spec: str = "torch-fidelity") -> float:
    """Fréchet distance with the backend library's own function."""
    if backend(spec).library == "torch-fidelity":
        from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric
        return float(fid_statistics_to_metric({"mu": mu1, "sigma": sigma1}, {"mu": mu2, "sigma": sigma2},
                                              False)[KEY_METRIC_FID])
    from cleanfid.fid import frechet_distance
    return float(frechet_distance(mu1, sigma1, mu2, sigma2))


# ------------------------------------------------------------------------------------------ reference statistics

def backend_fields(spec: str, network: str = "own", dims: int = DIMS) -> dict:
    """What reference statistics depend on besides the dataset: backend, network, exact weights file, version, and
    the feature dimensions where they are not the 2048 of FID."""
    b = backend(spec, network)
    w = b.weights_path()
    return {"spec": spec, "network": b.network, "weights": w.name, "weights_sha256": file_sha256(w),
            "library": b.library, "library_version": b.library_version, **({"dims": dims} if dims != DIMS else {})}


def reference_key_fields(key: dict, spec: str, network: str = "own", dims: int = DIMS) -> dict:
    return {"dataset": key, **backend_fields(spec, network, dims)}


def reference_key(key: dict, spec: str, network: str = "own", dims: int = DIMS) -> str:
    """Short sha256 of the caller's dataset description together with the backend fields."""
    return config_hash(reference_key_fields(key, spec, network, dims))


def build_reference(images_fn: Callable[[], np.ndarray], spec: str, key: str, out: str | Path, *, device="cpu",
                    batch_size: int = 64, network: str = "own", fields: dict | None = None,
                    dims: int = DIMS) -> Path:
    """Compute (mu, sigma, n) of images_fn()'s images and write them to out atomically (cmbench.io), with the key and
    the fields it was made from (at least the backend fields, which fid_npz checks)."""
    fields = {**backend_fields(spec, network, dims), **(fields or {})}
    f = features(images_fn(), spec, device=device, batch_size=batch_size, network=network, dims=dims)
    mu, sigma = stats(f, spec)
    return io.save_npz(out, mu=mu, sigma=sigma, n=len(f), key=key, fields=json.dumps(fields, sort_keys=True))


def reference_stats(images_fn: Callable[[], np.ndarray], spec: str, key: dict, cache_dir: str | Path, *,
                    device="cpu", batch_size: int = 64, network: str = "own", dims: int = DIMS) -> Path:
    """Path of the cached (mu, sigma, n) of the reference images for this backend, computed on a miss only
    (images_fn() is called then, never on a hit): {cache_dir}/{backend}-{reference_key}.npz."""
    fields = reference_key_fields(key, spec, network, dims)
    h = config_hash(fields)
    out = Path(cache_dir) / f"{backend(spec, network).slug}-{h}.npz"
    if out.exists():
        try:
            load_reference(out)
            return out
        except DamagedFile as e:
            set_aside(out, str(e).split(": ", 1)[1])
    return build_reference(images_fn, spec, h, out, device=device, batch_size=batch_size, network=network,
                           fields=fields, dims=dims)


def load_reference(path: str | Path) -> dict:
    z = read_npz(path, ("mu", "sigma", "n", "key", "fields"), fix="delete it (it is rebuilt)")
    return {"mu": z["mu"], "sigma": z["sigma"], "n": int(z["n"]), "key": str(z["key"]),
            "fields": json.loads(str(z["fields"]))}


# -------------------------------------------------------------------------------------------------- evaluation

def fid_npz(npz_path: str | Path, reference_file: str | Path, spec: str, *, device="cpu", batch_size: int = 64,
            network: str = "own", dims: int = DIMS) -> dict:
    """FID of the images in a sample file (key `images`, uint8 NHWC) against cached reference statistics made by
    `reference_stats` with the same backend, network and weights. Returns the value and the fields of a metric
    record."""
    t0 = time.perf_counter()
    b = backend(spec, network)
    w = b.weights_path()
    sha = file_sha256(w)
    ref = load_reference(reference_file)
    k = ref["fields"]
    if (k["spec"], k["network"], k["weights_sha256"], k.get("dims", DIMS)) != (spec, b.network, sha, dims):
        raise ValueError(f"{reference_file}: reference statistics made with {k['spec']} on the {k['network']} network "
                         f"(weights sha256 {k['weights_sha256'][:12]}, {k.get('dims', DIMS)}-d), not {spec} on the "
                         f"{b.network} network (weights sha256 {sha[:12]}, {dims}-d)")
    images = read_npz(npz_path, ("images",))["images"]
    f = features(images, spec, device=device, batch_size=batch_size, network=network, dims=dims)
    mu, sigma = stats(f, spec)
    value = frechet(mu, sigma, ref["mu"], ref["sigma"], spec)
    return {"metric": FID, "value": value, "backend": b.library, "backend_version": b.library_version,
            "mode": b.mode, "network": b.network,
            "feature_extractor": f"{b.network} InceptionV3 {'pool3' if dims == DIMS else FEATURE_LAYERS[dims] + ' pooled'} "
                                 f"({dims}-d), weights {w.name} sha256:{sha[:12]}", "fid_dims": dims,
            "weights_file": w.name, "weights_sha256": sha[:12], "weights_verified": verify_weights(w),
            "n_gen": len(f), "n_ref": ref["n"],
            "reference_key": ref["key"], "wall_s": time.perf_counter() - t0}


if __name__ == "__main__":
    import sys
    if len(sys.argv) != 3 or sys.argv[1] != "random-inception":
        sys.exit(f"usage: python -m cmbench.metrics.fid random-inception DIR   (writes DIR/{TF_WEIGHTS}: a "
                 f"He-initialised torch-fidelity InceptionV3 for offline dry and smoke runs, used with "
                 f"{UNVERIFIED_ENV}=1; its FIDs mean nothing)")
    print(write_random_inception(Path(sys.argv[2]) / TF_WEIGHTS))
