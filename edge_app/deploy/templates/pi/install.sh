#!/usr/bin/env bash
# Install this cxr-edge bundle on 64-bit Raspberry Pi OS (bookworm, Python 3.11, aarch64), offline.
#   sudo ./install.sh               venv, app and model under $PREFIX; the kiosk starts at boot
#   sudo ./install.sh --no-systemd  the same without the user and the unit (chroots, containers)
# The kiosk needs a staff PIN (History, Settings, exit): CXR_KIOSK_PIN=123456 sets it, otherwise a
# random one is made and printed once; it is kept in $STATE_DIR/app.json, readable by the kiosk only.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=bundle.env
source "$HERE/bundle.env"  # PREFIX, KIOSK_USER, UNIT, MODEL, STATE_DIR

SYSTEMD=1
for arg in "$@"; do
    case $arg in
        --no-systemd) SYSTEMD=0 ;;
        -h | --help) sed -n '2,4p' "$0"; exit 0 ;;
        *) echo "install: unknown option $arg" >&2; exit 2 ;;
    esac
done

die() { echo "install: $*" >&2; exit 1; }
say() { echo "install: $*"; }

[[ $(id -u) == 0 ]] || die "run as root: sudo $0"
[[ $(uname -m) == aarch64 ]] ||
    die "this bundle is for 64-bit Raspberry Pi OS (aarch64); this machine is $(uname -m)"
command -v python3 >/dev/null || die "python3 is missing: apt install python3 python3-venv"
python3 -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' ||
    die "needs Python 3.11 (the wheels are built for cp311); found $(python3 -V 2>&1)"
python3 -c 'import venv, ensurepip' 2>/dev/null || die "python3-venv is missing: apt install python3-venv"

say "checking the bundle's files"
(cd "$HERE" && sha256sum --quiet --strict -c SHA256SUMS) ||
    die "files of the bundle are damaged (SHA256SUMS does not match): copy the bundle again"

say "virtual environment in $PREFIX/venv"
mkdir -p "$PREFIX"
rm -rf "$PREFIX/venv"
python3 -m venv "$PREFIX/venv"
pip=("$PREFIX/venv/bin/python" -m pip install --disable-pip-version-check --no-deps
     --only-binary=:all: --require-hashes -r "$HERE/requirements.txt")
if [[ -d $HERE/wheels ]]; then
    "${pip[@]}" --no-index --find-links "$HERE/wheels"
else
    say "this bundle has no wheels/: installing from PyPI (needs internet)"
    "${pip[@]}"
fi

say "app and model in $PREFIX"
rm -rf "$PREFIX/app" "$PREFIX/model"
cp -a "$HERE/app" "$HERE/model" "$HERE/README.md" "$HERE/bundle.json" "$PREFIX/"
site=$("$PREFIX/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')
echo "$PREFIX/app" >"$site/cxr_edge_app.pth"  # `python -m edge_app` works without PYTHONPATH

# ai-edge-litert's WebGPU accelerator is built for ARMv8.1+ (LSE atomics) and aborts the process
# (SIGILL) when LiteRT loads it on a Cortex-A72 (Pi 4) or A53 (Pi 3); the CPU paths do not need it.
if [[ -r /proc/cpuinfo ]] && ! grep -q '^Features.*\batomics\b' /proc/cpuinfo; then
    say "this CPU has no LSE atomics (Pi 4 or older): removing LiteRT's WebGPU accelerator"
    rm -f "$site/ai_edge_litert/libLiteRtWebGpuAccelerator.so"
fi

say "smoke test: loading the model"
"$PREFIX/venv/bin/python" -m edge_app info --model "$PREFIX/model/$MODEL" >/dev/null ||
    die "the installed app cannot load its model: see the error above"

missing=()
for lib in libdrm.so.2 libgbm.so.1 libEGL.so.1 libGLESv2.so.2; do
    ldconfig -p | grep -q "$lib" || missing+=("$lib")
done
if ((${#missing[@]})); then
    say "WARNING: the kiosk display needs ${missing[*]}:" \
        "apt install libdrm2 libgbm1 libegl1 libgles2 libgl1-mesa-dri (headless screening works without them)"
fi

if ((SYSTEMD)); then
    id -u "$KIOSK_USER" >/dev/null 2>&1 ||
        useradd --system --no-create-home --home-dir "$STATE_DIR" --shell /usr/sbin/nologin "$KIOSK_USER"
    for group in video render input; do
        getent group "$group" >/dev/null && usermod -a -G "$group" "$KIOSK_USER"
    done
    install -d -m 750 -o "$KIOSK_USER" "$STATE_DIR"
    if [[ ! -f "$STATE_DIR/app.json" ]]; then
        pin=${CXR_KIOSK_PIN:-$(od -An -N4 -tu4 /dev/urandom | tr -d ' ' | tail -c 7)}
        [[ "$pin" =~ ^[0-9]{4,}$ ]] || die "CXR_KIOSK_PIN must be at least 4 digits"
        printf '{"kiosk_pin": "%s"}\n' "$pin" > "$STATE_DIR/app.json"
        chown "$KIOSK_USER" "$STATE_DIR/app.json"
        chmod 600 "$STATE_DIR/app.json"
        say "kiosk staff PIN: $pin (kept in $STATE_DIR/app.json; change it there or in Settings)"
    fi
    install -m 644 "$HERE/$UNIT" "/etc/systemd/system/$UNIT"
    systemctl daemon-reload
    systemctl enable "$UNIT"
    say "kiosk enabled: it starts at the next boot (now: systemctl start $UNIT; logs: journalctl -u $UNIT)"
fi
say "done: $PREFIX/venv/bin/python -m edge_app predict IMAGE --model $PREFIX/model/$MODEL"
