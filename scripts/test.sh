#!/usr/bin/env bash
# Set up (same as demo.sh), lint with ruff (fails fast), then run the tests. Extra arguments go to pytest.
#
#   scripts/test.sh           lint + every tier: tests/unit, tests/distributed, tests/launch
#   scripts/test.sh --fast    lint + tests/unit only (no process group, no subprocess), on every core: the inner loop
#   scripts/test.sh --fast -k loader     (any other argument is pytest's)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup.sh
export PATH="$ROOT/.venv/bin:$PATH"

TIER=()
ARGS=()
PATHS=0  # arguments naming a test file or folder (tests/x.py::test_y included)
for arg in "$@"; do
  if [ "$arg" = "--fast" ]; then
    TIER=(-m unit)
  else
    ARGS+=("$arg")
    case "$arg" in -*) ;; *) [ -e "${arg%%::*}" ] && PATHS=1 ;; esac
  fi
done
if [ "${#TIER[@]}" -gt 0 ]; then
  # The unit tier's tests share no process group, port or file outside tmp_path: one pytest-xdist worker per
  # core, each test module's tests on one worker (its module-scoped fixtures built once).
  TIER+=(-n auto --dist loadscope)
  if [ "$PATHS" = 0 ]; then
    TIER+=(tests/unit)  # collect only the unit tier's modules (importing the other tiers' takes seconds)
  fi
fi

echo "lint: ruff check (ruff.toml)"
.venv/bin/ruff check --no-cache .
exec .venv/bin/python -m pytest "${TIER[@]}" "${ARGS[@]}"
