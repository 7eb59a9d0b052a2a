"""Shared fixtures: every test runs offline in temp folders; nothing is written into the working tree."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATASET = REPO.parent / "shared" / "datasets" / "clothing-small" / "train"

os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")
os.environ.setdefault("TQDM_DISABLE", "1")


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep BentoML's store and matplotlib's cache out of the user's home."""
    monkeypatch.setenv("BENTOML_HOME", str(tmp_path_factory.getbasetemp() / "bentoml"))
    monkeypatch.setenv("BENTOML_DO_NOT_TRACK", "true")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.delenv("NITERU_ALERT_WEBHOOK", raising=False)


@pytest.fixture(scope="session")
def clothing_dataset() -> Path:
    if not SHARED_DATASET.is_dir():
        pytest.skip(f"the clothing-small dataset is not at {SHARED_DATASET}")
    return SHARED_DATASET


@pytest.fixture(scope="session")
def demo_catalog(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny demo catalog (16 products x 2 photos), generated once per session."""
    from niteru.demo import ensure_demo_catalog

    return ensure_demo_catalog(tmp_path_factory.mktemp("demo-cache"), n_products=16, variants=2, seed=0)
