#!/usr/bin/env bash
# `make test-pi`: the whole program on an aarch64 Python, as a Raspberry Pi 4 and a Pi 5 run it, under qemu.
#
# In the arm64 Debian root (packaging/pi_root.sh, cached under ~/.cache/edgellm-pi): a fresh venv gets the aarch64
# wheel from dist/ (`make wheels`) and its dependencies as aarch64 wheels from PyPI (cached), with --only-binary
# and no compiler in the root, so nothing can be compiled. Then, with the CPU presented as a Cortex-A72 (Pi 4:
# NEON, no dot product) and a Cortex-A76 (Pi 5: dot product):
#   - `edgellm run smollm2 -p ...` answers, on the ISA that CPU should get (neon / neon-dotprod), no SIGILL
#   - `edgellm tokenize` gives llama.cpp's ids
#   - packaging/pi_check.py: every tokenizer fixture and the logits fixtures of SmolLM2 and Gemma 3 (top-1 >= 0.95),
#     and 4 one-token decode steps against the teacher-forced rows (the decode kernels)
# and the numba fallback (--backend numba) on the A72, one logits case and its 4 decode steps (its JIT compiles for
# minutes under qemu).
# Timings under qemu are not a Pi's speed (docs/raspberry-pi.md).
#
# Overrides: EDGELLM_PI_ROOT, EDGELLM_MODELS (~/.cache/edgellm/models), PI_CPUS ("cortex-a72 cortex-a76"),
# PI_NUMBA=0 (skip the numba run). Exit status: 0 all passed, 1 a failure, 2 a missing input (wheel, models), 3 this
# machine cannot run an arm64 root (no root privileges, no binfmt_misc, no Debian packages).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
MODELS=${EDGELLM_MODELS:-$HOME/.cache/edgellm/models}
CPUS=${PI_CPUS:-cortex-a72 cortex-a76}
CACHE=$HOME/.cache/edgellm-pi
start=$(date +%s)
fails=0
say() { echo "test_pi: $*"; }
fail() { say "FAIL: $*"; fails=$((fails + 1)); }

root=$(bash packaging/pi_root.sh) || { say "SKIPPED: this machine cannot make or run an arm64 root (above)"; exit 3; }
wheel=$(ls dist/edgellm-*-manylinux_*_aarch64.whl 2>/dev/null | head -1)
[ -n "$wheel" ] || { say "no aarch64 wheel in dist/: run make wheels"; exit 2; }
smol=$MODELS/SmolLM2-135M-Instruct.Q4_1.gguf
gemma=$MODELS/gemma-3-270m-q4_k_m.gguf
if [ ! -f "$smol" ] || [ ! -f "$gemma" ]; then
    "$PY" -m edgellm.cli pull smollm2 >/dev/null && "$PY" -m edgellm.cli pull gemma3 >/dev/null \
        || { say "models missing and edgellm pull failed"; exit 2; }
fi

# the dependencies as aarch64 / CPython 3.11 wheels, from the wheel's own Requires-Dist
reqs=$("$PY" - "$wheel" <<'PYEOF'
import re, sys, zipfile
z = zipfile.ZipFile(sys.argv[1])
meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
for line in z.read(meta).decode().splitlines():
    if line.startswith("Requires-Dist:") and "extra ==" not in line:
        print(line.split(":", 1)[1].split(";")[0].strip())
PYEOF
)
mkdir -p "$CACHE/wheelhouse"
# shellcheck disable=SC2086
"$PY" -m pip download --quiet --only-binary=:all: --python-version 3.11 --implementation cp \
    --platform manylinux2014_aarch64 --platform manylinux_2_28_aarch64 --platform manylinux_2_34_aarch64 \
    -d "$CACHE/wheelhouse" $reqs 2>&1 | grep -v "is ignored: it is neither" \
    || true
ls "$CACHE"/wheelhouse/numpy-*aarch64*.whl >/dev/null 2>&1 || { say "no aarch64 numpy wheel: pip download failed"; exit 2; }

# what the root sees: wheels, models (hard links where the file system allows), fixtures, the checker
stage=$root/opt/edgellm-test
rm -rf "$stage" "$root/opt/edgellm-venv"
mkdir -p "$stage/wheels" "$stage/models" "$stage/fixtures"
cp "$CACHE"/wheelhouse/*.whl "$wheel" "$stage/wheels/"
for m in "$smol" "$gemma"; do cp -l "$m" "$stage/models/" 2>/dev/null || cp "$m" "$stage/models/"; done
cp tests/fixtures/llamacpp/*.json "$stage/fixtures/"
cp packaging/pi_check.py "$stage/"
cleanup() { umount "$root/proc" 2>/dev/null || true; }
trap cleanup EXIT
mount -t proc proc "$root/proc" 2>/dev/null || say "(no /proc in the root: numba's LLVM guesses the CPU)"

in_root() {   # in_root CPU COMMAND...: run inside the root with qemu presenting CPU
    local cpu=$1; shift
    env -u EDGELLM_ISA -u EDGELLM_BACKEND QEMU_CPU="$cpu" HOME=/root timeout 1200 chroot "$root" "$@"
}

# ---- install: binary wheels only, no compiler anywhere in the root
if in_root cortex-a72 sh -c 'command -v cc || command -v gcc || command -v aarch64-linux-gnu-gcc' >/dev/null; then
    fail "the arm64 root has a C compiler: 'compiles nothing' would not be shown"
fi
in_root cortex-a72 /usr/bin/python3 -m venv /opt/edgellm-venv || { fail "venv"; exit 1; }
log=$(in_root cortex-a72 env CC=/bin/false /opt/edgellm-venv/bin/pip install --no-index --only-binary=:all: \
      --find-links /opt/edgellm-test/wheels "/opt/edgellm-test/wheels/$(basename "$wheel")" 2>&1)
rc=$?
echo "$log" | tail -1
[ $rc -eq 0 ] || { echo "$log" | tail -20; fail "pip install of $(basename "$wheel")"; exit 1; }
echo "$log" | grep -qiE "building wheel|running setup.py|build_ext" && fail "pip built something: $(echo "$log" | grep -iE 'building wheel|setup.py' | head -3)"

m_smol=/opt/edgellm-test/models/$(basename "$smol")
m_gemma=/opt/edgellm-test/models/$(basename "$gemma")
for cpu in $CPUS; do
    case $cpu in cortex-a72) isa=neon ;; *) isa=neon-dotprod ;; esac
    say "=== $cpu (expect the $isa kernels)"
    t0=$(date +%s)
    out=$(in_root "$cpu" /opt/edgellm-venv/bin/edgellm run "$m_smol" -p "The capital of France is" -n 12 --temp 0 \
          --verbose 2>"$CACHE/run.err")
    rc=$?
    [ $rc -eq 132 ] && fail "$cpu: SIGILL"
    [ $rc -eq 0 ] || { tail -5 "$CACHE/run.err"; fail "$cpu: edgellm run exited $rc"; }
    [ -n "$(echo "$out" | tr -d '[:space:]')" ] || fail "$cpu: edgellm run printed nothing"
    grep -q "backend native ($isa)" "$CACHE/run.err" || fail "$cpu: not on native ($isa): $(grep backend "$CACHE/run.err")"
    say "run -p 'The capital of France is' ->$(echo "$out" | tr '\n' ' ') ($(( $(date +%s) - t0 )) s)"

    want=$("$PY" -c "import json; c=[c for c in json.load(open('tests/fixtures/llamacpp/tokenizer-smollm2-135m-instruct-q4_1.json'))['cases'] if len(c['ids']) > 3][0]; print(json.dumps(c['text'])); print(json.dumps({'ids': c['ids']}))")
    text=$(echo "$want" | head -1 | "$PY" -c "import json,sys; print(json.loads(sys.stdin.read()), end='')")
    got=$(in_root "$cpu" /opt/edgellm-venv/bin/edgellm tokenize "$m_smol" "$text" --json --no-add-special)
    [ "$(echo "$got" | "$PY" -c 'import json,sys; print(json.dumps(json.load(sys.stdin)))')" = "$(echo "$want" | tail -1)" ] \
        || fail "$cpu: edgellm tokenize gave $got"

    for m in "$m_smol" "$m_gemma"; do
        in_root "$cpu" /opt/edgellm-venv/bin/python /opt/edgellm-test/pi_check.py "$m" /opt/edgellm-test/fixtures \
            --expect-isa "$isa" --decode 4 || fail "$cpu: fixtures of $(basename "$m")"
    done
done

if [ "${PI_NUMBA:-1}" != 0 ]; then
    say "=== numba fallback (cortex-a72, one logits case; the JIT compiles under qemu first)"
    in_root cortex-a72 /opt/edgellm-venv/bin/python /opt/edgellm-test/pi_check.py "$m_smol" \
        /opt/edgellm-test/fixtures --backend numba --cases 1 --decode 4 2>&1 | grep -v "^Can't read /proc/cpuinfo" \
        || fail "numba fallback"
fi

say "$fails failure(s), $(( $(date +%s) - start )) s"
[ $fails -eq 0 ]
