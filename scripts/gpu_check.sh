#!/usr/bin/env bash
# GPU check for a lent GPU (one H200): short training runs through run.py, one compact table at the end.
#
#   bash scripts/gpu_check.sh              # on the GPU machine: r50, r100, r2060 (< 8 minutes in all)
#   bash scripts/gpu_check.sh pfc          # the Partial FC head check alone (~5 minutes), see below
#   bash scripts/gpu_check.sh fsdp         # FSDP2 vs DeepSpeed (~7 minutes): r50 r50_fsdp r2060_fsdp
#   bash scripts/gpu_check.sh profile      # engine.profile (~8 minutes): prof_r50 prof_r100 prof_r2060
#   bash scripts/gpu_check.sh r50 pfc      # any selection of r50 r100 r2060 r50_fsdp r2060_fsdp prof_r50
#                                          #   prof_r100 prof_r2060 pfc
#   bash scripts/gpu_check.sh --dry-run    # CPU smoke test of the same script (also: CPU_SMOKE=1)
#
# Runs (synthetic "noise" data made on the device, summary.json read after each run):
#   r50   bf16 (torch_autocast), micro-batch 128, 30 steps, ZeRO-0 (ds_configs/r50.json)
#   r100  bf16 (torch_autocast), micro-batch 128, 30 steps, ZeRO-0 (ds_configs/r100.json)
#   r2060 bf16 (torch_autocast), micro-batch 8,    5 steps, ZeRO-3 + activation checkpointing (ds_configs/r2060.json)
#   r50_fsdp   the r50 run under FSDP2 (ds_configs/r50_fsdp.json: engine.train.backend fsdp, bf16 parameters for
#              compute, fp32 masters): same batch, steps and data as r50, so the two rows compare the backends
#   r2060_fsdp r2060 under FSDP2, micro-batch 8, 5 steps, activation checkpointing (ds_configs/r2060_fsdp.json)
#   prof_r50, prof_r100, prof_r2060 (issue 12) the r50 / r100 / r2060 runs above under `python -m engine.profile`
#         (2 warmup + 5 profiled steps): MFU against the device's bf16 peak, the phase split and the memory
#         breakdown against engine.plan; each run's profile/summary.txt is printed, profile.json kept
#   pfc   (only when named) Partial FC head step on one device, world size 1, batch 512, emb 128, rate 0.1, at
#         1M / 10M / 29M classes, offload none and cpu: `python bench/pfc_scale.py device` (its table and
#         pfc/results.json; each configuration's median step time, peak device memory, host RSS).
# img/s is samples_per_sec from summary.json (measured from the end of the first step, so start-up and the
# first step's one-off work are excluded); peak memory is torch.cuda.max_memory_allocated (RSS on CPU).
#
# "fsdp" selects r50, r50_fsdp and r2060_fsdp (issue 10: r50 bf16 under both backends, img/s and peak memory;
# r2060 micro-batch 8 under fsdp with checkpointing); limits 120 + 120 + 200 s, under 8 minutes in all.
#
# Results: $OUT/gpu_check/ when OUT is set (else a fresh /tmp directory): one directory per run (config.json,
# metrics.jsonl, summary.json, log.txt), results.json and table.txt. Exit status 1 when any run failed.
# --dry-run / CPU_SMOKE=1 shrinks everything (r18 in place of r50/r100/r2060, fp32 since bf16 is very slow
# on CPUs without bf16 units, micro-batch 2, 2-3 steps, 100 classes) but keeps each run's recipe, ZeRO stage
# and checkpointing, so the script's whole path runs on a CPU in a few minutes.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

SMOKE="${CPU_SMOKE:-0}"
SELECTED=()
for arg in "$@"; do
  case "$arg" in
    --dry-run|--cpu-smoke) SMOKE=1 ;;
    -h|--help) sed -n '2,30p' "$0"; exit 0 ;;
    r50|r100|r2060|r50_fsdp|r2060_fsdp|prof_r50|prof_r100|prof_r2060|pfc) SELECTED+=("$arg") ;;
    fsdp) SELECTED+=(r50 r50_fsdp r2060_fsdp) ;;
    profile) SELECTED+=(prof_r50 prof_r100 prof_r2060) ;;
    *) echo "gpu_check.sh: unknown argument '$arg' (known: --dry-run, r50, r100, r2060, r50_fsdp, r2060_fsdp, fsdp, prof_r50, prof_r100, prof_r2060, profile, pfc)" >&2
       exit 2 ;;
  esac
done
[ "${#SELECTED[@]}" -gt 0 ] || SELECTED=(r50 r100 r2060)
selected() { local n; for n in "${SELECTED[@]}"; do [ "$n" = "$1" ] && return 0; done; return 1; }

PY="$ROOT/.venv/bin/python"
[ -x "$PY" ] || PY="$(command -v python3 || command -v python)"
if [ -n "${OUT:-}" ]; then
  RESULTS="$OUT/gpu_check"
else
  RESULTS="$(mktemp -d /tmp/arcscale_gpu_check.XXXXXX)"
fi
mkdir -p "$RESULTS"

if [ "$SMOKE" = "1" ]; then
  echo "gpu_check: CPU smoke mode (shrunk runs; numbers are not GPU numbers)"
  COMMON=(--set torch_autocast.enabled=false --set engine.head.num_classes=100)
  # name | recipe | overrides | time limit (s)
  RUNS=(
    "r50|ds_configs/r50.json|engine.model.name=r18 train_micro_batch_size_per_gpu=2 engine.train.max_steps=3 engine.train.log_every=1|300"
    "r100|ds_configs/r100.json|engine.model.name=r18 train_micro_batch_size_per_gpu=2 engine.train.max_steps=3 engine.train.log_every=1|300"
    "r2060|ds_configs/r2060.json|engine.model.name=r18 train_micro_batch_size_per_gpu=2 engine.train.max_steps=2 engine.train.log_every=1|300"
    "r50_fsdp|ds_configs/r50_fsdp.json|engine.model.name=r18 train_micro_batch_size_per_gpu=2 engine.train.max_steps=3 engine.train.log_every=1|300"
    "r2060_fsdp|ds_configs/r2060_fsdp.json|engine.model.name=r18 train_micro_batch_size_per_gpu=2 engine.train.max_steps=2 engine.train.log_every=1|300"
  )
  # name | recipe | overrides | time limit (s); engine.profile runs --warmup then --steps steps
  PROFILE_RUNS=(
    "prof_r50|ds_configs/r50.json|engine.model.name=r18 train_micro_batch_size_per_gpu=2|300"
    "prof_r100|ds_configs/r100.json|engine.model.name=r18 train_micro_batch_size_per_gpu=2|300"
    "prof_r2060|ds_configs/r2060.json|engine.model.name=r18 train_micro_batch_size_per_gpu=2|300"
  )
  PROFILE_STEPS=(--warmup 1 --steps 2)
else
  COMMON=(--set torch_autocast.enabled=true --set torch_autocast.dtype=bfloat16)
  RUNS=(
    "r50|ds_configs/r50.json|train_micro_batch_size_per_gpu=128 engine.train.max_steps=30 engine.train.log_every=10|120"
    "r100|ds_configs/r100.json|train_micro_batch_size_per_gpu=128 engine.train.max_steps=30 engine.train.log_every=10|150"
    "r2060|ds_configs/r2060.json|train_micro_batch_size_per_gpu=8 engine.train.max_steps=5 engine.train.log_every=1|180"
    "r50_fsdp|ds_configs/r50_fsdp.json|train_micro_batch_size_per_gpu=128 engine.train.max_steps=30 engine.train.log_every=10|120"
    "r2060_fsdp|ds_configs/r2060_fsdp.json|train_micro_batch_size_per_gpu=8 engine.train.max_steps=5 engine.train.log_every=1|200"
  )
  PROFILE_RUNS=(
    "prof_r50|ds_configs/r50.json|train_micro_batch_size_per_gpu=128|120"
    "prof_r100|ds_configs/r100.json|train_micro_batch_size_per_gpu=128|150"
    "prof_r2060|ds_configs/r2060.json|train_micro_batch_size_per_gpu=8|200"
  )
  PROFILE_STEPS=(--warmup 2 --steps 5)
fi

{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "git: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())" 2>/dev/null
} | tee "$RESULTS/machine.txt"

FAILED=0
# run_one NAME LIMIT ENTRY...: run "$PY ENTRY... --set <data and output>" for NAME under a time limit, RC set
run_one() {
  local name="$1" limit="$2" start
  shift 2
  RUN_DIR="$RESULTS/$name"
  rm -rf "$RUN_DIR" && mkdir -p "$RUN_DIR"
  local args=("$@" --set engine.data.source=synthetic --set engine.data.synthetic=noise
              --set gradient_accumulation_steps=1 --set engine.train.output_dir="$RUN_DIR")
  echo "== $name: $PY ${args[*]}"
  start=$(date +%s)
  timeout --signal=TERM --kill-after=15 "$limit" "$PY" "${args[@]}" >"$RUN_DIR/log.txt" 2>&1
  RC=$?
  echo "$RC" >"$RUN_DIR/rc"
  echo "   rc $RC after $(( $(date +%s) - start )) s (limit $limit s)"
}

sets_of() { local s; for s in $1; do printf '%s\n' --set "$s"; done; }

for spec in "${RUNS[@]}"; do
  IFS='|' read -r NAME RECIPE SETS LIMIT <<<"$spec"
  selected "$NAME" || continue
  mapfile -t EXTRA < <(sets_of "$SETS")
  run_one "$NAME" "$LIMIT" run.py --config "$RECIPE" "${COMMON[@]}" "${EXTRA[@]}"
  if [ "$RC" != 0 ]; then
    FAILED=1
    tail -n 15 "$RUN_DIR/log.txt" | sed 's/^/   | /'
  fi
done

for spec in "${PROFILE_RUNS[@]}"; do
  IFS='|' read -r NAME RECIPE SETS LIMIT <<<"$spec"
  selected "$NAME" || continue
  mapfile -t EXTRA < <(sets_of "$SETS")
  run_one "$NAME" "$LIMIT" -m engine.profile --config "$RECIPE" "${PROFILE_STEPS[@]}" "${COMMON[@]}" \
    --set engine.checkpoint.export=false "${EXTRA[@]}"
  if [ "$RC" = 0 ] && [ -f "$RUN_DIR/profile/summary.txt" ]; then
    sed 's/^/   | /' "$RUN_DIR/profile/summary.txt"
  else
    FAILED=1
    tail -n 15 "$RUN_DIR/log.txt" | sed 's/^/   | /'
  fi
done

if selected pfc; then
  mkdir -p "$RESULTS/pfc"
  if [ "$SMOKE" = "1" ]; then
    PFC_ARGS=(--classes 20000,200000 --batch 64 --steps 2 --warmup 1)
  else
    PFC_ARGS=(--classes 1000000,10000000,29000000 --batch 512 --emb 128 --sample-rate 0.1 --steps 5 --warmup 2)
  fi
  echo "== pfc: $PY bench/pfc_scale.py device ${PFC_ARGS[*]} --offload none,cpu"
  START=$(date +%s)
  timeout --signal=TERM --kill-after=15 420 "$PY" bench/pfc_scale.py device "${PFC_ARGS[@]}" --offload none,cpu \
    --json "$RESULTS/pfc/results.json" 2>&1 | tee "$RESULTS/pfc/log.txt"
  RC=${PIPESTATUS[0]}
  echo "$RC" >"$RESULTS/pfc/rc"
  echo "   rc $RC after $(( $(date +%s) - START )) s (limit 420 s)"
  [ "$RC" = 0 ] || FAILED=1
fi

"$PY" - "$RESULTS" "$SMOKE" "${SELECTED[@]}" <<'EOF'
import json, sys
from pathlib import Path

results, smoke = Path(sys.argv[1]), sys.argv[2] == "1"
names = [n for n in ("r50", "r100", "r2060", "r50_fsdp", "r2060_fsdp", "prof_r50", "prof_r100", "prof_r2060")
         if n in sys.argv[3:]]
rows, table = [], []
head = f"{'run':10} {'backbone':8} {'prec':5} {'backend':9} {'batch':>5} {'steps':>5} {'img/s':>9} {'ms/step':>8} {'peak GiB':>8} {'wall s':>7}  status"
table.append(head)
table.append("-" * len(head))
for name in names:
    d = results / name
    rc = (d / "rc").read_text().strip() if (d / "rc").exists() else "?"
    summary = d / "summary.json"
    if rc != "0" or not summary.exists():
        status = "TIMEOUT" if rc in ("124", "137") else f"FAILED rc={rc}"
        rows.append({"run": name, "ok": False, "rc": rc})
        table.append(f"{name:10} {'-':8} {'-':5} {'-':9} {'-':>5} {'-':>5} {'-':>9} {'-':>8} {'-':>8} {'-':>7}  {status}")
        continue
    s = json.loads(summary.read_text())
    sps = s.get("samples_per_sec")
    ms = 1000.0 * s["global_batch_size"] / sps if sps else None
    peak = max(s["peak_memory_bytes_per_rank"]) / 2 ** 30
    cfg = json.loads((d / "config.json").read_text()) if (d / "config.json").exists() else {}
    backend = cfg.get("engine", {}).get("train", {}).get("backend", "deepspeed")
    fsdp = cfg.get("engine", {}).get("fsdp", {})
    where = (f"fsdp{'/rs' if fsdp.get('reshard_after_forward', True) else ''}" if backend == "fsdp"
             else f"ZeRO-{s['zero_stage']}")
    rows.append({"run": name, "ok": True, "backbone": s["backbone"], "precision": s["precision"],
                 "backend": backend, "fsdp": fsdp if backend == "fsdp" else None, "zero_stage": s["zero_stage"], "global_batch_size": s["global_batch_size"], "steps": s["steps"],
                 "samples_per_sec": sps, "ms_per_step": ms, "peak_memory_gib": peak,
                 "peak_memory_kind": s["peak_memory_kind"], "wall_time_s": s["wall_time_s"],
                 "first_loss": s["first_loss"], "final_loss": s["final_loss"]})
    prof = d / "profile" / "profile.json"
    if prof.exists():  # engine.profile runs: MFU, the phase split and memory against the plan
        p = json.loads(prof.read_text())
        rows[-1]["profile"] = {"mfu": p["utilisation"].get("mfu"), "hfu": p["utilisation"].get("hfu"),
                               "peak_source": p["utilisation"].get("peak_source"),
                               "step_time_s": p["throughput"]["step_time_s"],
                               "phase_share": {k: v["share"] for k, v in p["phases"]["summary"].items()}}
    table.append(f"{name:10} {s['backbone']:8} {s['precision']:5} {where:9} {s['global_batch_size']:5d} "
                 f"{s['steps']:5d} {sps if sps else float('nan'):9.1f} {ms if ms else float('nan'):8.1f} "
                 f"{peak:8.2f} {s['wall_time_s']:7.1f}  ok ({s['peak_memory_kind']})")
text = "\n".join(table)
if smoke:
    text += "\n(CPU smoke mode: shrunk runs, not GPU numbers)"
print(text)
(results / "table.txt").write_text(text + "\n")
(results / "results.json").write_text(json.dumps({"smoke": smoke, "runs": rows}, indent=2) + "\n")
EOF
echo "results: $RESULTS"
exit "$FAILED"
