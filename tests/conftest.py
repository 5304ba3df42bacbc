from __future__ import annotations

from pathlib import Path

import pytest

from helpers import SHARED_DATA, kermany_names, make_dataset


@pytest.fixture(autouse=True)
def _offline_torch_home(tmp_path_factory, monkeypatch):
    # Tests never reach the network or a user's hub cache: ImageNet weights are
    # "missing" unless a test puts a file into this TORCH_HOME itself.
    home = tmp_path_factory.mktemp("torch_home")
    monkeypatch.setenv("TORCH_HOME", str(home))
    return home


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "train").is_dir():
        pytest.fail(
            f"the shared chest X-ray set is expected at {SHARED_DATA} "
            "(../shared/data/chest_xray_224 from the repo root, or set FEATCACHE_SHARED_DATA)"
        )
    return SHARED_DATA


@pytest.fixture
def small_dataset(tmp_path) -> Path:
    """train (carved into train/val) and test, Kermany names, 16x20 grayscale JPEGs."""
    return make_dataset(
        tmp_path / "data",
        {"train": kermany_names("", 8, 8), "test": kermany_names("NORMAL2-", 2, 3, per_patient=1)},
        size=(20, 16),
    )


