import shutil
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def unverified_weights():
    """The offline tests run FID on a He-initialised Inception (cmbench.metrics.fid.write_random_inception), never
    on the official weights: they opt in to unverified weights, as a user must (tests that check the refusal unset
    it)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CMBENCH_UNVERIFIED_WEIGHTS", "1")
        yield


@pytest.fixture
def configs(tmp_path) -> Path:
    """A private copy of the repo's configs/ to edit."""
    dst = tmp_path / "configs"
    shutil.copytree(REPO / "configs", dst)
    return dst


def edit_yaml(path: Path, update: dict) -> None:
    data = yaml.safe_load(path.read_text()) if path.exists() else {}
    data.update(update)
    path.write_text(yaml.safe_dump(data))


def map_error(cfg, rdir) -> dict:
    """Error of a finished run's EMA consistency map against the exact f* of its 1-D law."""
    import torch

    from cmbench import paths
    from cmbench.data.toy import make_toy
    from cmbench.metrics.toy import consistency_map_error
    from cmbench.nets import build_model
    from cmbench import checkpoint

    model = build_model(cfg)
    model.load_state_dict(checkpoint.load(paths.final_weights(rdir))["ema"])

    def f(x, sigma):
        with torch.no_grad():
            return model(torch.tensor(x, dtype=torch.float32), torch.tensor(sigma, dtype=torch.float32)).double().numpy()

    return consistency_map_error(f, make_toy(cfg.dataset.model_dump()), cfg.precond.sigma_min, cfg.precond.sigma_max)
