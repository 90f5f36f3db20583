"""The configuration matrix's generator (tests/support/config_matrix.py), without running anything: its dimensions
come from the schema, every pair of values of every two dimensions is in a combination (pairs the config accepts
in a combination that trains, pairs it refuses in one that is refused), a seed gives the same set, and a value
newly documented in the schema joins the matrix. (The runs: tests/launch/test_config_matrix.py.)
"""
import itertools

import pytest

from engine.config import schema
from engine.config.files import Documented
from tests.support import config_matrix as matrix


@pytest.fixture(scope="module")
def seed0():
    return matrix.combinations(0)


def test_dimensions_are_the_documented_settings_plus_entry_and_world():
    dims = {d.name: [label for label, _ in d.values] for d in matrix.dimensions()}
    assert dims["backend"] == ["zero0", "zero1", "zero2", "zero3", "fsdp_reshard_true", "fsdp_reshard_false"]
    assert dims["precision"] == ["fp32", "autocast_bf16", "autocast_fp16", "bf16", "fp16"]
    assert dims["entry"] == ["run", "profile"] and dims["world"] == ["1", "2"]
    families = {__import__("backbones").get_backbone_spec(n).builder.__name__ for n in dims["engine.model.name"]}
    assert families == {"IResNet", "MobileFaceNet", "VisionTransformer"}
    for key in ("engine.model.checkpoint", "engine.head.sample_rate", "engine.head.margin", "engine.head.offload",
                "engine.head.storage_dtype", "engine.optim.name", "gradient_accumulation_steps",
                "engine.data.source", "activation_checkpointing"):
        assert len(dims[key]) >= 2, key
    documented = {s.key for s in schema.documented_settings() if s.draws}
    consumed = {"engine.train.backend", "zero_optimization.stage", "engine.fsdp.reshard_after_forward"}
    assert documented - consumed <= set(dims)


@pytest.mark.parametrize("seed", [0, 5])
def test_every_pair_of_values_is_in_a_combination_with_the_right_verdict(seed, seed0):
    combos = seed0 if seed == 0 else matrix.combinations(seed)
    dims = matrix.dimensions()
    trains = matrix.covered_pairs([c for c in combos if c.expected == "trains"])
    refused = matrix.covered_pairs([c for c in combos if c.expected == "refused"])
    oracle = matrix.Oracle("cpu")
    base = {d: 0 for d in range(len(dims))}
    good, bad, bad_values = matrix._validity(dims, base, oracle)
    names = {d: dims[d].name for d in base}
    for (a, va), (b, vb) in itertools.combinations(
            [(d, v) for d in base for v in range(len(dims[d].values))], 2):
        if a == b:
            continue
        (ka, la), (kb, lb) = sorted([(names[a], dims[a].values[va][0]), (names[b], dims[b].values[vb][0])])
        if ((a, va), (b, vb)) in good:
            assert (la, lb) in trains.get((ka, kb), set()), f"{ka}={la} & {kb}={lb} never trains"
        elif ((a, va), (b, vb)) in bad:
            assert (la, lb) in refused.get((ka, kb), set()), f"{ka}={la} & {kb}={lb} (refused together) nowhere"
    for d, v in bad_values:
        assert any(c.picks[names[d]] == dims[d].values[v][0] for c in combos if c.expected == "refused")
    assert sum(c.expected == "trains" for c in combos) >= 30


def test_a_seed_gives_the_same_combinations(seed0):
    again = matrix.combinations(0)
    assert [(c.picks, c.expected) for c in again] == [(c.picks, c.expected) for c in seed0]
    other = matrix.combinations(5)
    assert [c.picks for c in other] != [c.picks for c in seed0]


def test_a_subset_of_dimensions_and_one_combination_by_index():
    combos = matrix.combinations(3, ["backend", "precision", "world"])
    assert all(set(c.picks) == {"backend", "precision", "world"} for c in combos)
    pairs = matrix.covered_pairs(combos)
    assert len(pairs[("backend", "precision")]) == 6 * 5
    with pytest.raises(ValueError, match="unknown dimension"):
        matrix.dimensions(["no_such_dimension"])


def test_a_newly_documented_value_joins_the_matrix(monkeypatch):
    """A value added to a key's documented values (here a third sample rate) is drawn with no test edited."""
    settings = schema.documented_settings()
    patched = [Documented(s.key, s.doc, s.choices, s.values + (0.5,)) if s.key == "engine.head.sample_rate" else s
               for s in settings]
    monkeypatch.setattr(schema, "documented_settings", lambda: patched)
    combos = matrix.combinations(0, ["backend", "engine.head.sample_rate"])
    assert {c.picks["engine.head.sample_rate"] for c in combos} == {"1.0", "0.25", "0.5"}
    assert len(matrix.covered_pairs(combos)[("backend", "engine.head.sample_rate")]) == 6 * 3
