"""engine.profile: the profile of a real 2-rank run (tiny mbf, spawned ranks), checked against what can be computed
by hand.

References: the planner's FLOPs and parameter count (engine.plan), the sizes of the collectives the head and
DeepSpeed must issue (world x B x E x 4 bytes for the embedding all-gather; 4 bytes per backbone parameter for
ZeRO-0's gradient all-reduce), a loader that sleeps a known time on one rank (data-bound, that rank the
straggler), and the documented schema. No timing is asserted except the structural "phases tile the step".
"""
import json
import time
from pathlib import Path

import pytest
import torch

from engine.runtime.spawn import run_distributed
from tests.support.profiling import CLASSES, EMB, MICRO, STEPS, WARMUP, WORLD, tiny_profile_config

SLEEP_S = 1.0  # rank 1's loader, per batch


class _Loader:
    """Synthetic batches; on rank `slow_rank` each batch comes after SLEEP_S seconds."""

    def __init__(self, rank: int, slow_rank: int):
        self.slow = rank == slow_rank
        self.g = torch.Generator().manual_seed(rank)

    def __next__(self):
        if self.slow:
            time.sleep(SLEEP_S)
        return torch.rand(MICRO, 3, 112, 112, generator=self.g) * 2 - 1, torch.randint(0, CLASSES, (MICRO,),
                                                                                        generator=self.g)


def _train(out_dir: str) -> dict:
    from engine.config import schema as config
    from engine.runtime import dist
    from engine.train.build import build_trainer

    cfg = config.from_dict(tiny_profile_config(out_dir, enabled=True, start_step=WARMUP, num_steps=STEPS,
                                               peak_tflops=0.5, trace=True))
    trainer = build_trainer(cfg, data=_Loader(dist.get_rank(), slow_rank=1))  # the Profiler from engine.profile
    trainer.train()
    trainer.close()
    return {"num_params": sum(p.numel() for p in trainer.backbone.module.parameters())}


@pytest.fixture(scope="module")
def profiled(tmp_path_factory):
    out = tmp_path_factory.mktemp("profile")
    results = run_distributed(_train, WORLD, str(out), timeout_s=900)
    report = json.loads((out / "profile" / "profile.json").read_text())
    return out, report, results[0]["num_params"]


def test_every_phase_and_the_phases_tile_the_step(profiled):
    _, report, _ = profiled
    from engine.perf.report import STEP_PHASES

    assert report["run"]["steps"] == list(range(WARMUP + 1, WARMUP + STEPS + 1))
    names = [n for n in report["phases"]["names"] if n != "other"]  # the trainer's, the hooks', any new one
    for rank in report["phases"]["per_rank"]:
        assert len(rank["step_s"]) == STEPS
        for name in STEP_PHASES:  # every phase the trainer marks was timed in every step
            assert all(v > 0 for v in rank["phases_s"][name]), name
        for i, step in enumerate(rank["step_s"]):  # phases never overlap: they cannot add up to more
            assert sum(rank["phases_s"][n][i] for n in names) <= step * (1 + 1e-9)
        # ... and with the collectives the trainer issues between its phases (they absorb the ranks' skew),
        # leave at most 5% of the window's wall time unaccounted for (the trainer's loop and LR update, and
        # whatever a busy host or Python's garbage collector adds there)
        named = sum(sum(rank["phases_s"][n]) for n in names) + STEPS * rank["other_comm_s"]
        assert named >= 0.95 * sum(rank["step_s"]), f"phases cover {named / sum(rank['step_s']):.1%} of the steps"


def test_flops_are_the_planners(profiled):
    from engine.config import schema as config
    from engine.perf import planner as plan

    _, report, _ = profiled
    cfg = config.from_dict(tiny_profile_config("/tmp/unused"))
    p = plan.plan(cfg, WORLD, device="cpu")
    f = report["flops"]
    assert f["hardware_per_sample"] == pytest.approx(p.train_flops_per_image, rel=1e-12)
    assert f["forward_per_sample"] == pytest.approx(2 * p.backbone.macs, rel=1e-12)
    assert f["model_per_sample"] == pytest.approx(2 * p.backbone.train_macs + 6 * WORLD * p.num_sampled * EMB, rel=1e-12)
    assert report["utilisation"]["peak_source"] == "given"
    u, t = report["utilisation"], report["throughput"]
    assert u["mfu"] == pytest.approx(f["model_per_sample"] * t["samples_per_s"] / WORLD / 1e12 / 0.5, rel=1e-9)


def test_collective_bytes_match_a_hand_count(profiled):
    _, report, num_params = profiled
    rows = report["communication"]["per_step"]

    def one(owner, op, site):
        found = [r for r in rows if r["owner"] == owner and r["op"] == op and r["site"].endswith(site)]
        assert len(found) == 1, (owner, op, site, rows)
        return found[0]

    emb = one("head", "all_gather", "heads/softmax.py:forward")  # AllGatherEmbeddings
    assert emb["bytes_per_step"] == WORLD * MICRO * EMB * 4 and emb["calls_per_step"] == 1
    assert emb["bus_bytes_per_step"] == WORLD * MICRO * EMB * 4 / 2
    labels = one("head", "all_gather", "heads/partial_fc.py:_prepare")
    assert labels["bytes_per_step"] == WORLD * MICRO * 8
    grad = one("head", "all_reduce", "heads/softmax.py:backward")  # the gathered embeddings' gradient
    assert grad["bytes_per_step"] == WORLD * MICRO * EMB * 4
    backbone = [r for r in rows if r["owner"] == "backbone" and r["op"] == "all_reduce"]
    assert sum(r["bytes_per_step"] for r in backbone) == num_params * 4  # ZeRO-0 fp32 gradient all-reduce


def test_data_bound_straggler_and_memory_rows(profiled):
    _, report, num_params = profiled
    b = report["bottleneck"]
    assert b["kind"] == "data" and b["rank"] == 1
    assert b["text"].startswith("data-bound: ") and "engine.data.num_workers" in b["text"]
    assert report["straggler"]["rank"] == 1 and report["straggler"]["named"]
    assert "bottleneck: data-bound" in report["summary_text"]
    for rank in report["memory"]["per_rank"]:
        rows = {r["name"]: r for r in rank["rows"]}
        assert rows["backbone parameters"]["measured_bytes"] == num_params * 4
        assert rows["head weights"]["measured_bytes"] == (6 if rank["rank"] == 0 else 5) * EMB * 4
        assert rows["peak"]["measured_bytes"] == rank["peak_bytes"] > 0


def test_outputs_validate_and_decode(profiled):
    out, report, _ = profiled
    from PIL import Image

    from engine.perf import report as profile_report

    profile_report.validate(report)
    broken = dict(report, phases={k: v for k, v in report["phases"].items() if k != "summary"})
    with pytest.raises(ValueError, match="missing key 'summary'"):
        profile_report.validate(broken)
    with Image.open(out / "profile" / "profile.png") as image:
        image.load()
        assert image.size[0] > 100 and image.size[1] > 100
    assert (out / "profile" / "summary.txt").read_text().strip() == report["summary_text"]
    assert sorted(Path(p).name for p in report["trace_files"]) == ["trace_rank0.json", "trace_rank1.json"]
    trace = json.loads(Path(report["trace_files"][0]).read_text())
    names = {e.get("name") for e in trace["traceEvents"]}
    assert {"arcscale.forward", "arcscale.backward", "pfc.all_gather_embeddings"} <= names
    summary = json.loads((out / "summary.json").read_text())
    assert summary["profile"]["dir"] == str(out / "profile")
