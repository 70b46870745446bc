#!/usr/bin/env bash
# Install everything napari-anopilad needs on a fresh Debian machine: the apt packages that
# Xvfb and Qt's xcb platform plugin need, and a virtual environment in .venv with the package,
# its Qt binding and the test tools. Safe to run again: finished steps are skipped quickly.
set -euo pipefail
cd "$(dirname "$0")/.."

apt_packages=(xvfb xauth libxcb-icccm4 libxcb-image0 libxcb-keysyms1 libxcb-randr0
  libxcb-render-util0 libxcb-xinerama0 libxcb-xfixes0 libxcb-shape0 libxkbcommon-x11-0
  libxcb-cursor0 libdbus-1-3 libegl1 libgl1-mesa-dri libfontconfig1)
missing=()
for package in "${apt_packages[@]}"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "ok installed" || missing+=("$package")
done
if [ ${#missing[@]} -gt 0 ]; then
  sudo_cmd=""
  [ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"
  echo "setup: installing apt packages: ${missing[*]}"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  "$python" -m venv .venv
fi
stamp=.venv/.napari-anopilad-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "setup: installing napari-anopilad and its dependencies into .venv (a few minutes the first time)"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e ".[qt,testing]"
  touch "$stamp"
fi
