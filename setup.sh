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
.venv/bin/pip install --disable-pip-version-check -q -e ".[dev]"
.venv/bin/kn model fetch

if [ "$mode" = app ]; then
  exec .venv/bin/kn-studio --model default
fi
export QT_QPA_PLATFORM=offscreen
exec .venv/bin/python -m pytest -q
