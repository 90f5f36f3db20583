"""What README.md and docs/ state about the code, checked against the code: the configuration table lists every
key of every `engine` section with the defaults it names, and checkpoint folders are named as the code names
them. (The README's commands themselves run in tests/launch/test_readme.py.)
"""
from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest

from engine.config.sections import EngineConfig
from engine.state import checkpoint

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
DOCS = {p.name: p.read_text() for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]}


def _defaults(obj) -> dict:
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}


def _table_rows() -> dict:
    """`engine.<section>` (or `engine`) -> the text of its row in the README's configuration table."""
    rows = {}
    for line in README.splitlines():
        m = re.match(r"^\| `(engine(?:\.\w+)?)` \| (.*) \|$", line)
        if m:
            rows[m.group(1)] = m.group(2)
    return rows


ENGINE = EngineConfig()
SECTIONS = {f"engine.{name}": value for name, value in _defaults(ENGINE).items() if dataclasses.is_dataclass(value)}
TOP_LEVEL = sorted(name for name, value in _defaults(ENGINE).items() if not dataclasses.is_dataclass(value))


def test_the_table_has_a_row_per_section_and_the_top_level_keys():
    rows = _table_rows()
    assert sorted(rows) == sorted([*SECTIONS, "engine"] if TOP_LEVEL else SECTIONS), sorted(rows)
    for key in TOP_LEVEL:
        assert f"`{key}`" in rows["engine"], f"README's `engine` row does not list engine.{key}"


@pytest.mark.parametrize("section", sorted(SECTIONS))
def test_every_key_of_a_section_is_in_its_row_with_its_default(section):
    row = _table_rows()[section]
    defaults = _defaults(SECTIONS[section])
    missing = [name for name in defaults if f"`{name}`" not in row]
    assert not missing, f"README's {section} row does not list {missing}"
    for name, said in re.findall(r"`(\w+)` \(default ([^;:,)]+)", row):
        assert name in defaults, f"{section}: the README gives a default for `{name}`, not a key of the section"
        actual = defaults[name]
        if actual is None:  # resolved at run time (e.g. engine.fsdp's), documented by its meaning
            continue
        said_value = json.loads(said.strip().replace("\u2009", ""))
        assert said_value == actual, f"{section}.{name}: README says default {said!r}, the code's is {actual!r}"


def test_keep_says_that_it_prunes():
    row = _table_rows()["engine.checkpoint"]
    keep = _defaults(SECTIONS["engine.checkpoint"])["keep"]
    assert re.search(rf"`keep` \(default {keep}: [^)]*deleted", row), row


def test_checkpoint_folder_names_are_as_the_code_writes_them():
    """Every concrete folder name in the docs is the code's prefix and the step zero-padded to 8 digits
    (engine.state.checkpoint.save: f"{_STEP_PREFIX}{step:08d}"); a placeholder is written step_<N>."""
    source = (ROOT / "engine" / "state" / "checkpoint.py").read_text()
    assert 'f"{_STEP_PREFIX}{trainer.step:08d}"' in source and checkpoint._STEP_PREFIX == "step_"
    for name, text in DOCS.items():
        for found in re.findall(r"\bstep_(\d+)\b", text):
            assert len(found) == 8, f"{name}: a checkpoint folder step_{found}: the code pads the step to 8 digits"
    assert "step_00001000" in README
