"""Every recipe in ds_configs/ runs as users run it: 2 epochs on 2 CPU ranks through run.py's main, on a tiny
RecordIO folder laid out as insightface distributes MS1MV3 / Glint360K (train.rec, train.idx, property, lfw.bin,
cfp_fp.bin, agedb_30.bin; 2 identities x 2 images, 10 pairs per .bin), named as the recipe's own folder. Only
`engine.data.path` (that folder), the micro-batch (2 images per rank), the length (`engine.train.epochs=2`: 2
optimizer steps each) and, where the backbone is too big for a CPU test, `engine.model.name` differ from the
shipped file: r50, r100, r200 and r2060 (and their _fsdp variants) train with r18 in their place, the same
IResNet code with the recipe's precision, ZeRO stage / backend, activation checkpointing (section and stages:
r2060's layer2 and layer3 exist in r18 too), clipping, evaluation and checkpointing kept. Each backbone trains
under its own name in tests/unit/test_backbones.py; r2060 itself on 2 CPU ranks in tests/launch/test_r2060.py;
each recipe plans with its own backbone in tests/unit/test_recipe_layout.py.

Each run must leave what a real one does: checkpoints (the recipe saves every 2000 steps or 30 minutes, so here
the one at the end), model.pt at the end of epoch 1 and at the end, model_best.pt with model_best.json, and a
summary with the accuracy of every verification set; and a run whose folder is missing is refused before
anything starts, in one line naming the path and the synthetic override.

quickstart.json and 10m_classes.json stay step-count recipes on the embedded demo data: the quick start is run
as shipped by tests/launch/test_readme.py (scripts/demo.sh: 80 steps, verification); 10m_classes runs 2 steps
here with its head reduced to 1,000 classes (bench/run_10m.py runs it at 10 M).
"""
import json
import math
from pathlib import Path

import pytest

from engine.runtime.spawn import run_distributed
from tests.support.data import write_insightface_folder

ROOT = Path(__file__).resolve().parents[2]
RECIPES = sorted(p.name for p in (ROOT / "ds_configs").glob("*.json"))
COVERED_ELSEWHERE = {"quickstart.json": "tests/launch/test_readme.py runs it as shipped (scripts/demo.sh: 80 steps, "
                                        "verification)"}
STEP_RECIPES = {"10m_classes.json"}  # demo data and a step count, not a dataset recipe
# Same code path (IResNet), a CPU-sized model: the recipe's precision, ZeRO stage / backend, checkpointing and the
# rest are what is run.
SMALL_FOR_CI = {"r50": "r18", "r100": "r18", "r200": "r18", "r2060": "r18"}
IDENTITIES, PER_IDENTITY, MICRO_BATCH, WORLD, EPOCHS = 2, 2, 2, 2, 2
STEPS_PER_EPOCH = IDENTITIES * PER_IDENTITY // (MICRO_BATCH * WORLD)
TARGETS = ["lfw", "cfp_fp", "agedb_30"]


def _shipped(recipe: str) -> dict:
    return json.loads((ROOT / "ds_configs" / recipe).read_text())


def _overrides(recipe: str, data_root: Path, out_dir: str) -> list:
    e = _shipped(recipe)["engine"]
    sets = [f"engine.train.output_dir={out_dir}", f"train_micro_batch_size_per_gpu={MICRO_BATCH}"]
    if recipe in STEP_RECIPES:
        return sets + ["engine.train.max_steps=2", "engine.train.log_every=1", "engine.checkpoint.export=false",
                       f"engine.head.num_classes={min(e['head']['num_classes'], 1000)}"]
    sets += [f"engine.data.path={data_root / Path(e['data']['path']).name}", f"engine.train.epochs={EPOCHS}"]
    if e["model"]["name"] in SMALL_FOR_CI:
        sets.append(f"engine.model.name={SMALL_FOR_CI[e['model']['name']]}")
    return sets


def _run_recipes(data_root: str, out_root: str) -> dict:
    """On each rank: run.main for every recipe, one after the other, in this process group."""
    import run

    results = {}
    for recipe in RECIPES:
        if recipe in COVERED_ELSEWHERE:
            continue
        argv = ["--config", str(ROOT / "ds_configs" / recipe)]
        for item in _overrides(recipe, Path(data_root), f"{out_root}/{recipe[:-5]}"):
            argv += ["--set", item]
        results[recipe] = run.main(argv)
    return results


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    data = tmp_path_factory.mktemp("datasets")
    for name in sorted({Path(_shipped(r)["engine"]["data"]["path"]).name for r in RECIPES
                        if r not in COVERED_ELSEWHERE and r not in STEP_RECIPES}):
        write_insightface_folder(data / name, IDENTITIES, PER_IDENTITY, targets=TARGETS)
    out = tmp_path_factory.mktemp("recipes")
    codes = run_distributed(_run_recipes, WORLD, str(data), str(out), timeout_s=1800)
    return out, codes


def test_every_recipe_is_covered():
    assert len(RECIPES) >= 11 and set(COVERED_ELSEWHERE) | STEP_RECIPES <= set(RECIPES)


def _check_kept_as_shipped(recipe: str, resolved: dict, summary: dict) -> None:
    """Only the reductions above differ from the shipped recipe: precision, ZeRO stage, checkpointing kept."""
    shipped = _shipped(recipe)
    for key in ("torch_autocast", "bf16", "fp16", "zero_optimization", "activation_checkpointing",
                "gradient_clipping", "gradient_accumulation_steps"):
        assert resolved.get(key) == shipped.get(key), key
    e, r = shipped["engine"], resolved["engine"]
    assert r["model"]["checkpoint"] == e["model"]["checkpoint"]
    assert r["train"]["backend"] == e["train"].get("backend", "deepspeed")
    assert summary["precision"] == ("bf16" if shipped.get("torch_autocast", {}).get("enabled") else
                                    "fp16" if shipped.get("fp16", {}).get("enabled") else "fp32")


@pytest.mark.parametrize("recipe", [r for r in RECIPES if r not in COVERED_ELSEWHERE and r not in STEP_RECIPES])
def test_recipe_trains_two_epochs_on_its_dataset_folder(runs, recipe):
    out, codes = runs
    assert codes[0][recipe] == codes[1][recipe] == 0
    run_dir = out / recipe[:-5]
    resolved = json.loads((run_dir / "config.json").read_text())
    summary = json.loads((run_dir / "summary.json").read_text())
    _check_kept_as_shipped(recipe, resolved, summary)
    shipped = _shipped(recipe)["engine"]
    assert "num_classes" not in shipped["head"] and "max_steps" not in shipped["train"]
    assert shipped["eval"]["targets"] == TARGETS and shipped["checkpoint"]["resume"] == "auto"
    assert resolved["engine"]["head"]["num_classes"] == summary["num_classes"] == IDENTITIES  # from the data
    assert resolved["engine"]["train"]["max_steps"] is None  # the length is derived, never written back
    assert summary["steps"] == EPOCHS * STEPS_PER_EPOCH and summary["world_size"] == WORLD
    assert math.isfinite(summary["first_loss"]) and math.isfinite(summary["final_loss"])

    # checkpoints: the recipe's interval (2000 steps, 30 minutes) is not reached, so the one at the end
    assert (run_dir / "checkpoints" / f"step_{EPOCHS * STEPS_PER_EPOCH:08d}" / "meta.json").is_file()
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{EPOCHS * STEPS_PER_EPOCH:08d}"
    # model.pt at the end of every epoch (the last one's export is the end's)
    assert summary["model"]["epoch_exports"] == [{"epoch": e, "step": e * STEPS_PER_EPOCH} for e in range(1, EPOCHS)]
    log = (run_dir / "train.log").read_text()
    assert f"epoch 1 done (step {STEPS_PER_EPOCH}): {run_dir / 'model.pt'} written" in log, log[-3000:]
    assert (run_dir / "model.pt").is_file()
    # every verification set beside train.rec evaluated; model_best.pt at the best mean accuracy
    assert sorted(summary["eval"]) == sorted(TARGETS)
    finals = {name: summary["eval"][name]["final"]["acc_mean"] for name in TARGETS}
    assert all(0.0 <= acc <= 1.0 for acc in finals.values()), finals
    best = json.loads((run_dir / "model_best.json").read_text())
    assert summary["model_best"] == best and sorted(best["sets"]) == sorted(TARGETS)
    assert best["score"] == pytest.approx(sum(best["sets"].values()) / len(TARGETS))
    assert (run_dir / "model_best.pt").is_file() and best["step"] == EPOCHS * STEPS_PER_EPOCH


def test_step_recipe_runs_as_shipped(runs):
    out, codes = runs
    for recipe in sorted(STEP_RECIPES):
        assert codes[0][recipe] == codes[1][recipe] == 0
        summary = json.loads((out / recipe[:-5] / "summary.json").read_text())
        assert summary["steps"] == 2 and math.isfinite(summary["final_loss"])


@pytest.mark.parametrize("recipe", [r for r in RECIPES if r not in COVERED_ELSEWHERE and r not in STEP_RECIPES])
def test_a_missing_dataset_folder_is_refused_in_one_line(recipe, tmp_path, capsys):
    """The recipe with its folder absent (named as the real one, under an empty directory): exit 2 before the
    process group, one line naming the path, what belongs there and the synthetic override."""
    import run

    folder = tmp_path / Path(_shipped(recipe)["engine"]["data"]["path"]).name
    code = run.main(["--config", str(ROOT / "ds_configs" / recipe), "--set", f"engine.data.path={folder}",
                     "--set", f"engine.train.output_dir={tmp_path / 'out'}"])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith(f"config error: engine.data.path: {folder} not found"), lines[0]
    assert all(f in lines[0] for f in ("train.rec", "train.idx", "property", "lfw.bin", "cfp_fp.bin", "agedb_30.bin"))
    assert lines[0].endswith("--set engine.data.source=synthetic"), lines[0]
    assert not (tmp_path / "out").exists()  # nothing written
