"""Test tiers, markers and shared fixtures.

Tests live in three folders by what they need, and each test is marked with its folder's tier, so
`pytest -m unit` (or `scripts/test.sh --fast`) runs the quick inner loop:

- tests/unit: one process, no process group, no subprocess;
- tests/distributed: ranks spawned in-process (engine.runtime.spawn.run_distributed);
- tests/launch: the real launchers (`deepspeed`, `torchrun`, `python run.py`, `python -m ...`) as subprocesses.

Helpers shared by the tiers are in tests/support (never imported by bench/ or the library).
"""
import os
import sys
from pathlib import Path

import pytest

# The suite runs on the CPU on any machine: gloo ranks, CPU tensors, DeepSpeed's CPU accelerator. Hiding the GPUs
# here, before anything initialises CUDA (subprocesses and spawned ranks inherit it), keeps a machine with GPUs
# from handing CUDA tensors to gloo or timing a GPU. ARCSCALE_TEST_CUDA=1 leaves them visible (tests marked gpu).
if os.environ.get("ARCSCALE_TEST_CUDA") != "1":
    os.environ["CUDA_VISIBLE_DEVICES"] = ""

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
TIERS = ("unit", "distributed", "launch")  # the markers are registered in pytest.ini
sys.path.insert(0, str(ROOT))


def _tier(path: Path) -> str:
    """The tier of a test file: the folder under tests/ it sits in."""
    rel = path.resolve().relative_to(ROOT / "tests")
    tier = rel.parts[0] if len(rel.parts) > 1 else ""
    if tier not in TIERS:
        raise pytest.UsageError(f"{path}: a test file belongs in tests/unit, tests/distributed or tests/launch")
    return tier


def pytest_collection_modifyitems(config, items):
    import torch

    skip = None if torch.cuda.is_available() else pytest.mark.skip(reason="needs CUDA")
    for item in items:
        item.add_marker(getattr(pytest.mark, _tier(Path(item.fspath))))
        if skip is not None and "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.fail(f"reference data not found at {SHARED_DATA}: the repo must sit beside ../shared")
    return SHARED_DATA
