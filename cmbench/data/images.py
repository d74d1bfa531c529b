"""Image datasets of the image suites: uint8 images held in memory, training batches in [−1, 1], channels first.

`make_image_data(cfg)` loads a dataset once (an [N, H, W, C] uint8 numpy array, shared with a torch uint8
view); `check_image_data(cfg)` is the dry-run check, which reads only names, sizes and array headers.

Sources (cmbench.config.ImageData.source):

- digits: scikit-learn's bundled 8×8 digits (1797 images, values 0..16), mapped to 0..255 as round(v·255/16).
  A resolution other than 8 resizes them bilinearly (antialiased when shrinking; upsampling is plain bilinear)
  and rounds back to uint8. One channel.
- patches: real photos with CIFAR-10's shape. 32×32 RGB crops of the photos bundled offline with
  scikit-learn (china.jpg, flower.jpg, 427×640) and matplotlib (grace_hopper.jpg, 600×512; left out when
  matplotlib is not installed, which changes the crop set: `ImageDataset.info` lists the photos used). Each
  photo is first shrunk to one of PATCH_SCALES (0.25 … 1, geometric) so that a crop shows most of a small
  object at the coarse scales and texture at the fine ones; each crop draws a photo, a scale and a position
  uniformly from numpy's default_rng(PATCH_SEED), so the first k crops are the same whatever cfg.size, the
  number of crops (default 50,000: about 0.4 s with the photo decoding).
  No flips are baked in: xflip is a training-time option. The crops are reproducible for a given
  Pillow/libjpeg (JPEG decoding may differ in the last bit between decoder versions).
- cifar10: cfg.path is any of
    * the directory `cifar-10-batches-py` of the python archive (data_batch_1 … data_batch_5, each a pickle of
      {b"data": [10000, 3072] uint8 CHW-flattened, b"labels": [...]}), or a directory that contains it;
    * the archive `cifar-10-python.tar.gz` itself, or a directory that contains it: members are read in
      memory, nothing is extracted;
    * an image folder: .png/.jpg/.jpeg/.bmp/.webp files found recursively (hidden files skipped), taken in
      sorted order of their relative paths, each 32×32 and converted to RGB;
    * an .npz file with key `images` (or `x`, or `data`): uint8 [N, 32, 32, 3], [N, 3, 32, 32] or
      [N, 3072] CHW-flattened.
  Only the training set is read (test_batch is ignored). The pickles are unpickled with a restricted
  unpickler that admits numpy arrays and nothing else.
- imagenet64: cfg.path is either the directory of the "downsampled ImageNet 64×64" release,
  train_data_batch_1.npz … train_data_batch_10.npz (each with `data` [n, 12288] uint8 CHW-flattened and
  `labels`), a single .npz in that layout (`data`) or with `images` [N, 64, 64, 3], or an image folder as
  above. All 1,281,167 training images take 15.7 GB of RAM as uint8, plus one batch file (~1.6 GB) while
  loading: fine on a cluster node, not on a laptop (use cfg.size to take fewer). With cfg.conditional the
  class labels come from each npz's `labels` (the release's 1..1000, mapped to 0..999; any other value is an
  error); an image folder carries no labels.

cfg.size takes the first `size` images (patches: the number of crops); asking for more than there are is an
error. Relative paths are relative to the working directory; `~` is expanded. Loading errors and dry-run check
errors are ConfigError with a one-line message that names the path.
"""
from __future__ import annotations

import io
import os
import pickle
import tarfile
import zipfile
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from cmbench.config import ConfigError, ImageData

if TYPE_CHECKING:
    import torch

DIGITS_COUNT = 1797
PATCH_SIZE = 32
PATCH_DEFAULT_COUNT = 50_000
PATCH_SEED = 20240531
PATCH_SCALES = tuple(float(s) for s in np.geomspace(0.25, 1.0, 5))   # 0.25, 0.354, 0.5, 0.707, 1
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
NPZ_KEYS = ("images", "x", "data")
CIFAR_DIR = "cifar-10-batches-py"
CIFAR_TAR = "cifar-10-python.tar.gz"
CIFAR_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
IMAGENET_BATCHES = tuple(f"train_data_batch_{i}.npz" for i in range(1, 11))

EXPECTED = {
    "cifar10": f"expected {CIFAR_DIR}/data_batch_1..5 (or a directory holding it), {CIFAR_TAR}, "
               f"an image folder or an npz with 'images'",
    "imagenet64": "expected a directory of train_data_batch_1..10.npz, an npz with 'data' [N, 12288] or "
                  "'images' [N, 64, 64, 3], or an image folder",
}


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": ")


class ImageDataset:
    """Images held once in memory as uint8 [N, H, W, C]; batches come out as float32 [n, C, H, W] in [−1, 1],
    with their class labels (int64 [n]) when the dataset has them."""

    def __init__(self, images: np.ndarray, xflip: bool = False, info: dict | None = None,
                 labels: np.ndarray | None = None):
        import torch

        if images.dtype != np.uint8 or images.ndim != 4:
            raise ValueError(f"images must be uint8 [N, H, W, C], got {images.dtype} {list(images.shape)}")
        if labels is not None and labels.shape != (len(images),):
            raise ValueError(f"labels must be [N] for {len(images)} images, got {list(labels.shape)}")
        self._images = np.ascontiguousarray(images)
        self._torch = torch.from_numpy(self._images)      # shares memory with the numpy array
        self.labels = None if labels is None else torch.from_numpy(np.ascontiguousarray(labels, dtype=np.int64))
        self.xflip = bool(xflip)
        self.info = dict(info or {})
        _, h, w, c = self._images.shape
        self.shape = (c, h, w)
        self.dim = c * h * w

    def __len__(self) -> int:
        return self._images.shape[0]

    def __repr__(self) -> str:
        return f"ImageDataset({self.info.get('source', '?')}, n={len(self)}, shape={self.shape}, xflip={self.xflip})"

    def images_uint8(self) -> np.ndarray:
        """All images, uint8 [N, H, W, C], unflipped: the reference set of FID and pixel-space Fréchet
        distance. A read-only view of the dataset's own memory (no copy)."""
        view = self._images.view()
        view.flags.writeable = False
        return view

    def sample_batch(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
        """n images drawn uniformly with replacement, float32 [n, C, H, W] in [−1, 1] on generator.device, and
        their labels (int64 [n], or None without labels).

        All randomness comes from `generator`, on its device: first the n indices (torch.randint); then, only
        when xflip is on, n flip bits (torch.randint over {0, 1}), each flipping its image horizontally. So
        xflip on and off consume the generator differently after the indices, and a CUDA generator gives
        other draws than a CPU one with the same seed; the same generator state always gives the same batch.
        """
        import torch

        device = generator.device
        idx = torch.randint(len(self), (n,), generator=generator, device=device)
        flip = torch.randint(2, (n,), generator=generator, device=device).bool() if self.xflip else None
        x = self._torch.index_select(0, idx.cpu()).to(device)          # [n, H, W, C] uint8
        x = x.permute(0, 3, 1, 2).contiguous().float().div_(127.5).sub_(1.0)
        if flip is not None:
            x = torch.where(flip[:, None, None, None], x.flip(3), x)
        labels = None if self.labels is None else self.labels.index_select(0, idx.cpu()).to(device)
        return x, labels

    def sample_torch(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """The images of sample_batch."""
        return self.sample_batch(n, generator)[0]


# ---------------------------------------------------------------------------------------------- array checks

def _to_nhwc(arr: np.ndarray, res: int, ch: int, where: str) -> np.ndarray:
    """uint8 [N, res, res, ch] from NHWC, NCHW, [N, ch·res·res] CHW-flattened or (one channel) [N, res, res]."""
    want = f"uint8 [N, {res}, {res}, {ch}], [N, {ch}, {res}, {res}] or [N, {ch * res * res}] (CHW-flattened)"
    if arr.dtype != np.uint8:
        raise ConfigError(f"{where}: expected {want}, got dtype {arr.dtype}")
    s = arr.shape
    if arr.ndim == 2 and s[1] == ch * res * res:
        return arr.reshape(s[0], ch, res, res).transpose(0, 2, 3, 1)
    if arr.ndim == 3 and ch == 1 and s[1:] == (res, res):
        return arr[..., None]
    if arr.ndim == 4 and s[1:] == (res, res, ch):
        return arr
    if arr.ndim == 4 and s[1:] == (ch, res, res):
        return arr.transpose(0, 2, 3, 1)
    raise ConfigError(f"{where}: expected {want}, got shape {list(s)}")


def _shape_ok(shape: tuple, res: int, ch: int) -> bool:
    return ((len(shape) == 2 and shape[1] == ch * res * res) or (len(shape) == 4 and shape[1:] in
            ((res, res, ch), (ch, res, res))) or (len(shape) == 3 and ch == 1 and shape[1:] == (res, res)))


def _take(images: np.ndarray, size: int | None, where: str) -> np.ndarray:
    if size is not None:
        if size > len(images):
            raise ConfigError(f"{where}: size {size} asks for more than the {len(images)} images there are")
        images = images[:size]
    return images


# ------------------------------------------------------------------------------------------------ npz files

def _npz_headers(path: Path) -> dict[str, tuple[tuple, np.dtype]]:
    """{key: (shape, dtype)} of an .npz, read from the .npy headers only (nothing is loaded)."""
    out = {}
    try:
        with zipfile.ZipFile(path) as zf:
            for name in zf.namelist():
                if not name.endswith(".npy"):
                    continue
                with zf.open(name) as f:
                    version = np.lib.format.read_magic(f)
                    if version == (1, 0):
                        shape, _, dtype = np.lib.format.read_array_header_1_0(f)
                    elif version == (2, 0):
                        shape, _, dtype = np.lib.format.read_array_header_2_0(f)
                    else:
                        shape, _, dtype = np.lib.format._read_array_header(f, version)
                out[name[:-4]] = (tuple(shape), np.dtype(dtype))
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise ConfigError(f"{path}: not a readable npz ({_one_line(e)})") from None
    return out


def _npz_key(path: Path, headers: dict, res: int, ch: int, keys=NPZ_KEYS) -> str:
    for key in keys:
        if key in headers:
            shape, dtype = headers[key]
            if dtype != np.uint8 or not _shape_ok(shape, res, ch):
                raise ConfigError(f"{path}: '{key}' is {dtype} {list(shape)}, expected uint8 [N, {res}, {res}, {ch}], "
                                  f"[N, {ch}, {res}, {res}] or [N, {ch * res * res}]")
            return key
    raise ConfigError(f"{path}: npz has keys {sorted(headers)}, expected one of {list(keys)}")


def _npz_array(path: Path, key: str) -> np.ndarray:
    try:
        with np.load(path, allow_pickle=False) as z:
            return z[key]
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise ConfigError(f"{path}: cannot read '{key}' ({_one_line(e)})") from None


def _load_npz_files(paths: list[Path], keys, res: int, ch: int, size: int | None, where: str) -> np.ndarray:
    """Concatenate the image arrays of several npz files into one preallocated array (peak memory: the result
    plus one file's array), stopping once `size` images are in."""
    found = []
    for p in paths:
        headers = _npz_headers(p)
        found.append((p, _npz_key(p, headers, res, ch, keys), headers))
    total = sum(h[k][0][0] for _, k, h in found)
    n = total if size is None else size
    if n > total:
        raise ConfigError(f"{where}: size {size} asks for more than the {total} images there are")
    out = np.empty((n, res, res, ch), np.uint8)
    i = 0
    for p, key, _ in found:
        if i >= n:
            break
        arr = _to_nhwc(_npz_array(p, key), res, ch, f"{p} '{key}'")
        k = min(len(arr), n - i)
        out[i:i + k] = arr[:k]
        i += k
        del arr
    return out


IMAGENET_CLASSES = 1000


def _load_npz_labels(paths: list[Path], n: int, where: str) -> np.ndarray:
    """The first n class labels of the npz files' `labels` (downsampled ImageNet's 1..1000) as int64 0..999."""
    parts, got = [], 0
    for p in paths:
        if got >= n:
            break
        arr = np.asarray(_npz_array(p, "labels")).reshape(-1)
        parts.append(arr[:n - got])
        got += len(parts[-1])
    labels = np.concatenate(parts).astype(np.int64) if parts else np.empty(0, np.int64)
    if len(labels) != n:
        raise ConfigError(f"{where}: {len(labels)} labels for {n} images")
    if len(labels) and (labels.min() < 1 or labels.max() > IMAGENET_CLASSES):
        raise ConfigError(f"{where}: labels span {labels.min()}..{labels.max()}, expected the release's "
                          f"1..{IMAGENET_CLASSES}")
    return labels - 1


def _check_npz_labels(path: Path, headers: dict, count: int) -> None:
    if "labels" not in headers:
        raise ConfigError(f"{path}: conditional data needs 'labels' (npz has {sorted(headers)})")
    shape = headers["labels"][0]
    if len(shape) != 1 or shape[0] != count or headers["labels"][1].kind not in "iu":
        raise ConfigError(f"{path}: 'labels' is {headers['labels'][1]} {list(shape)}, expected integers [{count}]")


# ---------------------------------------------------------------------------------------- CIFAR-10 pickles

class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, bytes and numpy arrays; refuses any other global (a pickle can run code)."""
    ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")} | {
        (f"numpy.{core}.{mod}", name) for core in ("core", "_core")
        for mod, name in (("multiarray", "_reconstruct"), ("multiarray", "scalar"), ("numeric", "_frombuffer"))}

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR-10 batch")


def _unpickle_batch(f, where: str) -> np.ndarray:
    try:
        d = _ArrayUnpickler(f, encoding="bytes").load()
        data = d[b"data"] if b"data" in d else d["data"]
    except Exception as e:  # noqa: BLE001 - any corrupt pickle becomes one config error
        raise ConfigError(f"{where}: not a CIFAR-10 python batch ({_one_line(e)})") from None
    return _to_nhwc(np.asarray(data), 32, 3, where)


def _load_cifar_dir(d: Path, size: int | None) -> np.ndarray:
    parts = []
    for name in CIFAR_BATCHES:
        with open(d / name, "rb") as f:
            parts.append(_unpickle_batch(f, str(d / name)))
        if size is not None and sum(map(len, parts)) >= size:
            break
    return _take(np.concatenate(parts), size, str(d))


def _load_cifar_tar(path: Path, size: int | None) -> np.ndarray:
    got = {}

    def enough() -> bool:        # batches 1..k all in and holding `size` images (all five when size is None)
        n = 0
        for name in CIFAR_BATCHES:
            if name not in got:
                return False
            n += len(got[name])
            if size is not None and n >= size:
                return True
        return True

    try:
        with tarfile.open(path, "r|*") as tf:         # streamed: members in archive order, no seeking
            for m in tf:
                base = m.name.rsplit("/", 1)[-1]
                if m.isfile() and base in CIFAR_BATCHES and base not in got:
                    got[base] = _unpickle_batch(io.BytesIO(tf.extractfile(m).read()), f"{path}:{m.name}")
                    if enough():
                        break
    except (OSError, tarfile.TarError, EOFError) as e:
        raise ConfigError(f"{path}: not a readable tar archive ({_one_line(e)})") from None
    parts = []
    for name in CIFAR_BATCHES:
        if size is not None and sum(map(len, parts)) >= size:
            break
        if name not in got:
            raise ConfigError(f"{path}: archive lacks {name}")
        parts.append(got[name])
    return _take(np.concatenate(parts), size, str(path))


@lru_cache(maxsize=16)
def _tar_batches(path: str, mtime_ns: int, nbytes: int) -> frozenset[str]:
    """Basenames of the data_batch_* members of a tar archive (a pass over the headers, cached per file)."""
    found = set()
    try:
        with tarfile.open(path, "r|*") as tf:
            for m in tf:
                base = m.name.rsplit("/", 1)[-1]
                if m.isfile() and base in CIFAR_BATCHES:
                    found.add(base)
                    if len(found) == len(CIFAR_BATCHES):
                        break
    except (OSError, tarfile.TarError, EOFError) as e:
        raise ConfigError(f"{path}: not a readable tar archive ({_one_line(e)})") from None
    return frozenset(found)


# -------------------------------------------------------------------------------------------- image folders

def _image_files(d: Path, first_only: bool = False) -> list[Path]:
    out = []
    for root, dirs, files in os.walk(d):
        dirs[:] = sorted(x for x in dirs if not x.startswith("."))
        for name in sorted(files):
            if not name.startswith(".") and name.lower().endswith(IMAGE_SUFFIXES):
                out.append(Path(root) / name)
                if first_only:
                    return out
    return sorted(out, key=lambda p: p.relative_to(d).as_posix())


def _read_image(path: Path, res: int, ch: int) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as im:
            if im.size != (res, res):
                raise ConfigError(f"{path}: image is {im.size[0]}×{im.size[1]}, expected {res}×{res}")
            arr = np.asarray(im.convert("L" if ch == 1 else "RGB"), dtype=np.uint8)
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001
        raise ConfigError(f"{path}: not a readable image ({_one_line(e)})") from None
    return arr.reshape(res, res, ch)


def _load_folder(d: Path, res: int, ch: int, size: int | None) -> np.ndarray:
    files = _image_files(d)
    if not files:
        raise ConfigError(f"{d}: no {'/'.join(IMAGE_SUFFIXES)} images in this folder")
    files = _take(np.asarray(files, dtype=object), size, str(d))
    out = np.empty((len(files), res, res, ch), np.uint8)

    def read(i):
        out[i] = _read_image(files[i], res, ch)

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:   # PIL decodes without the GIL
        list(pool.map(read, range(len(files))))
    return out


# -------------------------------------------------------------------------------------------- layout detect

def _layout(cfg: ImageData) -> tuple[str, Path]:
    """(layout, resolved path) of a cifar10 / imagenet64 path, from names alone; ConfigError when unrecognised."""
    path = Path(os.path.expanduser(cfg.path))
    bad = f"{cfg.source} path {path}"
    if not path.exists():
        raise ConfigError(f"{bad}: no such file or directory")
    if path.is_file():
        name = path.name.lower()
        if name.endswith(".npz"):
            return "npz", path
        if cfg.source == "cifar10" and name.endswith((".tar.gz", ".tgz", ".tar")):
            return "tar", path
        raise ConfigError(f"{bad}: {EXPECTED[cfg.source]}")
    if cfg.source == "cifar10":
        for d in (path, path / CIFAR_DIR):
            present = [n for n in CIFAR_BATCHES if (d / n).is_file()]
            if present:
                if len(present) < len(CIFAR_BATCHES):
                    missing = sorted(set(CIFAR_BATCHES) - set(present))
                    raise ConfigError(f"{bad}: {d} lacks {', '.join(missing)} (expected data_batch_1..5)")
                return "cifar-dir", d
        if (path / CIFAR_TAR).is_file():
            return "tar", path / CIFAR_TAR
    else:
        present = [n for n in IMAGENET_BATCHES if (path / n).is_file()]
        if present:
            if len(present) < len(IMAGENET_BATCHES):
                missing = sorted(set(IMAGENET_BATCHES) - set(present), key=IMAGENET_BATCHES.index)
                raise ConfigError(f"{bad}: lacks {', '.join(missing)} (expected train_data_batch_1..10.npz)")
            return "imagenet-dir", path
    if _image_files(path, first_only=True):
        return "folder", path
    raise ConfigError(f"{bad}: {EXPECTED[cfg.source]}")


def _npz_files(layout: str, path: Path) -> list[Path]:
    """The npz files of an `npz` or `imagenet-dir` layout."""
    return [path] if layout == "npz" else [path / n for n in IMAGENET_BATCHES]


def _imagenet_keys(source: str) -> tuple[str, ...]:
    return ("data",) if source == "imagenet-dir" else NPZ_KEYS


def check_image_data(cfg: ImageData) -> None:
    """Dry-run check of a dataset config without loading it: the path exists, its layout is recognised, the
    required files are present and array headers (npz) or the first image (folder) have the configured shape.
    Reads at most a few headers; a tar.gz archive's member list is read once per process (about a second for
    CIFAR-10's 163 MB). Raises ConfigError with a one-line message naming the path."""
    res, ch = cfg.resolution, cfg.channels
    if cfg.source == "digits":
        if cfg.size is not None and cfg.size > DIGITS_COUNT:
            raise ConfigError(f"digits: size {cfg.size} asks for more than the {DIGITS_COUNT} images there are")
        return
    if cfg.source == "patches":
        return
    layout, path = _layout(cfg)
    if cfg.conditional and layout not in ("npz", "imagenet-dir"):
        raise ConfigError(f"{cfg.source} path {path}: conditional data needs npz files with 'labels' "
                          f"(a {layout} layout carries none)")
    try:
        if layout == "npz" or layout == "imagenet-dir":
            files = _npz_files(layout, path)
            total = 0
            for p in files:
                headers = _npz_headers(p)
                key = _npz_key(p, headers, res, ch, _imagenet_keys(layout))
                total += headers[key][0][0]
                if cfg.conditional:
                    _check_npz_labels(p, headers, headers[key][0][0])
            if cfg.size is not None and cfg.size > total:
                raise ConfigError(f"{path}: size {cfg.size} asks for more than the {total} images there are")
        elif layout == "tar":
            st = path.stat()
            found = _tar_batches(str(path), st.st_mtime_ns, st.st_size)
            if len(found) < len(CIFAR_BATCHES):
                missing = sorted(set(CIFAR_BATCHES) - found)
                raise ConfigError(f"{path}: archive lacks {', '.join(missing)} ({EXPECTED['cifar10']})")
        elif layout == "folder":
            _read_image_header(_image_files(path, first_only=True)[0], res)
    except ConfigError as e:    # the helpers' messages start with the file at fault
        raise ConfigError(f"{cfg.source} path {e}") from None


def _read_image_header(path: Path, res: int) -> None:
    from PIL import Image

    try:
        with Image.open(path) as im:     # lazy: reads the header, not the pixels
            size = im.size
    except Exception as e:  # noqa: BLE001
        raise ConfigError(f"{path}: not a readable image ({_one_line(e)})") from None
    if size != (res, res):
        raise ConfigError(f"{path}: image is {size[0]}×{size[1]}, expected {res}×{res}")


# ------------------------------------------------------------------------------------------------- sources

def _resize(images: np.ndarray, h: int, w: int) -> np.ndarray:
    """uint8 [N, H, W, C] → uint8 [N, h, w, C]: bilinear, antialiased when shrinking, rounded."""
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(np.require(images, requirements=["C", "W"])).permute(0, 3, 1, 2).float()
    y = F.interpolate(x, size=(h, w), mode="bilinear", antialias=True, align_corners=False)
    return y.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def _load_digits(res: int) -> np.ndarray:
    from sklearn.datasets import load_digits

    images = np.rint(load_digits().images * (255.0 / 16.0)).astype(np.uint8)[..., None]   # [1797, 8, 8, 1]
    return images if res == 8 else _resize(images, res, res)


def _photos() -> list[tuple[str, np.ndarray]]:
    """The photos bundled with scikit-learn and (when installed) matplotlib, uint8 [H, W, 3]."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    bunch = load_sample_images()
    out = [(Path(f).name, np.asarray(im, dtype=np.uint8)) for f, im in zip(bunch.filenames, bunch.images)]
    try:
        from matplotlib import cbook

        path = cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)
        with Image.open(path) as im:
            out.append((Path(path).name, np.asarray(im.convert("RGB"), dtype=np.uint8)))
    except (ImportError, OSError, ValueError):
        pass
    return out


def _make_patches(n: int) -> tuple[np.ndarray, list[str]]:
    from PIL import Image

    photos = _photos()
    p = PATCH_SIZE
    levels = []                                      # levels[i][j]: photo i shrunk by PATCH_SCALES[j]
    for _, img in photos:
        h, w = img.shape[:2]
        pil = Image.fromarray(img)
        levels.append([img if s == 1.0 else   # Pillow's bilinear widens its support when shrinking (antialiased)
                       np.asarray(pil.resize((max(p, round(w * s)), max(p, round(h * s))), Image.BILINEAR))
                       for s in PATCH_SCALES])
    # One row of uniforms per crop (photo, scale, y, x): the first k crops do not depend on n.
    u = np.random.default_rng(PATCH_SEED).random((n, 4))
    photo = (u[:, 0] * len(photos)).astype(np.int64)
    level = (u[:, 1] * len(PATCH_SCALES)).astype(np.int64)
    out = np.empty((n, p, p, 3), np.uint8)
    for i in range(len(photos)):
        for j in range(len(PATCH_SCALES)):
            sel = np.flatnonzero((photo == i) & (level == j))
            if not len(sel):
                continue
            img = levels[i][j]
            h, w = img.shape[:2]
            y0 = (u[sel, 2] * (h - p + 1)).astype(np.int64)
            x0 = (u[sel, 3] * (w - p + 1)).astype(np.int64)
            windows = np.lib.stride_tricks.sliding_window_view(img, (p, p, 3))   # [h', w', 1, p, p, 3], no copy
            out[sel] = windows[y0, x0, 0]
    return out, [name for name, _ in photos]


def _load_path(cfg: ImageData, layout: str, path: Path) -> np.ndarray:
    res, ch = cfg.resolution, cfg.channels
    if layout == "cifar-dir":
        return _load_cifar_dir(path, cfg.size)
    if layout == "tar":
        return _load_cifar_tar(path, cfg.size)
    if layout == "folder":
        return _load_folder(path, res, ch, cfg.size)
    return _load_npz_files(_npz_files(layout, path), _imagenet_keys(layout), res, ch, cfg.size, str(path))


def make_image_data(cfg: ImageData) -> ImageDataset:
    """Load the images of `cfg` (once; see the module docstring for sources and layouts)."""
    images, info, labels = load_images(cfg)
    return ImageDataset(images, xflip=cfg.xflip, info=info, labels=labels)


def load_images(cfg: ImageData) -> tuple[np.ndarray, dict, np.ndarray | None]:
    """The images of `cfg` as uint8 [N, H, W, C], a description of their source and their labels (or None),
    without torch (unless a digits resolution other than 8 needs resizing): what the report's pictures read."""
    info, labels = {"source": cfg.source}, None
    if cfg.source == "digits":
        images = _take(_load_digits(cfg.resolution), cfg.size, "digits")
    elif cfg.source == "patches":
        images, info["photos"] = _make_patches(cfg.size or PATCH_DEFAULT_COUNT)
    else:
        layout, path = _layout(cfg)
        info.update(path=str(path), layout=layout)
        try:
            images = _load_path(cfg, layout, path)
            if cfg.conditional:
                labels = _load_npz_labels(_npz_files(layout, path), len(images), str(path))
        except ConfigError as e:    # the helpers' messages start with the file at fault
            raise ConfigError(f"{cfg.source} path {e}") from None
    where = f"{cfg.source}" + (f" path {info['path']}" if "path" in info else "")
    images = _to_nhwc(np.asarray(images), cfg.resolution, cfg.channels, where)   # dtype and shape, whatever the source
    return images, info, labels
