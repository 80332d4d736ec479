"""Packaging: every Python package in the tree is listed in pyproject.toml, so a regular install has it too."""

import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_every_package_is_installed():
    cfg = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(cfg["packages"])
    dirs = {str(p.parent.relative_to(REPO)).replace("/", ".") for p in (REPO / "edgellm").rglob("__init__.py")}
    assert dirs - listed == set(), "add these to [tool.setuptools] packages"
    assert cfg["package-dir"]["edgellm.quant"] == "quant" and (REPO / "quant" / "__init__.py").exists()
