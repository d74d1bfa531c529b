"""FID backends (cmbench.metrics.fid) offline, on a He-initialised torch-fidelity InceptionV3 written once per session.

InceptionV3 costs ~0.1 s per image on 2 CPU cores: the sets are small and every network pass is shared through
module-scoped fixtures. Values from random weights only check the plumbing and the agreement between libraries."""
import json
import re
from pathlib import Path

import numpy as np
import pytest

from cmbench.metrics import fid

N = 32                    # images per photo set
# FID(x, x) is checked once per library: clean-fid's Fréchet distance (scipy sqrtm of a 2048x2048 product) costs
# ~11 s on 2 CPU cores, and both clean-fid modes share it (the modes differ in the features only).
SAME_SET_SPECS = ("torch-fidelity", "clean-fid/legacy_tensorflow")
CF_DOWNLOAD = Path("/tmp/inception-2015-12-05.pt")   # where clean-fid itself would download its network
TF_REFERENCE_KEY = {"dataset": "photo-crops-flower", "n": N, "seed": 1}

pytestmark = [pytest.mark.filterwarnings("ignore::scipy.linalg.LinAlgWarning"),  # N < 2048: singular covariances
              pytest.mark.filterwarnings("ignore:The `disp` argument is deprecated:DeprecationWarning"),  # clean-fid
              pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")]


def photo_crops(index: int, n: int, seed: int) -> np.ndarray:
    """Random 32x32 RGB crops of one of scikit-learn's bundled photos (CIFAR-shaped, natural-looking)."""
    from sklearn.datasets import load_sample_images
    img = load_sample_images().images[index]
    rng = np.random.default_rng(seed)
    ys, xs = rng.integers(0, img.shape[0] - 32, n), rng.integers(0, img.shape[1] - 32, n)
    return np.stack([img[y:y + 32, x:x + 32] for y, x in zip(ys, xs)]).astype(np.uint8)


def digits_uint8(start: int, n: int) -> np.ndarray:
    """scikit-learn's 8x8 digits as uint8 [n, 8, 8] (grayscale, 0..16 scaled to 0..255)."""
    from sklearn.datasets import load_digits
    d = load_digits().images[start:start + n]
    return np.round(d * 255 / 16).astype(np.uint8)


def save_npz(path: Path, images: np.ndarray) -> Path:
    np.savez(path, images=images, seeds=np.arange(len(images)))
    return path


@pytest.fixture(scope="session")
def weights_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("weights")
    fid.write_random_inception(d / fid.TF_WEIGHTS, seed=0)
    return d


@pytest.fixture(scope="module", autouse=True)
def weights_env(weights_dir):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(fid.WEIGHTS_ENV, str(weights_dir))
        yield weights_dir


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    d = tmp_path_factory.mktemp("samples")
    a, b = photo_crops(0, N, seed=0), photo_crops(1, N, seed=1)
    return {"a": a, "b": b, "a_npz": save_npz(d / "a.npz", a), "b_npz": save_npz(d / "b.npz", b),
            "cache": d / "reference" / "fid"}


@pytest.fixture(scope="module")
def runs(sets):
    """Per backend (clean-fid on torch-fidelity's network): reference stats of set b, FID(a, b) and FID(b, b),
    each from the sample file through the whole path."""
    out = {}
    for spec in fid.SPECS:
        ref = fid.reference_stats(lambda: sets["b"], spec, TF_REFERENCE_KEY, sets["cache"], network="torch-fidelity")
        out[spec] = {"ref": ref, "ab": fid.fid_npz(sets["a_npz"], ref, spec, network="torch-fidelity")}
        if spec in SAME_SET_SPECS:
            out[spec]["bb"] = fid.fid_npz(sets["b_npz"], ref, spec, network="torch-fidelity")
    return out


def test_both_backends_from_the_same_npz(runs, weights_dir):
    sha = fid.file_sha256(weights_dir / fid.TF_WEIGHTS)
    for spec, r in runs.items():
        rec = r["ab"]
        assert rec["metric"] == "fid" and np.isfinite(rec["value"]) and rec["value"] > 0
        assert rec["backend"] == spec.split("/")[0]
        assert rec["backend_version"] == {"torch-fidelity": "0.4.0", "clean-fid": "0.1.35"}[rec["backend"]]
        assert rec["mode"] == (None if spec == "torch-fidelity" else spec.split("/")[1])
        assert rec["network"] == "torch-fidelity"
        assert rec["weights_file"] == fid.TF_WEIGHTS and rec["weights_sha256"] == sha[:12]
        assert fid.TF_WEIGHTS in rec["feature_extractor"] and sha[:12] in rec["feature_extractor"]
        assert rec["n_gen"] == N and rec["n_ref"] == N and rec["wall_s"] > 0
        assert rec["reference_key"] in r["ref"].name
        json.dumps(rec)  # a metric record must serialise


def test_same_set_is_zero_and_different_sets_are_not(runs):
    for spec in SAME_SET_SPECS:
        ab, bb = runs[spec]["ab"]["value"], runs[spec]["bb"]["value"]
        print(f"{spec}: FID(a, b) = {ab:.6g}, FID(b, b) = {bb:.3g}")
        assert ab > 1.0                          # the He-init network separates the two photos clearly
        assert abs(bb) < 1e-4 * ab               # two passes over the same images: zero up to rounding


def test_torch_fidelity_and_cleanfid_legacy_agree_on_the_same_network(runs):
    tf = runs["torch-fidelity"]["ab"]["value"]
    legacy = runs["clean-fid/legacy_tensorflow"]["ab"]["value"]
    clean = runs["clean-fid/clean"]["ab"]["value"]
    rel = abs(tf - legacy) / abs(tf)
    print(f"torch-fidelity {tf!r}  clean-fid/legacy_tensorflow {legacy!r}  relative difference {rel:.2e}  "
          f"(clean-fid/clean {clean!r})")
    assert rel < 1e-6
    assert abs(clean - tf) / tf > 1e-3           # PIL bicubic resize: different by design


def test_value_is_what_torch_fidelity_itself_computes():
    """Our features -> stats -> frechet equals torch_fidelity.calculate_metrics on the same two sets, and
    torch-fidelity accepts the random weights file through feature_extractor_weights_path."""
    import torch
    import torch_fidelity

    a, b = photo_crops(0, 8, seed=10), photo_crops(1, 8, seed=11)
    ours = fid.frechet(*fid.stats(fid.features(a, "torch-fidelity")), *fid.stats(fid.features(b, "torch-fidelity")))

    class Images(torch.utils.data.Dataset):
        def __init__(self, x):
            self.x = x

        def __len__(self):
            return len(self.x)

        def __getitem__(self, i):
            return torch.from_numpy(self.x[i].transpose(2, 0, 1).copy())

    theirs = torch_fidelity.calculate_metrics(
        input1=Images(a), input2=Images(b), fid=True, cuda=False, verbose=False, save_cpu_ram=True, cache=False,
        feature_extractor_weights_path=str(fid.tf_weights_path()))[torch_fidelity.KEY_METRIC_FID]
    assert ours == theirs and ours > 0


@pytest.mark.parametrize("spec,network,name", [("torch-fidelity", "own", fid.TF_WEIGHTS),
                                               ("clean-fid/legacy_tensorflow", "own", fid.CF_WEIGHTS),
                                               ("clean-fid/clean", "own", fid.CF_WEIGHTS),
                                               ("clean-fid/clean", "torch-fidelity", fid.TF_WEIGHTS)])
def test_missing_weights_is_one_clear_line_and_downloads_nothing(spec, network, name, tmp_path, monkeypatch, sets):
    import torch
    hub_file = Path(torch.hub.get_dir()) / "checkpoints" / "weights-inception-2015-12-05-6726825d.pth"
    before = CF_DOWNLOAD.exists(), hub_file.exists()
    empty = tmp_path / "no-weights"
    empty.mkdir()
    monkeypatch.setenv(fid.WEIGHTS_ENV, str(empty))

    def boom():
        raise AssertionError("images loaded although the weights are missing")

    calls = [lambda: fid.features(sets["a"][:2], spec, network=network),
             lambda: fid.reference_stats(boom, spec, {"d": 1}, tmp_path / "cache", network=network)]
    for call in calls:
        with pytest.raises(fid.MissingWeights) as e:
            call()
        msg = str(e.value)
        assert isinstance(e.value, FileNotFoundError) and "\n" not in msg
        assert str((empty / name).absolute()) in msg and fid.WEIGHTS_ENV in msg and "https://" in msg
    assert not (tmp_path / "cache").exists()
    # the default directory is weights/ under the working directory
    monkeypatch.delenv(fid.WEIGHTS_ENV)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(fid.MissingWeights, match=re.escape(str(tmp_path / "weights" / name))):
        fid.features(sets["a"][:2], spec, network=network)
    assert (CF_DOWNLOAD.exists(), hub_file.exists()) == before   # nothing was fetched


def test_missing_weights_names_the_libraries_urls(tmp_path, monkeypatch):
    from cleanfid.downloads_helper import inception_url
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
    monkeypatch.setenv(fid.WEIGHTS_ENV, str(tmp_path))
    with pytest.raises(fid.MissingWeights, match=re.escape(URL_INCEPTION_V3)):
        fid.tf_weights_path()
    with pytest.raises(fid.MissingWeights, match=re.escape(inception_url)):
        fid.cf_weights_path()


def test_reference_cache(runs, sets):
    def boom():
        raise AssertionError("cache miss: images_fn called")

    spec = "torch-fidelity"
    cache = sets["cache"]
    # hit: same key, backend and weights -> the file made by the fixture, and the dataset is never loaded
    hit = fid.reference_stats(boom, spec, TF_REFERENCE_KEY, cache, network="torch-fidelity")
    assert hit == runs[spec]["ref"]
    # each backend has its own file for the same dataset key
    assert len({r["ref"] for r in runs.values()}) == len(fid.SPECS)
    # another key: a miss, once
    calls = []

    def small():
        calls.append(1)
        return sets["a"][:4]

    other = fid.reference_stats(small, spec, {**TF_REFERENCE_KEY, "dataset": "other"}, cache)
    again = fid.reference_stats(small, spec, {**TF_REFERENCE_KEY, "dataset": "other"}, cache)
    assert other == again != hit and len(calls) == 1
    ref = fid.load_reference(other)
    assert ref["n"] == 4 and ref["mu"].shape == (2048,) and ref["sigma"].shape == (2048, 2048)
    assert ref["fields"]["dataset"]["dataset"] == "other" and ref["fields"]["library_version"] == "0.4.0"
    assert ref["fields"]["weights_sha256"] == fid.file_sha256(fid.tf_weights_path())
    assert ref["key"] == fid.reference_key({**TF_REFERENCE_KEY, "dataset": "other"}, spec) and ref["key"] in other.name
    assert not [p for p in cache.iterdir() if ".tmp" in p.name]   # written atomically
    # a reference made by another backend is refused
    with pytest.raises(ValueError, match="reference statistics made with torch-fidelity"):
        fid.fid_npz(sets["a_npz"], hit, "clean-fid/clean", network="torch-fidelity")


def test_grayscale_digits(tmp_path):
    """8x8 grayscale images: repeated to RGB, resized to 299 by each backend's own path."""
    ref_images = digits_uint8(0, 10)                                           # [N, 8, 8]
    gen = save_npz(tmp_path / "digits.npz", digits_uint8(10, 10)[..., None])   # [N, 8, 8, 1]
    ref = fid.reference_stats(lambda: ref_images, "torch-fidelity", {"dataset": "digits"}, tmp_path / "ref")
    rec = fid.fid_npz(gen, ref, "torch-fidelity")
    print(f"digits torch-fidelity: {rec['value']:.6g}")
    assert np.isfinite(rec["value"]) and rec["value"] > 0 and rec["n_gen"] == rec["n_ref"] == 10
    gray = ref_images[:3]
    rgb = np.repeat(gray[..., None], 3, axis=-1)
    for spec in fid.SPECS:
        f = fid.features(gray, spec, network="torch-fidelity")
        assert f.shape == (3, 2048) and f.dtype == np.float64 and np.isfinite(f).all() and f.std() > 1e-3
        np.testing.assert_array_equal(f, fid.features(rgb, spec, network="torch-fidelity"))


def test_cleanfid_own_network(tmp_path, monkeypatch):
    """network="own" loads clean-fid's TorchScript file with InceptionV3W(download=False). The real file cannot be
    had offline: a tiny TorchScript module with the same interface (forward(x, return_features) and .layers)
    checks the plumbing for both modes."""
    import torch
    import torch.nn.functional as F

    class FakeInception(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(4), torch.nn.Conv2d(3, 2048, 4),
                                              torch.nn.ReLU())

        def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
            x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
            return self.layers((x - 128) / 128)

    torch.manual_seed(0)
    torch.jit.script(FakeInception()).save(str(tmp_path / fid.CF_WEIGHTS))
    monkeypatch.setenv(fid.WEIGHTS_ENV, str(tmp_path))
    # the fake network's FID means nothing, and clean-fid's own Fréchet distance (tested above) costs ~11 s a call
    distances = []
    monkeypatch.setattr("cleanfid.fid.frechet_distance",
                        lambda m1, s1, m2, s2: distances.append(1) or float(((m1 - m2) ** 2).sum()))
    a, b = photo_crops(0, 12, seed=20), photo_crops(1, 12, seed=21)
    gen = save_npz(tmp_path / "a.npz", a)
    for spec in ("clean-fid/legacy_tensorflow", "clean-fid/clean"):
        ref = fid.reference_stats(lambda: b, spec, {"dataset": "b"}, tmp_path / "ref")
        rec = fid.fid_npz(gen, ref, spec)
        assert rec["network"] == "clean-fid" and rec["weights_file"] == fid.CF_WEIGHTS
        assert np.isfinite(rec["value"]) and rec["value"] > 0
        assert ref.name.startswith(spec.replace("/", "-") + "-") and "net-" not in ref.name
    assert len(distances) == 2
    # clean-fid asks for full batches: 10 images in batches of 4 are padded, and the padding is dropped
    for spec in ("clean-fid/legacy_tensorflow", "clean-fid/clean"):
        np.testing.assert_allclose(fid.features(a[:10], spec, batch_size=4), fid.features(a[:10], spec), rtol=1e-5,
                                   atol=1e-6)
    with pytest.raises(fid.MissingWeights, match=re.escape(fid.TF_WEIGHTS)):   # torch-fidelity's file is not here
        fid.features(a, "torch-fidelity")


def test_bad_inputs():
    with pytest.raises(ValueError, match="unknown FID backend"):
        fid.backend("clean-fid/legacy_pytorch")
    with pytest.raises(ValueError, match="unknown FID network"):
        fid.backend("torch-fidelity", "inception")
    with pytest.raises(ValueError, match="uint8"):
        fid.as_rgb(np.zeros((2, 8, 8, 3), np.float32))
    with pytest.raises(ValueError, match="C = 1 or 3"):
        fid.as_rgb(np.zeros((2, 8, 8, 4), np.uint8))


def test_pooled_64d_features_agree_across_libraries_and_match_torch_fidelity(sets):
    """The smoke scale's FID: torch-fidelity's own 64-d feature (MaxPool_1, averaged) and clean-fid running
    torch-fidelity's trunk up to the same layer agree; the reference key and the record say 64-d."""
    import torch
    from torch_fidelity.utils import create_feature_extractor
    ours = fid.features(sets["a"], "torch-fidelity", dims=64)
    net = create_feature_extractor(fid.TF_EXTRACTOR, ["64"], cuda=False,
                                   feature_extractor_weights_path=str(fid.tf_weights_path()), verbose=False)
    with torch.no_grad():
        theirs = net(torch.from_numpy(sets["a"].transpose(0, 3, 1, 2).copy()))[0].numpy()
    assert ours.shape == (N, 64) and np.array_equal(ours, theirs.astype(np.float64))
    legacy = fid.features(sets["a"], "clean-fid/legacy_tensorflow", network="torch-fidelity", dims=64)
    np.testing.assert_allclose(legacy, ours, rtol=1e-4, atol=1e-5)
    values = {}
    for spec in ("torch-fidelity", "clean-fid/legacy_tensorflow"):
        ref = fid.reference_stats(lambda: sets["b"], spec, TF_REFERENCE_KEY, sets["cache"], network="torch-fidelity",
                                  dims=64)
        assert fid.load_reference(ref)["fields"]["dims"] == 64
        rec = fid.fid_npz(sets["a_npz"], ref, spec, network="torch-fidelity", dims=64)
        assert rec["fid_dims"] == 64 and "(64-d)" in rec["feature_extractor"]
        values[spec] = rec["value"]
        with pytest.raises(ValueError, match="64-d"):        # a 64-d reference never serves a 2048-d FID
            fid.fid_npz(sets["a_npz"], ref, spec, network="torch-fidelity")
    assert values["torch-fidelity"] > 0
    assert abs(values["torch-fidelity"] - values["clean-fid/legacy_tensorflow"]) < 1e-4 * values["torch-fidelity"]
    with pytest.raises(ValueError, match="2048-d features only"):
        fid.features(sets["a"], "clean-fid/clean", dims=64)
