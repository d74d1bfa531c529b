import shutil
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


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
