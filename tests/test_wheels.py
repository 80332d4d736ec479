"""Binary wheels (issue 19): the x86-64 wheel installs in a fresh venv with no compiler and runs on the native core;
its tags say what its module really needs (packaging/wheel_tools.py, and auditwheel where installed); a wrong tag
is caught. The aarch64 wheel and the whole program under qemu: `make test-pi` (packaging/test_pi.sh).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "packaging"))
import wheel_tools  # noqa: E402

pytestmark = pytest.mark.skipif(sys.platform != "linux" or shutil.which("readelf") is None,
                                reason="Linux wheels, read with binutils' readelf")


@pytest.fixture(scope="module")
def x86_wheel(tmp_path_factory) -> Path:
    """The wheel `make wheels` makes on this machine: built by pip from the working tree, retagged."""
    if sysconfig.get_platform() != "linux-x86_64":
        pytest.skip("the x86-64 wheel is built on x86-64")
    out = tmp_path_factory.mktemp("dist")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(out),
                        str(REPO)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "could not build edgellm._native" not in r.stderr, r.stderr[-3000:]
    (built,) = out.glob("edgellm-*-linux_x86_64.whl")
    return wheel_tools.retag(built)


def test_tags_follow_the_module(x86_wheel):
    assert x86_wheel.name.startswith("edgellm-0.1.0-cp311-abi3-manylinux_")
    assert wheel_tools.check(x86_wheel) == []
    names = zipfile.ZipFile(x86_wheel).namelist()
    assert "edgellm/_native.abi3.so" in names and any(n.endswith(".dist-info/licenses/LICENSE") for n in names)


def test_auditwheel_agrees(x86_wheel):
    pytest.importorskip("auditwheel")
    r = subprocess.run([sys.executable, "-m", "auditwheel", "show", str(x86_wheel)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    platform = x86_wheel.name.rsplit("-", 1)[1][: -len(".whl")]
    assert f'platform tag: "{platform}"' in " ".join(r.stdout.split())


def test_a_tag_older_than_the_symbols_is_caught(x86_wheel, tmp_path):
    """Retagged by hand to glibc 2.17, the wheel claims less than its module imports (GLIBC_2.34's pthread_create on
    a glibc >= 2.34 build host): the check names the symbols."""
    files = wheel_tools.read_wheel(x86_wheel)
    machine, glibc, _, _ = wheel_tools.module_facts(files[wheel_tools.MODULE])
    if glibc <= (2, 17):
        pytest.skip("this build host's glibc is old enough for manylinux2014")
    lying = wheel_tools.write_wheel(files, f"cp311-abi3-manylinux_2_17_{machine}", tmp_path)
    problems = " ".join(wheel_tools.check(lying))
    assert "tagged glibc 2.17 but the module needs" in problems and "@GLIBC_2." in problems
    wrong_abi = wheel_tools.write_wheel(files, f"cp311-cp311-manylinux_{glibc[0]}_{glibc[1]}_{machine}", tmp_path)
    assert "expected cp311-abi3" in " ".join(wheel_tools.check(wrong_abi))


def test_installs_without_a_compiler_and_runs_native(x86_wheel, tmp_path, smollm2_path):
    """A fresh venv, CC=/bin/false, --no-index and --only-binary: nothing can compile. Dependencies come from this
    environment's site-packages (a .pth line: path entries only, so its editable edgellm is not seen)."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    env = {**os.environ, "CC": "/bin/false", "CXX": "/bin/false"}
    env.pop("EDGELLM_NATIVE", None)
    r = subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "--no-index",
                        "--only-binary=:all:", str(x86_wheel)], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    (site / "zz_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    r = subprocess.run([str(py), "-c", "import edgellm._native as n, edgellm.backends.native as b; "
                        "print(n.__file__); print(b.isa())"], capture_output=True, text=True, env=env, timeout=120,
                       cwd=tmp_path)   # not the repository: its edgellm/ would shadow the installed one
    assert r.returncode == 0, r.stderr[-3000:]
    so, isa = r.stdout.split()
    assert Path(so).is_relative_to(venv) and isa in ("avx2", "avx512vnni", "amx", "generic")
    r = subprocess.run([str(venv / "bin" / "edgellm"), "run", str(smollm2_path), "-p", "The capital of France is",
                        "-n", "6", "--temp", "0", "--verbose"], capture_output=True, text=True, env=env, timeout=300,
                       cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip() and "backend native" in r.stderr


def test_check_rejects_a_wheel_without_the_core(x86_wheel, tmp_path):
    files = wheel_tools.read_wheel(x86_wheel)
    del files[wheel_tools.MODULE]
    bare = wheel_tools.write_wheel(files, x86_wheel.name.split("-", 2)[2][: -len(".whl")], tmp_path)
    assert any("shared objects" in p for p in wheel_tools.check(bare))
