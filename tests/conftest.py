"""Shared fixtures. Tests that need ../shared/data skip on a user's clone and fail under CI.

`.ci/run` sets FEDRECON_REQUIRE_ALL=1: there a missing dataset or database is a failure, not a skip, so CI
always runs every test.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
ML_2998 = SHARED_DATA / "movielens" / "ml-1m-2998u"


def require(condition: bool, reason: str) -> None:
    """Skip with ``reason`` when ``condition`` is false, or fail when CI demands every test runs."""
    if condition:
        return
    if os.environ.get("FEDRECON_REQUIRE_ALL") == "1":
        pytest.fail(f"required by CI (FEDRECON_REQUIRE_ALL=1): {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session", name="require")
def require_fixture() -> Callable[[bool, str], None]:
    """`require` for test modules, which cannot import conftest under ``--import-mode=importlib``."""
    return require


@pytest.fixture(scope="session")
def ml_2998_dir() -> Path:
    require((ML_2998 / "ratings.dat.gz").is_file(),
            f"MovieLens subset not found at {ML_2998} (see ../shared/data/README.md)")
    return ML_2998
