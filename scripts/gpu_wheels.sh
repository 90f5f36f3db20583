#!/usr/bin/env bash
# Build, here and once, the wheelhouse scripts/gpu_check.sh installs on a lent GPU machine.
#
#   bash scripts/gpu_wheels.sh            # .whl/: DeepSpeed and the dependencies that machine lacks
#   bash scripts/gpu_wheels.sh --verify   # then install .whl/ with pip --no-index into a clean Python 3.12
#                                         #   venv beside a torch, and import deepspeed there
#
# The lent machine (an H100/H200 image): Python 3.12 on x86_64 with torch 2.11 + CUDA 13.0, numpy, einops,
# msgpack, ninja, packaging, psutil, py-cpuinfo, tqdm, pyyaml, pillow, matplotlib, tensorboard, onnx and
# onnxruntime already there; no DeepSpeed, no DALI and no network. So the wheelhouse holds:
#   - deepspeed 0.19.8, built here from its source distribution with DS_BUILD_OPS=0: pure Python, no op
#     compiled (the engine uses none: its optimizers are torch's, and DeepSpeed's CPU shm op is disabled);
#   - the DeepSpeed dependencies that image lacks: hjson, pydantic with pydantic-core (cp312 manylinux
#     binary), annotated-types, typing-inspection and typing-extensions (pydantic needs >= 4.16).
# One version of each (two would stop pip's whole install), under 64 MiB together: at most 64 MiB of files
# travel with the working tree to that machine. .whl/ is git-ignored.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

VERIFY=0
for arg in "$@"; do
  case "$arg" in
    --verify) VERIFY=1 ;;
    -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
    *) echo "gpu_wheels.sh: unknown argument '$arg' (known: --verify)" >&2; exit 2 ;;
  esac
done

DEEPSPEED="deepspeed==0.19.8"
# Binary wheels for CPython 3.12 on manylinux x86_64 (pydantic-core is compiled; the others are pure Python).
DEPS=(hjson==3.1.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
      typing-extensions==4.16.0)
LIMIT_BYTES=$((64 * 1024 * 1024))
WHL="$ROOT/.whl"
PY="${PYTHON:-$ROOT/.venv/bin/python}"  # builds DeepSpeed's wheel: needs torch importable (its setup.py does)
[ -x "$PY" ] || { echo "gpu_wheels.sh: no Python at $PY (run scripts/setup.sh or set PYTHON)" >&2; exit 2; }

# pip, less the "Location ... is ignored" lines of this machine's local indexes; pip's exit status kept
pipq() { local py="$1"; shift; "$py" -m pip "$@" 2>&1 | { grep -v "is ignored" || true; }; return "${PIPESTATUS[0]}"; }

rm -rf "$WHL" && mkdir -p "$WHL"
TMP="$(mktemp -d /tmp/arcscale_wheels.XXXXXX)"
trap 'rm -rf "$TMP"' EXIT

echo "gpu_wheels: dependencies for cp312 manylinux x86_64"
pipq "$PY" download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$WHL" "${DEPS[@]}"

echo "gpu_wheels: $DEEPSPEED from its source distribution, no ops built"
pipq "$PY" download -q --no-deps --no-binary=:all: -d "$TMP" "$DEEPSPEED"
# DS_BUILD_OPS=0: nothing compiled (DeepSpeed would JIT-build an op only if one were used).
# DS_ACCELERATOR=cuda: the wheel records the accelerator it is meant for (it would say cpu, built here).
DS_BUILD_OPS=0 DS_ACCELERATOR=cuda pipq "$PY" wheel -q --no-deps --no-build-isolation -w "$WHL" \
  "$TMP"/deepspeed-*.tar.gz

# Checks: one version of each package, every wheel installable on CPython 3.12 x86_64, the size.
python_ok=1
declare -A seen=()
for f in "$WHL"/*.whl; do
  base="$(basename "$f" .whl)"
  name="$(echo "${base%%-*}" | tr 'A-Z-' 'a-z_')"
  if [ -n "${seen[$name]:-}" ]; then
    echo "gpu_wheels.sh: two versions of $name in $WHL: ${seen[$name]} and $base" >&2; exit 1
  fi
  seen[$name]="$base"
  tags="${base#*-*-}"  # python-abi-platform
  case "$tags" in
    py3-none-any|py2.py3-none-any|cp312-cp312-manylinux*x86_64*) ;;
    *) echo "gpu_wheels.sh: $base does not install on CPython 3.12 x86_64 (tags $tags)" >&2; python_ok=0 ;;
  esac
done
[ "$python_ok" = 1 ] || exit 1
total=$(du -cb "$WHL"/*.whl | tail -n 1 | cut -f1)
ls -l "$WHL"
echo "gpu_wheels: ${#seen[@]} wheels, $((total / 1024)) KiB in all (limit $((LIMIT_BYTES / 1024)) KiB)"
if [ "$total" -ge "$LIMIT_BYTES" ]; then
  echo "gpu_wheels.sh: $WHL is $total bytes, over the 64 MiB that can travel to the GPU machine" >&2
  exit 1
fi

[ "$VERIFY" = 1 ] || exit 0
# --verify: the install gpu_check.sh does there (pip --no-index into a target dir on PYTHONPATH), into a clean
# Python 3.12 venv with a torch of its own, then import deepspeed. PY312 names the interpreter; otherwise
# python3.12, a pyenv 3.12, or uv's. The torch there is whatever this machine's registry gives for cp312
# (TORCH_SPEC, default torch==2.11.0: the lent machine's version).
PY312="${PY312:-}"
if [ -z "$PY312" ]; then
  for cand in python3.12 "$(pyenv prefix 3.12 2>/dev/null)/bin/python3.12" \
              "$(ls -d "$HOME"/.pyenv/versions/3.12*/bin/python3.12 2>/dev/null | tail -n 1)" \
              "$(uv python find 3.12 2>/dev/null)"; do
    if [ -n "$cand" ] && "$cand" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then
      PY312="$cand"; break
    fi
  done
fi
[ -n "$PY312" ] || { echo "gpu_wheels.sh --verify: no Python 3.12 found (set PY312)" >&2; exit 2; }
VENV="${VERIFY_VENV:-/tmp/arcscale_py312}"
if [ ! -x "$VENV/bin/python" ]; then
  "$PY312" -m venv "$VENV"
fi
TORCH_SPEC="${TORCH_SPEC:-torch==2.11.0}"
"$VENV/bin/python" -c 'import torch' 2>/dev/null || pipq "$VENV/bin/python" install -q "$TORCH_SPEC"
SITE="$TMP/site"
pipq "$VENV/bin/python" install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
  "$WHL"/*.whl
# The machine's own packages DeepSpeed needs, which the image has: here from the registry (not the wheelhouse).
pipq "$VENV/bin/python" install -q einops msgpack ninja numpy packaging psutil py-cpuinfo tqdm
PYTHONPATH="$SITE" "$VENV/bin/python" -c '
import sys, torch, deepspeed, pydantic, hjson
print(f"gpu_wheels --verify: Python {sys.version.split()[0]}, torch {torch.__version__}, "
      f"deepspeed {deepspeed.__version__} from {deepspeed.__file__}")
assert sys.version_info[:2] == (3, 12), sys.version
import deepspeed.runtime.config, deepspeed.runtime.zero.stage3  # what the engine loads at config time
'
