#!/usr/bin/env bash
# One-command set-up for a fresh machine.
#   bash setup.sh app    create .venv, install everything, fetch the default model once, launch the app
#   bash setup.sh test   the same set-up, then run the whole test suite
set -euo pipefail
cd "$(dirname "$0")"
mode="${1:-app}"
case "$mode" in app|test) ;; *) echo "usage: bash setup.sh app|test" >&2; exit 2 ;; esac
python="${PYTHON:-python3}"

if [ ! -x .venv/bin/python ]; then
  # Reuse a torch the system Python already has (CPU or CUDA) instead of downloading another one.
  if "$python" -c "import torch" 2>/dev/null; then
    "$python" -m venv --system-site-packages .venv
  else
    "$python" -m venv .venv
  fi
fi
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  # An exact pin: on these machines it resolves to the local CPU build, never the multi-GB CUDA wheels.
  .venv/bin/pip install --disable-pip-version-check "torch==2.13.0"
fi
# the tests also run the Ray backend (kn_core/cluster.py), an optional extra for users
extras="dev"; [ "$mode" = test ] && extras="dev,cluster"
.venv/bin/pip install --disable-pip-version-check -q -e ".[$extras]"

# Qt's window system plugin (xcb) needs system libraries that a bare Debian/Ubuntu lacks; the tests also need
# a virtual X server. Install what is missing (as root), or say exactly how and stop.
missing=$(.venv/bin/python -m kn_gui.platform_check || true)
tools=""
if [ "$mode" = test ]; then
  command -v Xvfb >/dev/null || tools="$tools xvfb"
  command -v xwininfo >/dev/null || tools="$tools x11-utils"
  # tests/test_e2e_x11.py drives the real app with real X input events under a window manager
  command -v xdotool >/dev/null || tools="$tools xdotool"
  command -v openbox >/dev/null || tools="$tools openbox"
  # tests/test_html_report.py opens the HTML report in a real headless browser
  command -v chromium >/dev/null || command -v chromium-browser >/dev/null || tools="$tools chromium"
fi
if [ -n "$missing$tools" ]; then
  debian=$(.venv/bin/python -c "from kn_gui.platform_check import DEBIAN_PACKAGES; print(DEBIAN_PACKAGES)")
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing Qt's system libraries${tools:+ and$tools} with apt-get" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $debian $tools >/dev/null
  else
    fedora=$(.venv/bin/python -c "from kn_gui.platform_check import FEDORA_PACKAGES; print(FEDORA_PACKAGES)")
    echo "Qt's xcb platform plugin cannot load (missing: ${missing:-none}${tools:+; test tools:$tools}). Install, then run this again:" >&2
    echo "  Debian/Ubuntu: sudo apt-get update && sudo apt-get install -y $debian${tools:+ $tools}" >&2
    echo "  Fedora:        sudo dnf install -y $fedora${tools:+ xorg-x11-server-Xvfb xorg-x11-utils chromium xdotool openbox}" >&2
    echo "  (elsewhere: any Chromium on PATH as chromium, for tests/test_html_report.py)" >&2
    exit 2
  fi
  missing=$(.venv/bin/python -m kn_gui.platform_check || true)
  if [ -n "$missing" ]; then
    echo "Qt's xcb platform plugin still cannot load: missing $missing" >&2
    exit 2
  fi
fi
if [ "$mode" = test ] && ! command -v chromium >/dev/null && ! command -v chromium-browser >/dev/null; then
  echo "Chromium is still missing; tests/test_html_report.py opens the HTML report in it. Install Debian's chromium" >&2
  echo "(sudo apt-get install -y chromium) or any Chromium on PATH, then run this again." >&2
  exit 2
fi
.venv/bin/kn model fetch

if [ "$mode" = app ]; then
  exec .venv/bin/kn-studio --model default
fi
export QT_QPA_PLATFORM=offscreen
exec .venv/bin/python -m pytest -q
