#!/usr/bin/env bash
# Set up (same as demo.sh), lint with ruff (fails fast), then run the tests. Extra arguments go to pytest.
#
#   scripts/test.sh           lint + every tier: tests/unit (on every core), then tests/distributed and tests/launch
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
if [ "${#TIER[@]}" -eq 0 ] && [ "$PATHS" = 0 ]; then
  # Every tier: the unit tier on every core first (as --fast), then the others in one process (their tests
  # start their own ranks and launchers, which take the cores). Both always run; the status is the worse one.
  set +e
  .venv/bin/python -m pytest -m unit -n auto --dist loadscope tests/unit "${ARGS[@]}"
  UNIT=$?
  .venv/bin/python -m pytest tests/distributed tests/launch "${ARGS[@]}"
  REST=$?
  set -e
  echo "tests: unit tier exit $UNIT, distributed and launch tiers exit $REST"
  # pytest's 5 (no test selected, e.g. -k matching one tier only) is not a failure when the other tier ran tests
  if [ "$UNIT" = 5 ] && [ "$REST" != 5 ]; then UNIT=0; fi
  if [ "$REST" = 5 ] && [ "$UNIT" != 5 ]; then REST=0; fi
  [ "$UNIT" = 0 ] && exit "$REST"
  exit "$UNIT"
fi
exec .venv/bin/python -m pytest "${TIER[@]}" "${ARGS[@]}"
