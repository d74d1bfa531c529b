"""Stand-in copies of the paper datasets in their real on-disk formats, with random pixels: what the smoke scale
(`--config scale=smoke`) and the tests run the CIFAR-10 and ImageNet 64 suites on where the datasets are absent.
They exercise the real loaders (python pickles, npz batches with labels); their FIDs mean nothing.

    python -m cmbench.data.synthetic cifar10 DIR       # DIR/cifar-10-batches-py/data_batch_1..5 (+ test_batch)
    python -m cmbench.data.synthetic imagenet64 DIR    # DIR/train_data_batch_1..10.npz (data, labels 1..1000, mean)
"""
import pickle
import sys
from pathlib import Path

import numpy as np

from cmbench.data.images import CIFAR_BATCHES, CIFAR_DIR, IMAGENET_BATCHES, IMAGENET_CLASSES


def write_cifar10(root: str | Path, per_batch: int = 8, seed: int = 0) -> Path:
    """The python-pickle archive's directory (dicts with b"data" [n, 3072] uint8 CHW-flattened, b"labels")."""
    d = Path(root) / CIFAR_DIR
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name in (*CIFAR_BATCHES, "test_batch"):
        batch = {b"batch_label": name.encode(), b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
                 b"labels": rng.integers(0, 10, per_batch).tolist(),
                 b"filenames": [f"{name}_{i}.png".encode() for i in range(per_batch)]}
        (d / name).write_bytes(pickle.dumps(batch))
    return d


def write_imagenet64(root: str | Path, per_batch: int = 4, seed: int = 0) -> Path:
    """train_data_batch_1..10.npz of the downsampled release: `data` [n, 12288] uint8 CHW-flattened, `labels`
    1..1000, `mean` [12288]."""
    d = Path(root)
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name in IMAGENET_BATCHES:
        data = rng.integers(0, 256, (per_batch, 3 * 64 * 64), dtype=np.uint8)
        np.savez(d / name, data=data, labels=rng.integers(1, IMAGENET_CLASSES + 1, per_batch),
                 mean=data.mean(axis=0))
    return d


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("cifar10", "imagenet64"):
        sys.exit("usage: python -m cmbench.data.synthetic cifar10|imagenet64 DIR")
    print({"cifar10": write_cifar10, "imagenet64": write_imagenet64}[sys.argv[1]](sys.argv[2]))
