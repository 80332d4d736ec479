#!/usr/bin/env bash
# `make wheels`: the sdist and binary wheels for Linux x86-64 and aarch64 into dist/ (OUT=DIR elsewhere).
#   1. sdist, then the x86-64 wheel built from it (the path a source install takes: the C core compiled by setup.py)
#   2. the x86-64 wheel retagged manylinux_2_NN from the glibc symbol versions its module imports
#   3. the aarch64 wheel: the same files with the core cross-compiled by Debian's aarch64-linux-gnu-gcc against the
#      arm64 root's Python headers (packaging/pi_root.sh makes the root; the cross compiler is installed if missing)
#   4. packaging/wheel_tools.py check (tags, symbols, libraries, LICENSE), and auditwheel show when installed
# Both wheels: cp311-abi3 (CPython 3.11 and later), one portable core each (ISA chosen at run time).
# Exit status 3: this machine cannot make the arm64 root (no root privileges or binfmt_misc); the x86-64 wheel and
# the sdist are then in dist/ all the same.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-dist}
CROSS_CC=${CROSS_CC:-aarch64-linux-gnu-gcc}
say() { echo "wheels: $*" >&2; }

"$PY" -c "import build" 2>/dev/null || "$PY" -m pip install --quiet build
mkdir -p "$OUT"
rm -f "$OUT"/edgellm-*.whl "$OUT"/edgellm-*.tar.gz
say "sdist and x86-64 wheel (python -m build)"
"$PY" -m build --outdir "$OUT" . > "$OUT/build.log" 2>&1 || { tail -30 "$OUT/build.log" >&2; say "build failed"; exit 1; }
grep -q "could not build edgellm._native" "$OUT/build.log" && { say "the native core did not compile:"; \
    grep -A3 "could not build" "$OUT/build.log" >&2; exit 1; }
x86=$("$PY" packaging/wheel_tools.py retag "$OUT"/edgellm-*-linux_x86_64.whl)

if ! command -v "$CROSS_CC" >/dev/null; then
    say "installing $CROSS_CC (apt-get)"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq gcc-aarch64-linux-gnu) >&2 \
        || { say "cannot install $CROSS_CC: no aarch64 wheel"; exit 1; }
fi
root=$(bash packaging/pi_root.sh) || { say "no arm64 root (its Python headers): no aarch64 wheel"; exit 3; }
arm=$("$PY" packaging/wheel_tools.py cross "$x86" --root "$root" --cc "$CROSS_CC" --out "$OUT" 2>/dev/null)

"$PY" packaging/wheel_tools.py check "$x86" "$arm"
if "$PY" -c "import auditwheel" 2>/dev/null; then
    for w in "$x86" "$arm"; do "$PY" -m auditwheel show "$w" 2>/dev/null | sed -n '2,3p' | tr -s '\n ' ' '; echo; done
fi
ls -l "$OUT"/edgellm-*
