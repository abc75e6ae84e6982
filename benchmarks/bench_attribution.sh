#!/usr/bin/env bash
# Installs the comparison package into .bench-deps (not into the app's environment), then runs the benchmark.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/pip install -q --disable-pip-version-check --no-deps --target .bench-deps knowledge-neurons==0.0.2 einops
exec .venv/bin/python benchmarks/bench_attribution.py "$@"
