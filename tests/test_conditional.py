"""Class-conditional ImageNet 64: labels from the npz through the loader, the ADM class embedding, every loss and
teacher call, and the sampler (one label per sample seed, stored beside the images)."""
import numpy as np
import pytest
import torch

from cmbench import losses, paths
from cmbench.config import ConfigError, Experiment
from cmbench.data.images import check_image_data, make_image_data
from cmbench.data.synthetic import write_imagenet64
from cmbench.nets import build_model
from cmbench.sample import merge_shards, sample_run
from cmbench.seeds import seed_labels
from cmbench.train import loop
from cmbench.checks import check_run
from conftest import REPO

TINY_ADM = {"model_channels": 16, "num_blocks": 1, "head_channels": 16}


@pytest.fixture(scope="module")
def npz_dir(tmp_path_factory):
    return write_imagenet64(tmp_path_factory.mktemp("in64"), per_batch=3)


def resolve(variant, npz_dir, **over):
    over = {"dataset": {"path": str(npz_dir)}, "net": TINY_ADM, **over}
    return check_run(Experiment(REPO / "configs").resolve("imagenet64", "imagenet64", variant, 0, over))


def test_labels_come_from_the_npz_shifted_to_zero_based(npz_dir):
    cfg = resolve("edm", npz_dir)
    assert cfg.dataset.conditional and cfg.dataset.num_classes == 1000
    data = make_image_data(cfg.dataset)
    raw = np.concatenate([np.load(npz_dir / f"train_data_batch_{i}.npz")["labels"] for i in range(1, 11)])
    assert torch.equal(data.labels, torch.from_numpy(raw - 1))
    # a batch's labels are those of its images (images identify themselves by their pixels here)
    x, y = data.sample_batch(16, torch.Generator().manual_seed(0))
    images = torch.from_numpy(np.array(data.images_uint8())).permute(0, 3, 1, 2).float() / 127.5 - 1
    idx = [int(torch.nonzero((images == xi).flatten(1).all(1))[0]) for xi in x]
    assert torch.equal(y, data.labels[idx])


def test_label_problems_are_one_line_errors(npz_dir, tmp_path):
    cfg = resolve("edm", npz_dir).dataset
    np.savez(tmp_path / "one.npz", data=np.zeros((3, 12288), np.uint8))
    with pytest.raises(ConfigError, match="conditional data needs 'labels'"):
        check_image_data(cfg.model_copy(update={"path": str(tmp_path / "one.npz")}))
    np.savez(tmp_path / "zero.npz", data=np.zeros((3, 12288), np.uint8), labels=np.array([0, 1, 2]))
    with pytest.raises(ConfigError, match=r"labels span 0\.\.2, expected the release's 1\.\.1000"):
        make_image_data(cfg.model_copy(update={"path": str(tmp_path / "zero.npz")}))
    with pytest.raises(ConfigError, match="no class labels wired"):
        Experiment(REPO / "configs").resolve("digits", "digits", "edm", 0, {"dataset": {"conditional": True}})


def test_conditional_net_output_changes_with_the_label(npz_dir):
    cfg = resolve("edm", npz_dir)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():            # the zero-initialised output conv would hide every input
            p.add_(0.05 * torch.randn_like(p))
        x, sigma = torch.randn(2, 3, 64, 64), torch.full((2,), 2.0)
        a = model(x, sigma, torch.tensor([3, 3]))
        b = model(x, sigma, torch.tensor([3, 700]))
    assert torch.equal(a[0], b[0]) and not torch.allclose(a[1], b[1])
    with pytest.raises(ValueError, match="needs labels"):
        model(x, sigma)


class LabelSpy(torch.nn.Module):
    """A model / teacher stand-in recording the labels each call receives."""

    def __init__(self, sigma_data=0.5):
        super().__init__()
        self.w, self.sigma_data, self.labels = torch.nn.Parameter(torch.tensor(0.5)), sigma_data, []

    def forward(self, x, sigma, labels=None):
        assert labels is None or len(labels) == len(x)
        self.labels.append(labels)
        return self.w * x

    raw = forward

    def denoise(self, x, sigma, labels=None):
        return self.forward(x, sigma, labels)


@pytest.mark.parametrize("variant", ["edm", "ct", "ict", "cd", "direct_cm", "ect", "sct", "scd"])
def test_every_loss_passes_the_labels_to_every_call(variant, npz_dir):
    cfg = resolve(variant, npz_dir)
    teacher = LabelSpy()
    loss = losses.build(cfg, teacher, build_model(cfg))
    model = LabelSpy()
    y = torch.tensor([5, 6, 7, 8])
    loss(model, model, torch.zeros(4, 3, 64, 64), 10, torch.Generator().manual_seed(0), y)
    calls = model.labels + teacher.labels
    assert calls and all(lab is not None for lab in calls)
    for lab in calls:             # whole batches, or (Direct CM's solver) the samples still moving, in order
        assert set(lab.tolist()) <= set(y.tolist()) and lab.tolist() == sorted(lab.tolist())
    if cfg.teacher is not None and loss.needs_teacher:
        assert teacher.labels


def test_sampled_labels_follow_the_seeds_and_shards_equal_one_task(npz_dir, tmp_path):
    cfg = resolve("ict", npz_dir, train={"steps": 2, "batch": 4}, sample={"n": 10, "batch": 4})
    rdir = paths.run_dir(tmp_path, cfg.run)
    loop.train(cfg, rdir, progress=False)
    whole = dict(np.load(sample_run(rdir, 2, tmp_path / "whole.npz")))
    assert np.array_equal(whole["labels"], seed_labels(np.arange(10), 1000))
    assert whole["images"].shape == (10, 64, 64, 3) and whole["labels"].min() >= 0
    for shard in range(3):
        sample_run(rdir, 2, shard=shard, shards=3)
    merged = np.load(merge_shards(rdir, 2, 3))
    for k in whole:
        assert np.array_equal(merged[k], whole[k]), k
