#!/usr/bin/env bash
# The Debian packages cxr-edge needs beyond Python's, installed where missing (as root, with apt-get).
#   scripts/install-system-deps.sh           install what is missing
#   scripts/install-system-deps.sh --check   print the missing packages, install nothing (exit 1 if any)
# `make setup` and CI (.ci/run) both run it.
set -euo pipefail

need=()
command -v make >/dev/null || need+=(make)
python3 -c "import venv, ensurepip" 2>/dev/null || need+=(python3-venv)
# GUI tests: Kivy (its wheel bundles SDL2) in a real window under Xvfb, drawn by Mesa's software
# OpenGL; SDL2 dlopens the X11 libraries; libmtdev1 is Kivy's touch input (absent: a logged error).
# GPU path: LiteRT's WebGPU accelerator on SwiftShader (Vulkan in software, shipped with
# chromium) through the Vulkan loader libvulkan1.
for pkg in xvfb xauth libgl1 libgl1-mesa-dri libegl1 libx11-6 libxext6 libxrender1 libxcursor1 \
           libxi6 libxrandr2 libxinerama1 libxss1 libxxf86vm1 libmtdev1 libvulkan1 chromium; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
command -v shellcheck >/dev/null || need+=(shellcheck)          # the Pi bundle's install.sh
command -v systemd-analyze >/dev/null || need+=(systemd)        # its kiosk unit

if [ ${#need[@]} -eq 0 ]; then
  exit 0
fi
install="apt-get update && apt-get install -y --no-install-recommends ${need[*]}"
if [ "${1:-}" = "--check" ]; then
  echo "missing system packages: ${need[*]}"
  exit 1
fi
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
  echo "error: missing system packages: ${need[*]}" >&2
  echo "install them (as root, on Debian/Ubuntu), then run make again:" >&2
  echo "  sudo sh -c '$install'" >&2
  exit 1
fi
echo "installing system packages: ${need[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${need[@]}"
