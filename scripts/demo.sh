#!/usr/bin/env bash
# Quick start: set up, then train the default job (ds_configs/quickstart.json) on 2 CPU ranks
# (or 2 GPUs when present) through the real deepspeed launcher. Extra arguments go to run.py (--set ...).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup.sh
export PATH="$ROOT/.venv/bin:$PATH"
NUM=${NUM_RANKS:-2}
deepspeed --num_gpus "$NUM" --master_port "${MASTER_PORT:-29577}" run.py --config ds_configs/quickstart.json "$@"
