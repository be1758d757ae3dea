#!/usr/bin/env bash
# The one-command GPU smoke (scripts/gpu_smoke.py): build, train, export, serve on one GPU; one JSON of figures.
#   bash scripts/gpu-smoke.sh              # on a GPU machine (the figures go to benchmarks/results/gpu.json)
#   bash scripts/gpu-smoke.sh --dry-run    # on CPU: validates the configs, starts nothing
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh >&2
source scripts/offline-env.sh
exec .venv/bin/python scripts/gpu_smoke.py "$@"
