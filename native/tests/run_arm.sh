#!/usr/bin/env bash
# The aarch64 kernels under emulation: cross-build the kernel tests statically and run them under
# qemu-aarch64 as a Cortex-A72 (Raspberry Pi 4: NEON, no dot product) and a Cortex-A76 (Raspberry Pi 5: NEON +
# dotprod). Checks that dispatch.c picks the right ISA from HWCAP on each (and never neon-dotprod on the A72),
# then every NEON table against the plain-C kernels. Exit status non-zero on any failure. `make test-arm`.
#
# Needs gcc-aarch64-linux-gnu and qemu-user (Debian/Ubuntu); installed here when missing.
# Overrides: CROSS_CC (aarch64-linux-gnu-gcc), QEMU (qemu-aarch64), KEEP=1 keeps the build directory.
set -u
cd "$(dirname "$0")/.."   # native/

CROSS_CC=${CROSS_CC:-aarch64-linux-gnu-gcc}
QEMU=${QEMU:-qemu-aarch64}
start=$(date +%s)

if ! command -v "$CROSS_CC" >/dev/null 2>&1 || ! command -v "$QEMU" >/dev/null 2>&1; then
    echo "run_arm: installing the aarch64 cross toolchain and qemu-user (apt-get)"
    SUDO=""
    [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1 && SUDO="sudo"
    $SUDO sh -c 'apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq gcc-aarch64-linux-gnu qemu-user' \
        >/dev/null || { echo "run_arm: apt-get install failed" >&2; exit 2; }
fi

out=$(mktemp -d "${TMPDIR:-/tmp}/edgellm-arm.XXXXXX")
[ "${KEEP:-0}" = 1 ] || trap 'rm -rf "$out"' EXIT

# every core .c file (no -march: the NEON file enables dotprod per function), static so qemu needs no sysroot
core=$(ls ./*.c)
build() {   # build NAME: tests/NAME.c + the core -> $out/NAME
    "$CROSS_CC" -O2 -std=c11 -static -Wall -Wno-unused-function -I. -o "$out/$1" "tests/$1.c" $core -lm -lpthread
}
fails=0
fail() { echo "run_arm: FAIL: $*"; fails=$((fails + 1)); }

build test_kernels || { echo "run_arm: cross-build of test_kernels failed" >&2; exit 1; }
build test_neon_extra || { echo "run_arm: cross-build of test_neon_extra failed" >&2; exit 1; }
build test_quantize || { echo "run_arm: cross-build of test_quantize failed" >&2; exit 1; }
# the weight quantizers on the host too: both must print the same bytes (hash lines)
HOST_CC=${HOST_CC:-cc}
host_quant=""
if command -v "$HOST_CC" >/dev/null 2>&1 && "$HOST_CC" -O2 -std=c11 -Wall -Wno-unused-function -pthread -I. \
        -o "$out/test_quantize_host" tests/test_quantize.c $core -lm; then
    host_quant=$("$out/test_quantize_host") || fail "host: test_quantize"
fi

# run CPU PROGRAM ARGS...: under qemu with the environment's EDGELLM_ISA removed (detection must work alone);
# a timeout so a hang fails instead of stalling CI
run() {
    local cpu=$1; shift
    env -u EDGELLM_ISA timeout 300 "$QEMU" -cpu "$cpu" "$@"
}

for cpu in cortex-a72 cortex-a76; do
    if [ "$cpu" = cortex-a72 ]; then best=neon; isas="neon"; else best=neon-dotprod; isas="neon neon-dotprod"; fi
    echo "=== $cpu (expected best ISA: $best)"

    # 1. auto-detection from HWCAP: the best ISA is active without any forcing; on the A72 sdot is refused
    args=(--detect-only --expect-best "$best" --expect-isa "$best")
    [ "$cpu" = cortex-a72 ] && args+=(--expect-unsupported neon-dotprod)
    run "$cpu" "$out/test_neon_extra" "${args[@]}" || fail "$cpu: ISA detection"

    # 2. EDGELLM_ISA: forcing plain neon on the A76 works; asking for neon-dotprod on the A72 falls back to neon
    if [ "$cpu" = cortex-a72 ]; then forced=neon-dotprod; want=neon; else forced=neon; want=neon; fi
    EDGELLM_ISA=$forced timeout 20 "$QEMU" -cpu "$cpu" "$out/test_neon_extra" --detect-only --expect-isa "$want" \
        || fail "$cpu: EDGELLM_ISA=$forced should give $want (rc $?; 124 = hang)"

    # 3. the owner's kernel test: every ISA this CPU has against the generic kernels
    log=$(run "$cpu" "$out/test_kernels"); rc=$?
    echo "$log" | grep -v '^FAIL' ; echo "$log" | grep '^FAIL' | head -20
    [ $rc -eq 0 ] || fail "$cpu: test_kernels (rc $rc)"
    echo "$log" | grep -qx "best ISA here: $best" || fail "$cpu: test_kernels saw another best ISA"
    for isa in $isas; do
        echo "$log" | grep -Eq "^$isa +[0-9]+ checks, 0 failed" || fail "$cpu: test_kernels did not pass $isa"
    done
    [ "$cpu" = cortex-a72 ] && echo "$log" | grep -q '^neon-dotprod ' && fail "$cpu: neon-dotprod ran on a CPU without sdot"

    # 4. the weight quantizers: round trips, threads, and the same bytes as the host build
    qlog=$(run "$cpu" "$out/test_quantize") || fail "$cpu: test_quantize"
    echo "$qlog" | grep -v '^hash '
    if [ -n "$host_quant" ]; then
        [ "$(echo "$qlog" | grep '^hash ')" = "$(echo "$host_quant" | grep '^hash ')" ] \
            || fail "$cpu: quantized bytes differ from the host's"
    fi

    # 5. the NEON tables in detail: repack bounds, row splits, extreme quants, bit-exact q8a, each ISA forced
    #    and every weight type has its own NEON GEMM (none left on the plain-C one)
    for isa in $isas; do
        xlog=$(run "$cpu" "$out/test_neon_extra" --isa "$isa" --expect-isa "$isa") || fail "$cpu: test_neon_extra --isa $isa"
        echo "$xlog"
        echo "$xlog" | grep '^worst gemm' | grep -q '(generic)' && fail "$cpu: $isa runs a weight type on the generic GEMM"
    done
done

echo "run_arm: $((fails)) failure(s), $(( $(date +%s) - start )) s"
[ $fails -eq 0 ]
