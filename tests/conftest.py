"""Shared fixtures: every test runs offline in temp folders; nothing is written into the working tree."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATASET = REPO.parent / "shared" / "datasets" / "clothing-small" / "train"

# Set before anything imports bentoml (it reads BENTOML_HOME once): the whole session, and every kernel
# or server it starts, uses one throw-away BentoML store, never the user's ~/bentoml.
_SESSION_TMP = Path(tempfile.mkdtemp(prefix="niteru-tests-"))
os.environ["BENTOML_HOME"] = str(_SESSION_TMP / "bentoml")
os.environ["BENTOML_DO_NOT_TRACK"] = "true"
os.environ["MPLBACKEND"] = "Agg"
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.pop("NITERU_ALERT_WEBHOOK", None)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    shutil.rmtree(_SESSION_TMP, ignore_errors=True)


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
