#!/usr/bin/env bash
# Create .venv at the repo root (if missing) and install ArcScale with its pinned dependencies.
# Idempotent and fast when .venv is already complete: pip is only run when setup.py changed.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $($PY --version 2>&1)"
  "$PY" -m venv .venv
fi
STAMP=.venv/.arcscale-installed
WANT="$(sha256sum setup.py | cut -d' ' -f1)"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
  echo "setup: installing (torch pinned to the CPU build on machines without CUDA)"
  # torch first and pinned, so nothing below can pull a multi-GB CUDA build instead.
  .venv/bin/python -m pip install -q "torch==2.13.0" 2>&1 | grep -v "is ignored" || true
  .venv/bin/python -m pip install -q -e ".[test,dali,export,wandb,mlflow]" 2>&1 | grep -v "is ignored" || true
  .venv/bin/python -c "import torch, deepspeed, numpy, yaml, PIL, tqdm, pytest, nvidia.dali, onnx, onnxruntime, onnxscript, wandb, mlflow" \
    >/dev/null 2>&1 \
    || { echo "setup: installation failed (see pip output above)" >&2; exit 1; }
  echo "$WANT" > "$STAMP"
fi
