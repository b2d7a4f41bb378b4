#!/usr/bin/env bash
# Build (once) an emulated 64-bit Raspberry Pi OS stand-in: Debian 12 bookworm arm64 with
# python3 + python3-venv, run through qemu-user-static. Cached: a finished rootfs is reused as is.
#
#   sudo bash edge_app/deploy/pi_rootfs.sh build/pi-rootfs [MIRROR]
#
# MIRROR defaults to the one this machine's apt uses. Needs root, debootstrap, qemu-user-static and
# binfmt-support. /proc and /sys are left unmounted afterwards on purpose: LiteRT's CPU detection
# crashes under qemu when both of the host's are visible.
set -euo pipefail

ROOT=${1:?usage: pi_rootfs.sh ROOT [MIRROR]}
apt_mirror() {
    awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null ||
        true
}
MIRROR=${2:-$(apt_mirror)}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
READY="$ROOT/.cxr-rootfs-ready"

if [[ -f $READY ]]; then
    echo "pi-rootfs: cached at $ROOT"
    exit 0
fi
[[ $(id -u) == 0 ]] || { echo "pi-rootfs: needs root (debootstrap, chroot)" >&2; exit 1; }
for tool in debootstrap qemu-aarch64-static update-binfmts; do
    command -v "$tool" >/dev/null ||
        { echo "pi-rootfs: $tool missing: apt-get install debootstrap qemu-user-static binfmt-support" >&2; exit 1; }
done
# In containers binfmt_misc may be unmounted and the qemu handler disabled.
mountpoint -q /proc/sys/fs/binfmt_misc || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
update-binfmts --enable qemu-aarch64 >/dev/null 2>&1 || true

if [[ ! -d $ROOT/debootstrap ]]; then
    rm -rf "$ROOT"
    echo "pi-rootfs: first stage from $MIRROR"
    debootstrap --arch=arm64 --foreign --variant=minbase --include=python3,python3-venv \
        bookworm "$ROOT" "$MIRROR"
fi
cp "$(command -v qemu-aarch64-static)" "$ROOT/usr/bin/"
echo "pi-rootfs: second stage under emulation (many minutes)"
chroot "$ROOT" /debootstrap/debootstrap --second-stage
for mnt in "$ROOT/sys" "$ROOT/proc"; do
    if mountpoint -q "$mnt"; then umount -l "$mnt"; fi
done
chroot "$ROOT" /usr/bin/python3 -c 'import sys, venv, ensurepip; print("pi-rootfs:", sys.version.split()[0])'
touch "$READY"
