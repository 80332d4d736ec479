#!/usr/bin/env bash
# An arm64 Debian (bookworm) root for the Raspberry Pi checks, made once and cached:
#   $EDGELLM_PI_ROOT (default ~/.cache/edgellm-pi/root): python3, venv, pip, and Python's headers (the aarch64
#   wheel's cross-build compiles against them). Prints the root's path on stdout.
#
# Needs root (debootstrap, chroot) and Debian's debootstrap, qemu-user-static and binfmt-support, installed here
# with apt-get when missing: the arm64 binaries of the root then run through the kernel's binfmt_misc and
# qemu-aarch64 (QEMU_CPU picks the CPU it presents). Only Debian's mirror is contacted.
set -euo pipefail

ROOT=${EDGELLM_PI_ROOT:-$HOME/.cache/edgellm-pi/root}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
SUITE=bookworm   # Raspberry Pi OS 12's base: glibc 2.36, Python 3.11
PACKAGES=python3,python3-venv,python3-pip,libpython3.11-dev
say() { echo "pi_root: $*" >&2; }

[ "$(id -u)" -eq 0 ] || { say "needs root (debootstrap and chroot); run as root or under sudo"; exit 2; }

if ! command -v debootstrap >/dev/null || ! command -v qemu-aarch64-static >/dev/null; then
    say "installing debootstrap, qemu-user-static, binfmt-support (apt-get)"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap qemu-user-static \
        binfmt-support) >&2 || { say "apt-get install failed"; exit 2; }
fi

# arm64 executables must run through qemu: binfmt_misc mounted, Debian's qemu-aarch64 entry enabled
if [ ! -e /proc/sys/fs/binfmt_misc/status ]; then
    mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc 2>/dev/null \
        || { say "cannot mount binfmt_misc (an unprivileged container?): arm64 programs cannot run here"; exit 2; }
fi
if [ ! -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]; then
    update-binfmts --enable qemu-aarch64 >&2 2>/dev/null || update-binfmts --import qemu-aarch64 >&2 2>/dev/null || true
fi
grep -q '^enabled' /proc/sys/fs/binfmt_misc/qemu-aarch64 2>/dev/null \
    || { say "binfmt_misc has no enabled qemu-aarch64 entry (qemu-user-static's postinst registers it)"; exit 2; }

if [ -f "$ROOT/.edgellm-root" ] && [ -x "$ROOT/usr/bin/python3" ]; then
    echo "$ROOT"
    exit 0
fi

say "debootstrap $SUITE arm64 into $ROOT (a few minutes, once)"
rm -rf "$ROOT.tmp"
mkdir -p "$(dirname "$ROOT")"
debootstrap --arch=arm64 --variant=minbase --include="$PACKAGES" "$SUITE" "$ROOT.tmp" "$MIRROR" >&2 \
    || { say "debootstrap failed (log: $ROOT.tmp/debootstrap/debootstrap.log)"; exit 2; }
rm -rf "$ROOT"
mv "$ROOT.tmp" "$ROOT"
echo "$SUITE $PACKAGES" > "$ROOT/.edgellm-root"
echo "$ROOT"
