"""The configuration matrix through the real entry points (tests/support/config_matrix.py: how the combinations are
drawn from the config schema so that every pair of values of every two dimensions occurs in one of them).

Each combination runs 2 steps through run.py's or engine.profile's main() in processes forked from one that imported
torch and deepspeed once (tests/support/forkserver.py): 1 rank as `python run.py` runs it, 2 ranks with the
environment and `--local_rank` the deepspeed launcher gives its ranks (the launchers themselves are
tests/launch/test_launchers.py's); the combinations the config checks refuse run the same main() in this process. The
verdict must be the one the config checks predict: trains (exit 0, a finite final loss in summary.json) or refused
before launch (exit 2, one `config error:` line naming a key the combination changes). A traceback, another exit
status, a non-finite loss or a hang fails.

    pytest tests/launch/test_config_matrix.py -k c07                     # one combination by its index
    ARCSCALE_MATRIX_SEED=3 pytest tests/launch/test_config_matrix.py       # another covering array
    ARCSCALE_MATRIX_DIMS=backend,precision,engine.model.name,world pytest tests/launch/test_config_matrix.py
    python -m tests.support.config_matrix [--seed N] [--dims ...] [--run all]   # list, or run without pytest
"""
import os

import pytest

from tests.support import config_matrix as matrix

SEED = int(os.environ.get("ARCSCALE_MATRIX_SEED", "0"))
DIMS = [d for d in os.environ.get("ARCSCALE_MATRIX_DIMS", "").split(",") if d] or None
COMBOS = matrix.combinations(SEED, DIMS)


@pytest.fixture(scope="module")
def results(request, tmp_path_factory):
    """Runs the selected combinations (all, or those `-k` kept), two ranks at a time."""
    wanted = [item.callspec.params["combo"] for item in request.session.items
              if getattr(item, "callspec", None) is not None and "combo" in item.callspec.params
              and item.module is request.module]
    data = matrix.write_data(tmp_path_factory.mktemp("matrix_data"))
    return matrix.run_many(wanted, tmp_path_factory.mktemp("matrix"), data)


@pytest.mark.parametrize("combo", COMBOS, ids=[f"c{c.index:02d}" for c in COMBOS])
def test_combination_trains_or_is_refused_in_one_line(results, combo):
    kind, why, wall_s, cpu_s = results[combo.index]
    assert kind == combo.expected, f"{combo.describe()}\n-> {kind}: {why}"
