"""Binary wheels of edgellm: the tag a wheel really needs, the aarch64 wheel cross-built, and a check of both.

    python packaging/wheel_tools.py retag DIST/edgellm-*-linux_x86_64.whl       # -> manylinux_2_NN_x86_64
    python packaging/wheel_tools.py cross WHEEL --root ARM64_ROOT [--cc CC]      # the same wheel, aarch64 core
    python packaging/wheel_tools.py check WHEEL...                             # tags, symbols, LICENSE, contents

`make wheels` runs them (packaging/build_wheels.sh). The native core is one C module compiled without -march
(dispatch.c picks AVX2 / AVX-512 VNNI / NEON / NEON+dotprod at run time), against Python's stable ABI (cffi's
default: `_native.abi3.so`), so one wheel per architecture serves CPython 3.11 and later.

What a manylinux tag promises (PEP 600): the wheel's binaries need nothing beyond glibc (and libm, libpthread ...)
of version 2.NN and older on that architecture. The version is read from the symbol versions the module imports
(GLIBC_2.34 for pthread_create since glibc moved it into libc, for example), never assumed from the build host.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import csv
import hashlib
import io
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODULE = "edgellm/_native.abi3.so"
# the system libraries a manylinux wheel may link against without bundling them (PEP 600's list, the part a C11 core
# could need)
ALLOWED_LIBS = {"libc.so.6", "libm.so.6", "libpthread.so.0", "libdl.so.2", "librt.so.1", "ld-linux-x86-64.so.2",
                "ld-linux-aarch64.so.1"}
MACHINES = {"x86_64": "Advanced Micro Devices X86-64", "aarch64": "AArch64"}
ELF_MACHINE = {62: "x86_64", 183: "aarch64"}   # e_machine


class WheelError(Exception):
    pass


# ------------------------------------------------------------------------------------------- ELF facts
def elf_machine(blob: bytes) -> str:
    if blob[:4] != b"\x7fELF" or blob[4] != 2 or blob[5] != 1:
        raise WheelError("not a 64-bit little-endian ELF file")
    code = int.from_bytes(blob[18:20], "little")
    if code not in ELF_MACHINE:
        raise WheelError(f"ELF machine {code} is neither x86-64 nor aarch64")
    return ELF_MACHINE[code]


def elf_needs(path: Path) -> tuple[set[str], set[tuple[str, str]]]:
    """(the libraries it needs, {(symbol, version)} it imports with a GLIBC version), from readelf (binutils reads
    every architecture's ELF)."""
    dyn = subprocess.run(["readelf", "-d", "-W", str(path)], capture_output=True, text=True, check=True).stdout
    libs = set(re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", dyn))
    syms = subprocess.run(["readelf", "--dyn-syms", "-W", str(path)], capture_output=True, text=True,
                          check=True).stdout
    imported = set()
    for line in syms.splitlines():
        f = line.split()
        if len(f) >= 8 and f[6] == "UND" and "@" in f[7]:
            name, _, ver = f[7].partition("@")
            imported.add((name, ver.lstrip("@").split()[0]))
    return libs, imported


def glibc_needed(imported: set[tuple[str, str]]) -> tuple[int, int]:
    """The newest GLIBC_x.y among the imported symbol versions."""
    best = (2, 17)   # manylinux2014's floor; nothing older is worth a tag today
    for _, ver in imported:
        m = re.fullmatch(r"GLIBC_(\d+)\.(\d+)(?:\.\d+)?", ver)
        if m:
            best = max(best, (int(m.group(1)), int(m.group(2))))
    return best


# ------------------------------------------------------------------------------------------- wheel files
def read_wheel(path: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as z:
        return {n: z.read(n) for n in z.namelist()}


def dist_info(files: dict[str, bytes]) -> str:
    names = {n.split("/")[0] for n in files if n.split("/")[0].endswith(".dist-info")}
    if len(names) != 1:
        raise WheelError(f"expected one .dist-info directory, found {sorted(names)}")
    return names.pop()


def write_wheel(files: dict[str, bytes], tag: str, out_dir: Path) -> Path:
    """Write files as a wheel tagged `tag` (python-abi-platform): WHEEL's Tag line and RECORD rewritten."""
    info = dist_info(files)
    name, version = info[: -len(".dist-info")].rsplit("-", 1)
    wheel_meta = files[f"{info}/WHEEL"].decode()
    wheel_meta = re.sub(r"(?m)^Tag: .*\n", "", wheel_meta).rstrip("\n") + f"\nTag: {tag}\n"
    wheel_meta = re.sub(r"(?m)^Root-Is-Purelib: .*$", "Root-Is-Purelib: false", wheel_meta)
    files = dict(files)
    files[f"{info}/WHEEL"] = wheel_meta.encode()
    record_name = f"{info}/RECORD"
    files.pop(record_name, None)
    rows = []
    for n in sorted(files):
        digest = base64.urlsafe_b64encode(hashlib.sha256(files[n]).digest()).rstrip(b"=").decode()
        rows.append((n, f"sha256={digest}", str(len(files[n]))))
    rows.append((record_name, "", ""))
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    files[record_name] = buf.getvalue().encode()
    out = out_dir / f"{name}-{version}-{tag}.whl"
    tmp = out.with_suffix(".tmp")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as z:
        for n in sorted(files, key=lambda n: (n.startswith(info), n)):   # dist-info last, as wheel tools do
            zi = zipfile.ZipInfo(n, date_time=(2026, 1, 1, 0, 0, 0))
            zi.external_attr = (0o755 if n.endswith(".so") else 0o644) << 16
            zi.compress_type = zipfile.ZIP_DEFLATED
            z.writestr(zi, files[n])
    os.replace(tmp, out)
    return out


def module_facts(so_bytes: bytes) -> tuple[str, tuple[int, int], set[str], set[tuple[str, str]]]:
    with tempfile.NamedTemporaryFile(suffix=".so") as f:
        f.write(so_bytes)
        f.flush()
        libs, imported = elf_needs(Path(f.name))
    return elf_machine(so_bytes), glibc_needed(imported), libs, imported


def strip_debug(so_bytes: bytes) -> bytes:
    """The module without debug sections (Python's own CFLAGS often carry -g: a third of the wheel's size), where
    binutils' strip is at hand."""
    if shutil.which("strip") is None:
        return so_bytes
    with tempfile.TemporaryDirectory() as tmp:
        f = Path(tmp) / "m.so"
        f.write_bytes(so_bytes)
        subprocess.run(["strip", "--strip-debug", str(f)], check=True)
        return f.read_bytes()


def platform_tag(machine: str, glibc: tuple[int, int]) -> str:
    return f"manylinux_{glibc[0]}_{glibc[1]}_{machine}"


# ------------------------------------------------------------------------------------------- commands
def retag(wheel: Path) -> Path:
    """The wheel under the manylinux tag its module needs (the linux_* original is removed)."""
    files = read_wheel(wheel)
    if MODULE not in files:
        raise WheelError(f"{wheel.name}: no {MODULE} (was the native core built? see the build log)")
    files[MODULE] = strip_debug(files[MODULE])
    machine, glibc, _, _ = module_facts(files[MODULE])
    out = write_wheel(files, f"cp311-abi3-{platform_tag(machine, glibc)}", wheel.parent)
    if out != wheel:
        wheel.unlink()
    return out


def cross(wheel: Path, root: Path, cc: str, out_dir: Path) -> Path:
    """Compile the native core for aarch64 with `cc` (a cross compiler) against the arm64 root's Python headers,
    and write the x86-64 wheel's files with that module in place of its own."""
    include = root / "usr/include/python3.11"
    plat_include = root / "usr/include/aarch64-linux-gnu/python3.11"
    if not (include / "Python.h").is_file() or not (plat_include / "pyconfig.h").is_file():
        raise WheelError(f"{root}: no Python headers (libpython3.11-dev in the arm64 root: packaging/pi_root.sh)")
    sys.path.insert(0, str(REPO / "native"))
    import build_native   # noqa: E402 - the cdef and sources live there

    with tempfile.TemporaryDirectory() as tmp:
        c_file = Path(tmp) / "_native.c"
        ffi = build_native.make_ffi(relative=False)
        with contextlib.redirect_stdout(io.StringIO()):   # cffi says "generating ..." on stdout
            ffi.emit_c_code(str(c_file))
        so = Path(tmp) / "_native.abi3.so"
        # Debian's Python.h includes <aarch64-linux-gnu/python3.11/pyconfig.h>: that one directory, not the root's
        # whole /usr/include (the cross compiler brings its own libc headers)
        (Path(tmp) / "aarch64-linux-gnu").mkdir()
        (Path(tmp) / "aarch64-linux-gnu" / "python3.11").symlink_to(plat_include)
        cmd = [cc, *build_native.CFLAGS, "-shared", f"-I{include}", f"-I{tmp}", f"-I{build_native.HERE}", "-o", str(so), str(c_file),
               *(os.path.join(build_native.HERE, s) for s in build_native.SOURCES), "-pthread", "-lm"]
        subprocess.run(cmd, check=True)
        so_bytes = so.read_bytes()
    files = read_wheel(wheel)
    if MODULE not in files:
        raise WheelError(f"{wheel.name}: no {MODULE} to replace")
    files[MODULE] = so_bytes
    machine, glibc, _, _ = module_facts(so_bytes)
    if machine != "aarch64":
        raise WheelError(f"{cc} built a {machine} module, not aarch64")
    return write_wheel(files, f"cp311-abi3-{platform_tag(machine, glibc)}", out_dir)


def check(wheel: Path) -> list[str]:
    """Problems with a binary wheel: its tag against its module's real needs, and what it must carry."""
    problems = []
    m = re.fullmatch(r"(?P<name>[^-]+)-(?P<ver>[^-]+)-(?P<py>[^-]+)-(?P<abi>[^-]+)-(?P<plat>[^-]+)\.whl", wheel.name)
    if not m:
        return [f"{wheel.name}: not a wheel file name"]
    files = read_wheel(wheel)
    info = dist_info(files)
    tags = re.findall(r"(?m)^Tag: (.*)$", files[f"{info}/WHEEL"].decode())
    want = f"{m['py']}-{m['abi']}-{m['plat']}"
    if tags != [want]:
        problems.append(f"WHEEL says {tags}, the file name {want}")
    if (m["py"], m["abi"]) != ("cp311", "abi3"):
        problems.append(f"tagged {m['py']}-{m['abi']}, expected cp311-abi3 (the module is built on the stable ABI)")
    if not any(n.startswith(f"{info}/") and n.rsplit("/", 1)[-1] == "LICENSE" for n in files):
        problems.append("no LICENSE in the .dist-info")
    sos = [n for n in files if n.endswith(".so")]
    if sos != [MODULE]:
        problems.append(f"shared objects {sos}, expected exactly {MODULE}")
        return problems
    machine, glibc, libs, imported = module_facts(files[MODULE])
    pm = re.fullmatch(r"manylinux_(\d+)_(\d+)_(x86_64|aarch64)", m["plat"])
    if not pm:
        problems.append(f"platform tag {m['plat']} is not manylinux_X_Y_ARCH")
    else:
        if pm[3] != machine:
            problems.append(f"tagged {pm[3]}, the module is {machine}")
        tagged = (int(pm[1]), int(pm[2]))
        if tagged < glibc:
            newer = sorted(f"{s}@{v}" for s, v in imported if v.startswith("GLIBC_") and
                           tuple(int(x) for x in v[6:].split(".")[:2]) > tagged)
            problems.append(f"tagged glibc {tagged[0]}.{tagged[1]} but the module needs {glibc[0]}.{glibc[1]}: "
                            f"{', '.join(newer)}")
        elif tagged > glibc:
            problems.append(f"tagged glibc {tagged[0]}.{tagged[1]}, more than the {glibc[0]}.{glibc[1]} it needs")
    if not libs <= ALLOWED_LIBS:
        problems.append(f"links against {sorted(libs - ALLOWED_LIBS)}, which a manylinux system need not have")
    for lib in ("libstdc++", "libgcc_s", "libgomp"):
        if any(lib in x for x in libs):
            problems.append(f"needs {lib}")
    pure = [n for n in files if n.startswith("edgellm/") and n.endswith(".py")]
    if not any(n == "edgellm/cli.py" for n in pure) or not any(n.startswith("edgellm/quant/") for n in pure):
        problems.append("the Python package is incomplete (edgellm/cli.py or edgellm/quant/ missing)")
    return problems


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("retag")
    r.add_argument("wheel", type=Path)
    c = sub.add_parser("cross")
    c.add_argument("wheel", type=Path)
    c.add_argument("--root", type=Path, required=True)
    c.add_argument("--cc", default="aarch64-linux-gnu-gcc")
    c.add_argument("--out", type=Path, default=None)
    k = sub.add_parser("check")
    k.add_argument("wheels", type=Path, nargs="+")
    a = ap.parse_args(argv)
    try:
        if a.cmd == "retag":
            print(retag(a.wheel))
        elif a.cmd == "cross":
            if shutil.which(a.cc) is None:
                raise WheelError(f"{a.cc} not found (Debian: apt-get install gcc-aarch64-linux-gnu)")
            print(cross(a.wheel, a.root, a.cc, a.out or a.wheel.parent))
        else:
            bad = 0
            for w in a.wheels:
                problems = check(w)
                print(f"{w.name}: " + ("ok" if not problems else "; ".join(problems)))
                bad += bool(problems)
            return 1 if bad else 0
    except (WheelError, OSError, subprocess.CalledProcessError, zipfile.BadZipFile, KeyError) as e:
        print(f"wheel_tools: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
