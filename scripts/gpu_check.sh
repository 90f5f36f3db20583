#!/usr/bin/env bash
# The GPU check: what a lent GPU machine (one H100/H200, Python 3.12, torch 2.11 + CUDA 13, no DeepSpeed, no
# network) runs as it is, in under 8 minutes, leaving a few small files.
#
#   bash scripts/gpu_wheels.sh                 # here, once: .whl/ (DeepSpeed and what that image lacks)
#   bash scripts/gpu_check.sh                  # there, with .whl carried (device run: carry [".whl"])
#   bash scripts/gpu_check.sh --dry-run        # the same script on a CPU at tiny sizes (tests/launch/test_gpu_check.py)
#   options: --out DIR (default $OUT, else a fresh /tmp folder), --budget SECONDS (default 480; dry run 1800),
#            run names to run only those: r50 r50_fsdp r100_z3 pfc prof_r50 fit_r50 fit_r2060 layout r2060
#
# Before any run: .whl/ is installed with pip --no-index into a temporary site folder (when DeepSpeed is not
# importable already), then `torch.cuda.is_available()` and `import deepspeed` must hold, else exit 2 with one
# line. The plan, in order, each run under its own time limit and all within the budget:
#   r50       run.py, ds_configs/r50.json: r50, bf16 (torch_autocast), micro-batch 128, 30 steps, ZeRO-0
#   r50_fsdp  run.py, ds_configs/r50_fsdp.json: the same under FSDP2 (bf16 compute, fp32 shards)
#   r100_z3   run.py, ds_configs/r100.json at ZeRO-3 with DeepSpeed's activation checkpointing of every stage
#   pfc       bench/pfc_scale.py device: the Partial FC head alone, 1M and 10M classes, offload none and cpu
#             (median step, peak device memory, host RSS, pinned bytes asked vs held by the allocator)
#   prof_r50  python -m engine.profile on r50 (2 warm-up + 5 profiled steps): MFU, phases, memory vs engine.plan
#   fit_r50   run.py, ds_configs/r50.json with engine.auto=true: the planner's choice for this card (its memory,
#             the card's datasheet), its predicted step time and memory beside the measured ones
#   fit_r2060 the same for ds_configs/r2060.json (micro-batch 64 as shipped)
#   layout    bench/channels_last.py: r50 and r100 forward + backward, bf16, micro-batch 128, NCHW vs NHWC vs NHWC
#             images with NCHW weights (the CNN recipes' engine.model.channels_last=true: is it faster on this card,
#             and where the weights stay NCHW: ZeRO 1-3, FSDP2, DeepSpeed's bf16 block?)
#   r2060     run.py, ds_configs/r2060.json at micro-batch 8 (ZeRO-3 + checkpointing), with the time left
# Training runs: synthetic noise data made on the device (the recipes' datasets are not there; their class counts
# are: MS1MV3's 93,431), no checkpoints (every=0, every_minutes=0), export=false, no .bin evaluation, and a
# time limit that ends a run with SIGKILL (a SIGTERM would make it write a stop checkpoint: 4.5 GB for r2060).
# Their folders live in a scratch folder on the machine; only small files go to the output folder (at most 8
# come back from a lent machine): results.json (machine, every run's figures: img/s, MFU against the card's
# datasheet peak, peak allocated and reserved memory, the profile's summary, the head's table), table.txt,
# gpu_check.log (this script's output), runs.log (every run's own log) and profile_r50.png.
# Exit status: 0 all ran, 1 a run failed or timed out, 2 no GPU or no DeepSpeed (or a bad argument).
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

ALL_RUNS=(r50 r50_fsdp r100_z3 pfc prof_r50 fit_r50 fit_r2060 layout r2060)
DRY=0
BUDGET=""
RESULTS="${OUT:-}"
SELECTED=()
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --out) RESULTS="${2:?--out needs a folder}"; shift ;;
    --budget) BUDGET="${2:?--budget needs seconds}"; shift ;;
    -h|--help) sed -n '2,30p' "$0"; exit 0 ;;
    r50|r50_fsdp|r100_z3|pfc|prof_r50|fit_r50|fit_r2060|layout|r2060) SELECTED+=("$1") ;;
    *) echo "gpu_check.sh: unknown argument '$1' (known: --dry-run, --out DIR, --budget S, ${ALL_RUNS[*]})" >&2
       exit 2 ;;
  esac
  shift
done
[ "${#SELECTED[@]}" -gt 0 ] || SELECTED=("${ALL_RUNS[@]}")
selected() { local n; for n in "${SELECTED[@]}"; do [ "$n" = "$1" ] && return 0; done; return 1; }
[ -n "$BUDGET" ] || BUDGET=$([ "$DRY" = 1 ] && echo 1800 || echo 480)
[ -n "$RESULTS" ] || RESULTS="$(mktemp -d /tmp/arcscale_gpu_check.XXXXXX)"
mkdir -p "$RESULTS"
WORK="$(mktemp -d /tmp/arcscale_gpu_work.XXXXXX)"  # run folders, the site folder: never in $RESULTS
exec > >(tee "$RESULTS/gpu_check.log") 2>&1
TEE_PID=$!
# at exit: the scratch folder goes, and gpu_check.log is complete before the script's status is seen
trap 'rm -rf "$WORK"; exec 1>&- 2>&-; wait "$TEE_PID" 2>/dev/null' EXIT
START=$(date +%s)
elapsed() { echo $(( $(date +%s) - START )); }

# The interpreter: the machine's python3 (its torch) on a GPU machine; the repo's venv for the dry run.
if [ -n "${PYTHON:-}" ]; then
  PY="$PYTHON"
elif [ "$DRY" = 1 ] && [ -x "$ROOT/.venv/bin/python" ]; then
  PY="$ROOT/.venv/bin/python"
else
  PY="$(command -v python3 || command -v python)"
fi
if [ "$DRY" = 1 ]; then
  export CUDA_VISIBLE_DEVICES=""  # the CPU path, also on a machine with GPUs
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

# DeepSpeed from the wheelhouse when this Python lacks it (the lent machine): a temporary site folder.
if ! "$PY" -c 'import deepspeed' >/dev/null 2>&1 && compgen -G "$ROOT/.whl/*.whl" >/dev/null; then
  echo "gpu_check: installing $(ls "$ROOT"/.whl/*.whl | wc -l) wheels from .whl/ into $WORK/site"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site" \
    "$ROOT"/.whl/*.whl 2>&1 | grep -v "is ignored" | tail -n 5
  export PYTHONPATH="$WORK/site:$PYTHONPATH"
fi
if ! CHECK=$("$PY" - "$DRY" <<'EOF' 2>&1
import sys
try:
    import torch
except Exception as exc:
    print(f"import torch failed ({type(exc).__name__}: {exc})"); sys.exit(2)
if sys.argv[1] != "1" and not torch.cuda.is_available():
    print(f"torch.cuda.is_available() is False (torch {torch.__version__}, CUDA build {torch.version.cuda}): "
          f"no GPU to check"); sys.exit(2)
try:
    import deepspeed
except Exception as exc:
    print(f"import deepspeed failed ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}): "
          f"build .whl/ with scripts/gpu_wheels.sh and carry it"); sys.exit(2)
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
print(f"versions: python {sys.version.split()[0]} | torch {torch.__version__} | cuda {torch.version.cuda} | "
      f"gpu {gpu} | deepspeed {deepspeed.__version__}")
EOF
); then
  echo "gpu_check: $(echo "$CHECK" | tail -n 1)"
  exit 2
fi

{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "git: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  command -v nvidia-smi >/dev/null 2>&1 && [ "$DRY" != 1 ] && \
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | sed 's/^/gpu: /'
  echo "$CHECK" | grep "^versions: "
} | tee "$WORK/machine.txt"

# name | entry and its arguments | --set overrides (space separated, no spaces inside one) | limit (s)
TRAIN_SETS="engine.data.source=synthetic engine.data.synthetic=noise gradient_accumulation_steps=1 \
engine.checkpoint.every=0 engine.checkpoint.every_minutes=0 engine.checkpoint.export=false engine.eval.targets=[]"
if [ "$DRY" = 1 ]; then
  echo "gpu_check: dry run on the CPU (tiny sizes, fp32; the numbers are not GPU numbers)"
  DRY_LIMIT=300  # generous: on a loaded CPU start-up alone can take a minute; the dry run checks the path
  SMALL="engine.model.name=r18 train_micro_batch_size_per_gpu=2 engine.head.num_classes=50 \
torch_autocast.enabled=false"
  RUNS=(
    "r50|run.py --config ds_configs/r50.json|$SMALL engine.train.max_steps=2 engine.train.log_every=1|$DRY_LIMIT"
    "r50_fsdp|run.py --config ds_configs/r50_fsdp.json|$SMALL engine.train.max_steps=2 engine.train.log_every=1|$DRY_LIMIT"
    "r100_z3|run.py --config ds_configs/r100.json|$SMALL zero_optimization.stage=3 engine.model.checkpoint=all \
activation_checkpointing={\"partition_activations\":false} engine.train.max_steps=2 engine.train.log_every=1|$DRY_LIMIT"
    "pfc|bench/pfc_scale.py device --classes 20000,50000 --batch 32 --emb 32 --sample-rate 0.1 --steps 2 --warmup 1 \
--offload none,cpu||$DRY_LIMIT"
    "prof_r50|-m engine.profile --config ds_configs/r50.json --warmup 1 --steps 1|$SMALL|$DRY_LIMIT"
    "fit_r50|run.py --config ds_configs/r50.json|$SMALL engine.auto=true engine.auto_mem_gb=8 \
engine.train.max_steps=2 engine.train.log_every=1|$DRY_LIMIT"
    "fit_r2060|run.py --config ds_configs/r2060.json|$SMALL engine.auto=true engine.auto_mem_gb=8 \
engine.train.max_steps=2 engine.train.log_every=1|$DRY_LIMIT"
    "layout|bench/channels_last.py --backbones r18 --precision fp32 --micro-batch 2 --rounds 1||$DRY_LIMIT"
    "r2060|run.py --config ds_configs/r2060.json|engine.model.name=r18 train_micro_batch_size_per_gpu=2 \
engine.head.num_classes=50 torch_autocast.enabled=false engine.train.max_steps=2 engine.train.log_every=1|$DRY_LIMIT"
  )
else
  RUNS=(
    "r50|run.py --config ds_configs/r50.json|train_micro_batch_size_per_gpu=128 engine.train.max_steps=30 \
engine.train.log_every=10|90"
    "r50_fsdp|run.py --config ds_configs/r50_fsdp.json|train_micro_batch_size_per_gpu=128 engine.train.max_steps=30 \
engine.train.log_every=10|90"
    "r100_z3|run.py --config ds_configs/r100.json|train_micro_batch_size_per_gpu=128 zero_optimization.stage=3 \
engine.model.checkpoint=all activation_checkpointing={\"partition_activations\":false} engine.train.max_steps=20 \
engine.train.log_every=10|100"
    "pfc|bench/pfc_scale.py device --classes 1000000,10000000 --batch 512 --emb 128 --sample-rate 0.1 --steps 5 \
--warmup 2 --offload none,cpu||120"
    "prof_r50|-m engine.profile --config ds_configs/r50.json --warmup 2 --steps 5|train_micro_batch_size_per_gpu=128|90"
    "fit_r50|run.py --config ds_configs/r50.json|engine.auto=true engine.head.num_classes=93431 \
engine.train.max_steps=20 engine.train.log_every=10|75"
    "fit_r2060|run.py --config ds_configs/r2060.json|engine.auto=true engine.head.num_classes=93431 \
engine.train.max_steps=8 engine.train.log_every=2|120"
    "layout|bench/channels_last.py --backbones r50,r100 --precision bf16 --micro-batch 128 --rounds 5||60"
    "r2060|run.py --config ds_configs/r2060.json|train_micro_batch_size_per_gpu=8 engine.train.max_steps=4 \
engine.train.log_every=1|0"  # 0: whatever the budget has left
  )
fi
RESERVE=20  # seconds kept for the summary at the end
MIN_RUN=$([ "$DRY" = 1 ] && echo 10 || echo 45)  # a run is not started with less than this left

FAILED=0
: >"$RESULTS/runs.log"
for spec in "${RUNS[@]}"; do
  IFS='|' read -r NAME ENTRY SETS LIMIT <<<"$spec"
  selected "$NAME" || continue
  left=$(( BUDGET - $(elapsed) - RESERVE ))
  if [ "$LIMIT" = 0 ] || [ "$LIMIT" -gt "$left" ]; then LIMIT=$left; fi
  DIR="$WORK/runs/$NAME"
  mkdir -p "$DIR"
  if [ "$LIMIT" -lt "$MIN_RUN" ]; then
    echo "== $NAME: skipped, ${left} s of the ${BUDGET} s budget left" | tee "$DIR/log.txt"
    echo "skipped" >"$DIR/rc"
    continue
  fi
  read -r -a ARGS <<<"$ENTRY"
  case "$ENTRY" in
    bench/*) ARGS+=(--json "$DIR/results.json") ;;
    *) for s in $TRAIN_SETS $SETS; do ARGS+=(--set "$s"); done
       ARGS+=(--set "engine.train.output_dir=$DIR/out") ;;
  esac
  echo "== $NAME ($(elapsed) s in): $PY ${ARGS[*]}"
  t0=$(date +%s)
  # SIGKILL at the limit: a SIGTERM asks the trainer for a stop checkpoint
  timeout --signal=KILL "$LIMIT" "$PY" "${ARGS[@]}" >"$DIR/log.txt" 2>&1
  RC=$?
  echo "$RC" >"$DIR/rc"
  (cd "$DIR" && find . -type f ! -name files.txt -printf '%s %P\n' | sort -k2) >"$DIR/files.txt"  # what it wrote
  echo "   rc $RC after $(( $(date +%s) - t0 )) s (limit $LIMIT s), wrote $(awk '{s += $1} END {printf "%.1f", s / 1048576}' \
    "$DIR/files.txt") MiB"
  { echo "==== $NAME: rc $RC"; cat "$DIR/log.txt"; } >>"$RESULTS/runs.log"
  if [ "$RC" != 0 ]; then
    FAILED=1
    tail -n 12 "$DIR/log.txt" | sed 's/^/   | /'
  fi
done

# The summary: results.json, table.txt and the profile's plot; nothing else of the run folders leaves.
"$PY" "$ROOT/scripts/gpu_check_report.py" "$WORK" "$RESULTS" "$DRY" "${SELECTED[@]}" || FAILED=1
echo "gpu_check: $(elapsed) s of the ${BUDGET} s budget; results in $RESULTS"
exit "$FAILED"
