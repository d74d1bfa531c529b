"""Image datasets (cmbench.data.images): bundled sources, every on-disk layout, sampling, dry-run checks."""
import io
import pickle
import tarfile
import time
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from cmbench.config import ConfigError, ImageData
from cmbench.data import images as img_mod
from cmbench.data.images import check_image_data, make_image_data


def cfg(source, resolution=None, channels=None, **kw):
    res, ch = {"digits": (8, 1), "patches": (32, 3), "cifar10": (32, 3), "imagenet64": (64, 3)}[source]
    return ImageData(kind="image", source=source, resolution=resolution or res, channels=channels or ch, **kw)


@pytest.fixture(scope="module")
def digits():
    return make_image_data(cfg("digits"))


# ------------------------------------------------------------------------------------------------- digits

def test_digits_images(digits):
    x = digits.images_uint8()
    assert x.shape == (1797, 8, 8, 1) and x.dtype == np.uint8
    assert x.min() == 0 and x.max() == 255
    assert len(digits) == 1797 and digits.shape == (1, 8, 8) and digits.dim == 64
    assert not x.flags.writeable                    # the reference set cannot be modified by accident
    from sklearn.datasets import load_digits
    np.testing.assert_array_equal(x[..., 0], np.rint(load_digits().images * 255 / 16).astype(np.uint8))


def test_sample_torch_range_shape_determinism(digits):
    x = digits.sample_torch(300, torch.Generator().manual_seed(1))
    assert x.shape == (300, 1, 8, 8) and x.dtype == torch.float32 and x.is_contiguous()
    assert x.min() >= -1 and x.max() <= 1 and x.min() == -1 and x.max() == 1
    assert torch.equal(x, digits.sample_torch(300, torch.Generator().manual_seed(1)))
    assert not torch.equal(x, digits.sample_torch(300, torch.Generator().manual_seed(2)))
    # every sample is a dataset image mapped exactly by x/127.5 − 1
    u8 = ((x + 1) * 127.5).round().to(torch.uint8)
    assert torch.equal(u8.float() / 127.5 - 1, x)
    known = {im.tobytes() for im in digits.images_uint8().transpose(0, 3, 1, 2)}
    assert all(im.numpy().tobytes() in known for im in u8)


def test_sample_torch_indices_follow_generator(digits):
    g = torch.Generator().manual_seed(5)
    idx = torch.randint(len(digits), (16,), generator=torch.Generator().manual_seed(5))
    expect = torch.from_numpy(digits.images_uint8().copy())[idx].permute(0, 3, 1, 2).float() / 127.5 - 1
    assert torch.equal(digits.sample_torch(16, g), expect)


def test_xflip():
    data = make_image_data(cfg("digits", xflip=True))
    ref = torch.from_numpy(data.images_uint8().copy()).permute(0, 3, 1, 2).float() / 127.5 - 1
    n = 400
    g = torch.Generator().manual_seed(3)
    idx = torch.randint(len(data), (n,), generator=torch.Generator().manual_seed(3))
    x = data.sample_torch(n, g)
    plain = (x == ref[idx]).flatten(1).all(1)
    flipped = (x == ref[idx].flip(3)).flatten(1).all(1)
    assert (plain | flipped).all()
    assert (flipped & ~plain).sum() > n // 4 and (plain & ~flipped).sum() > n // 4
    assert torch.equal(x, data.sample_torch(n, torch.Generator().manual_seed(3)))   # flips are reproducible
    assert (data.images_uint8() == make_image_data(cfg("digits")).images_uint8()).all()   # no flips in the reference


def test_digits_resized_and_size():
    data = make_image_data(cfg("digits", resolution=16, size=100))
    x = data.images_uint8()
    assert x.shape == (100, 16, 16, 1) and x.dtype == np.uint8 and data.shape == (1, 16, 16)
    # bilinear upsampling keeps each image's mean brightness and its range
    orig = make_image_data(cfg("digits", size=100)).images_uint8()
    assert np.abs(x.mean((1, 2, 3)) - orig.mean((1, 2, 3))).max() < 8
    assert x.min() == 0 and x.max() == 255
    assert data.sample_torch(4, torch.Generator().manual_seed(0)).shape == (4, 1, 16, 16)


# ------------------------------------------------------------------------------------------------ patches

def test_patches_deterministic_and_varied():
    a = make_image_data(cfg("patches", size=2000))
    b = make_image_data(cfg("patches", size=2000))
    x = a.images_uint8()
    assert x.shape == (2000, 32, 32, 3) and x.dtype == np.uint8 and a.shape == (3, 32, 32)
    np.testing.assert_array_equal(x, b.images_uint8())
    assert x.std() > 30                              # real images, not a constant
    assert np.median(x.reshape(2000, -1).std(1)) > 5      # most crops have content
    assert len(np.unique(x.reshape(2000, -1), axis=0)) > 1900
    assert {"china.jpg", "flower.jpg"} <= set(a.info["photos"])


def test_patches_default_count():
    t = time.perf_counter()
    data = make_image_data(cfg("patches"))
    assert len(data) == 50_000
    assert time.perf_counter() - t < 10
    np.testing.assert_array_equal(data.images_uint8()[:2000], make_image_data(cfg("patches", size=2000)).images_uint8())


# --------------------------------------------------------------------------------------------- cifar10

N_PER_BATCH = 4


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    """A synthetic CIFAR-10 in every supported layout, all holding the same 20 images."""
    root = tmp_path_factory.mktemp("cifar")
    images = np.random.default_rng(0).integers(0, 256, (5 * N_PER_BATCH, 32, 32, 3), dtype=np.uint8)
    chw = images.transpose(0, 3, 1, 2).reshape(len(images), 3072)
    batches = root / "download" / "cifar-10-batches-py"
    batches.mkdir(parents=True)
    for k in range(5):
        part = slice(k * N_PER_BATCH, (k + 1) * N_PER_BATCH)
        d = {b"batch_label": f"training batch {k + 1} of 5".encode(), b"labels": list(range(N_PER_BATCH)),
             b"data": chw[part].copy(), b"filenames": [b"x.png"] * N_PER_BATCH}
        (batches / f"data_batch_{k + 1}").write_bytes(pickle.dumps(d, protocol=2))
    (batches / "test_batch").write_bytes(pickle.dumps({b"data": chw[:2].copy(), b"labels": [0, 1]}, protocol=2))
    (batches / "batches.meta").write_bytes(pickle.dumps({b"label_names": [b"a"]}))
    tar = root / "cifar-10-python.tar.gz"
    with tarfile.open(tar, "w:gz") as tf:
        for name in ["test_batch", "data_batch_3", "batches.meta", "data_batch_1", "data_batch_5",
                     "data_batch_2", "data_batch_4"]:           # the real archive is not in order either
            tf.add(batches / name, arcname=f"cifar-10-batches-py/{name}")
    np.savez(root / "nhwc.npz", images=images, labels=np.zeros(len(images)))
    np.savez_compressed(root / "nchw.npz", x=images.transpose(0, 3, 1, 2))
    folder = root / "pngs"
    (folder / "sub").mkdir(parents=True)
    for i, im in enumerate(images):
        Image.fromarray(im).save(folder / ("sub" if i >= 10 else "") / f"{i:05d}.png")
    (folder / "notes.txt").write_text("not an image")
    return root, images


@pytest.mark.parametrize("where", ["download/cifar-10-batches-py", "download", "cifar-10-python.tar.gz", ".",
                                   "nhwc.npz", "nchw.npz", "pngs"])
def test_cifar10_layouts(cifar, where):
    root, images = cifar
    c = cfg("cifar10", path=str(root / where))
    check_image_data(c)
    data = make_image_data(c)
    np.testing.assert_array_equal(data.images_uint8(), images)
    assert data.shape == (3, 32, 32)
    x = data.sample_torch(8, torch.Generator().manual_seed(0))
    assert x.shape == (8, 3, 32, 32) and x.min() >= -1 and x.max() <= 1


@pytest.mark.parametrize("where", ["download", "cifar-10-python.tar.gz", "nhwc.npz", "pngs"])
def test_cifar10_size(cifar, where):
    root, images = cifar
    data = make_image_data(cfg("cifar10", path=str(root / where), size=6))
    np.testing.assert_array_equal(data.images_uint8(), images[:6])
    with pytest.raises(ConfigError, match="size 21"):
        make_image_data(cfg("cifar10", path=str(root / where), size=21))


def test_cifar10_pickle_refuses_code(tmp_path):
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    for k in range(1, 6):
        (d / f"data_batch_{k}").write_bytes(pickle.dumps({b"data": print}))
    with pytest.raises(ConfigError, match="not a CIFAR-10 python batch") as e:
        make_image_data(cfg("cifar10", path=str(tmp_path)))
    assert "\n" not in str(e.value) and str(d / "data_batch_1") in str(e.value)


def test_wrong_shapes_are_clear(tmp_path):
    np.savez(tmp_path / "small.npz", images=np.zeros((3, 16, 16, 3), np.uint8))
    np.savez(tmp_path / "float.npz", images=np.zeros((3, 32, 32, 3), np.float32))
    for name, needle in [("small.npz", "[3, 16, 16, 3]"), ("float.npz", "float32")]:
        c = cfg("cifar10", path=str(tmp_path / name))
        for f in (check_image_data, make_image_data):
            with pytest.raises(ConfigError) as e:
                f(c)
            msg = str(e.value)
            assert "\n" not in msg and str(tmp_path / name) in msg and needle in msg and "uint8" in msg
    (tmp_path / "pngs").mkdir()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "pngs" / "a.png")
    c = cfg("cifar10", path=str(tmp_path / "pngs"))
    for f in (check_image_data, make_image_data):
        with pytest.raises(ConfigError, match="16×16, expected 32×32"):
            f(c)


# ------------------------------------------------------------------------------------------ imagenet64

@pytest.fixture(scope="module")
def imagenet(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagenet64")
    images = np.random.default_rng(1).integers(0, 256, (30, 64, 64, 3), dtype=np.uint8)
    flat = images.transpose(0, 3, 1, 2).reshape(30, 12288)
    batches = root / "Imagenet64_train"
    batches.mkdir()
    for k in range(10):
        np.savez(batches / f"train_data_batch_{k + 1}.npz", data=flat[3 * k:3 * k + 3],
                 labels=np.arange(1, 4), mean=np.zeros(12288))
    np.savez(root / "one.npz", data=flat)
    np.savez(root / "nhwc.npz", images=images)
    return root, images


@pytest.mark.parametrize("where", ["Imagenet64_train", "one.npz", "nhwc.npz"])
def test_imagenet64_layouts(imagenet, where):
    root, images = imagenet
    c = cfg("imagenet64", path=str(root / where))
    check_image_data(c)
    data = make_image_data(c)
    np.testing.assert_array_equal(data.images_uint8(), images)
    assert data.shape == (3, 64, 64) and data.dim == 12288
    assert data.sample_torch(5, torch.Generator().manual_seed(0)).shape == (5, 3, 64, 64)
    part = make_image_data(cfg("imagenet64", path=str(root / where), size=7))
    np.testing.assert_array_equal(part.images_uint8(), images[:7])


def test_imagenet64_missing_batch(imagenet, tmp_path):
    root, _ = imagenet
    for k in range(1, 10):          # batch 10 left out
        name = f"train_data_batch_{k}.npz"
        (tmp_path / name).write_bytes((root / "Imagenet64_train" / name).read_bytes())
    with pytest.raises(ConfigError, match="lacks train_data_batch_10.npz") as e:
        check_image_data(cfg("imagenet64", path=str(tmp_path)))
    assert str(tmp_path) in str(e.value) and "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------- dry-run checks

def _one_line_naming(e, path):
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg, msg
    return msg


def test_check_errors(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(ConfigError) as e:
        check_image_data(cfg("cifar10", path=str(missing)))
    assert "no such file" in _one_line_naming(e, missing)

    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError) as e:
        check_image_data(cfg("cifar10", path=str(tmp_path / "empty")))
    msg = _one_line_naming(e, tmp_path / "empty")
    assert msg.startswith("cifar10 path") and "data_batch_1..5" in msg and "image folder" in msg

    with pytest.raises(ConfigError) as e:
        check_image_data(cfg("imagenet64", path=str(tmp_path / "empty")))
    assert "train_data_batch_1..10.npz" in _one_line_naming(e, tmp_path / "empty")

    partial = tmp_path / "cifar-10-batches-py"
    partial.mkdir()
    for k in (1, 2, 4):
        (partial / f"data_batch_{k}").write_bytes(b"x")
    with pytest.raises(ConfigError, match="lacks data_batch_3, data_batch_5") as e:
        check_image_data(cfg("cifar10", path=str(tmp_path)))
    _one_line_naming(e, tmp_path)

    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ConfigError) as e:
        check_image_data(cfg("cifar10", path=str(tmp_path / "notes.txt")))
    _one_line_naming(e, tmp_path / "notes.txt")

    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(ConfigError, match="not a readable npz") as e:
        check_image_data(cfg("cifar10", path=str(tmp_path / "bad.npz")))
    _one_line_naming(e, tmp_path / "bad.npz")

    np.savez(tmp_path / "keys.npz", pixels=np.zeros((2, 32, 32, 3), np.uint8))
    with pytest.raises(ConfigError, match="expected one of") as e:
        check_image_data(cfg("cifar10", path=str(tmp_path / "keys.npz")))
    _one_line_naming(e, tmp_path / "keys.npz")

    bad_tar = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(bad_tar, "w:gz") as tf:
        tf.add(partial / "data_batch_1", arcname="cifar-10-batches-py/data_batch_1")
    with pytest.raises(ConfigError, match="archive lacks data_batch_2") as e:
        check_image_data(cfg("cifar10", path=str(bad_tar)))
    _one_line_naming(e, bad_tar)

    with pytest.raises(ConfigError, match="size 5000"):
        check_image_data(cfg("digits", size=5000))
    check_image_data(cfg("digits"))
    check_image_data(cfg("patches", size=10))


def test_check_reads_headers_only(tmp_path, cifar, imagenet, monkeypatch):
    # An npz whose header promises 2M ImageNet images but holds no pixels: the check reads the header alone.
    header = {"descr": "|u1", "fortran_order": False, "shape": (2_000_000, 12288)}
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, header)          # magic and header, no data
    with zipfile.ZipFile(tmp_path / "huge.npz", "w") as zf:
        zf.writestr("data.npy", buf.getvalue())
    t = time.perf_counter()
    check_image_data(cfg("imagenet64", path=str(tmp_path / "huge.npz"), size=1_500_000))
    assert time.perf_counter() - t < 1
    with pytest.raises(ConfigError, match="size 3000000"):
        check_image_data(cfg("imagenet64", path=str(tmp_path / "huge.npz"), size=3_000_000))

    # No layout's check loads arrays or unpickles batches.
    def boom(*a, **k):
        raise AssertionError("check_image_data loaded data")

    monkeypatch.setattr(np, "load", boom)
    monkeypatch.setattr(img_mod, "_unpickle_batch", boom)
    monkeypatch.setattr(img_mod, "_read_image", boom)
    root, _ = cifar
    for where in ["download", "download/cifar-10-batches-py", "cifar-10-python.tar.gz", "nhwc.npz", "pngs"]:
        check_image_data(cfg("cifar10", path=str(root / where)))
    root, _ = imagenet
    for where in ["Imagenet64_train", "one.npz"]:
        check_image_data(cfg("imagenet64", path=str(root / where)))
