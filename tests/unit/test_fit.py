"""engine.plan --fit (engine.perf.fit) and its time model (engine.perf.timing), as planning (no run).

References: the time model's parts written out by hand from the FLOPs the planner counts and the bytes of ring
collectives; the search's fast candidate path against the planner on the validated config; the acceptance
cases of the search on hardware figures given here (GPU: the H100 table row; CPU: figures of the order this
repo's 2-core CI machine measures with timing.calibrate_cpu, gloo's all-gather and reduce-scatter slower than
its all-reduce, fixed so the choice does not depend on the load).
The measured runs (a chosen setting trained through the launcher, its peak RSS): tests/launch/test_fit.py.
"""
import json

import pytest

from engine.config import schema as config
from engine.config.files import read_file
from engine.perf import fit, planner, plan_cli, timing

GiB = 2 ** 30
# The recipes as the search sees them, independent of their data section: synthetic data, the MS1MV3 class count.
SYNTHETIC = ["engine.data.source=synthetic", "engine.head.num_classes=93431"]
CPU = timing.cpu_hardware({"tflops": 0.06, "mem_gbps": 12.0, "op_s": 6e-6, "link_gbps": 1.5, "gather_gbps": 0.6,
                           "scatter_gbps": 0.3, "latency_s": 3e-4}, "test figures")


def _sets(overrides):
    return [a for o in overrides for a in ("--set", o)]


def _gpu(precision="bf16"):
    return timing.gpu_hardware(precision, "H100")


def _checkpointed(s: fit.Setting) -> bool:
    return bool(s.checkpoint)


def test_r2060_on_8_gpus_of_80_gib_does_not_pick_zero3_with_checkpointing():
    """The flagship recipe (ZeRO-3, 120 checkpointed segments) fits 80 GiB many times over: the search drops
    the recomputation and the per-block gathers, keeps the global batch, and predicts a faster step."""
    cfg = config.load("ds_configs/r2060.json", SYNTHETIC)
    result = fit.search(cfg, 8, 80.0, _gpu())
    best = result.best.setting
    assert not (best.backend == "deepspeed" and best.zero_stage == 3 and _checkpointed(best)), best
    assert not _checkpointed(best)
    assert result.best.mem_bytes <= 0.9 * 80 * GiB
    assert best.micro_batch * best.accumulation == 64
    as_shipped = next(c for c in result.fits if c.setting == result.base)
    assert result.best.time.total < as_shipped.time.total
    assert as_shipped.time.recompute > 0 and result.best.time.recompute == 0


def test_r2060_on_8_gpus_of_16_gib_checkpoints_or_shards():
    cfg = config.load("ds_configs/r2060.json", SYNTHETIC)
    result = fit.search(cfg, 8, 16.0, _gpu())
    best = result.best.setting
    assert _checkpointed(best) or best.backend == "fsdp" or best.zero_stage >= 1, best
    assert result.best.mem_bytes <= 0.9 * 16 * GiB
    # the unsharded, uncheckpointed setting is what does not fit here
    assert all(c.setting.checkpoint or c.setting.backend == "fsdp" or c.setting.zero_stage > 0 for c in result.fits)


def test_r50_with_a_generous_budget_picks_no_sharding_and_no_checkpointing():
    """From a config that shards and checkpoints everything: with room to spare, plain data parallelism."""
    cfg = config.load("ds_configs/r50.json", SYNTHETIC + ["zero_optimization.stage=3", 'engine.model.checkpoint="all"',
                                                      "train_micro_batch_size_per_gpu=8"])
    result = fit.search(cfg, 2, 64.0, CPU, device="cpu")
    best = result.best.setting
    assert (best.backend, best.zero_stage, best.checkpoint) == ("deepspeed", 0, ()), best
    assert best.micro_batch * best.accumulation == 8


def _min_memory(result: fit.FitResult, **where) -> float:
    """The least memory among all candidates of `result`'s search whose setting has the given fields."""
    return min(c.mem_bytes for c in _all(result) if all(getattr(c.setting, k) == v for k, v in where.items()))


def _all(result):
    return result.fits + [small for _, small in result.by_family.values()]


def test_10m_class_head_at_a_tight_budget_picks_a_16_bit_or_offloaded_head():
    """10 M classes on 2 ranks: the fp32 centres and their momentum alone are 4.8 GiB per rank. On a CPU at
    6 GiB (offload changes nothing there: the host is the device) the centres go to bf16; on a GPU of 7 GiB
    the centres go to the host or to 16 bits. Both budgets are checked to be too small for fp32 centres on the
    device, so the choice is forced by memory, not by the tie rule."""
    cfg = config.load("ds_configs/10m_classes.json")
    cpu = fit.search(cfg, 2, 6.0, CPU, device="cpu")
    assert cpu.best is not None and cpu.best.setting.head_dtype in ("bf16", "fp16")
    roomy = fit.search(cfg, 2, 64.0, CPU, device="cpu")
    assert _min_memory(roomy, head_dtype="fp32") > cpu.budget_bytes
    gpu = fit.search(cfg, 2, 7.0, _gpu("fp32"), device="gpu")
    s = gpu.best.setting
    assert s.head_offload == "cpu" or s.head_dtype in ("bf16", "fp16"), s
    roomy_gpu = fit.search(cfg, 2, 80.0, _gpu("fp32"), device="gpu")
    assert _min_memory(roomy_gpu, head_dtype="fp32", head_offload="none") > gpu.budget_bytes


def test_candidate_path_equals_the_planner_on_the_validated_config():
    """The search builds candidates without validation (cheap); the config it writes must plan the same."""
    cfg = config.load("ds_configs/r2060.json", SYNTHETIC)
    result = fit.search(cfg, 8, 16.0, _gpu())
    for cand in result.fits[:3] + [result.by_family["ZeRO-1"][0], result.by_family["FSDP2 no reshard"][1]]:
        applied = fit.apply(cfg, cand.setting)
        p = planner.plan(applied, 8, device="gpu", mem_gb=16.0)
        assert p.total_bytes == pytest.approx(cand.mem_bytes, rel=1e-9), cand.setting
        assert applied.global_batch_size(8) == cfg.global_batch_size(8)


def test_write_changes_only_the_chosen_keys(tmp_path, capsys):
    """--write: the input file with the chosen keys set; it loads, keeps the global batch, and every key that
    differs from the input is one the search printed."""
    out = tmp_path / "r2060_fit.json"
    rc = plan_cli.main(["--config", "ds_configs/r2060.json", "--world-size", "8", "--gpu-mem-gb", "80", "--fit",
                        "--write", str(out), *_sets(SYNTHETIC)])
    text = capsys.readouterr().out
    assert rc == 0 and f"wrote {out}" in text
    written = config.load(out)
    assert written.global_batch_size(8) == config.load("ds_configs/r2060.json", SYNTHETIC).global_batch_size(8)

    def flat(d, prefix=""):
        items = {}
        for k, v in d.items():
            if isinstance(v, dict) and v:
                items.update(flat(v, f"{prefix}{k}."))
            else:
                items[f"{prefix}{k}"] = v
        return items

    from engine.config.files import apply_overrides

    before = flat(apply_overrides(read_file("ds_configs/r2060.json"), SYNTHETIC))
    after = flat(json.loads(out.read_text()))
    changed = {k for k in before.keys() | after.keys() if before.get(k, "absent") != after.get(k, "absent")}
    chosen = text.split("chosen keys: ")[1].splitlines()[0]
    set_keys = [a.split("=", 1)[0] for a in chosen.split("--set ") if a.strip()]
    assert changed and all(any(k == s or k.startswith(s + ".") for s in set_keys) for k in changed), (changed, set_keys)


def test_cli_prints_candidates_side_by_side_and_a_verdict_per_backend(capsys):
    rc = plan_cli.main(["--config", "ds_configs/r2060.json", "--world-size", "8", "--gpu-mem-gb", "80", "--fit",
                        *_sets(SYNTHETIC)])
    text = capsys.readouterr().out
    assert rc == 0
    assert "fastest that fit:" in text and "#1" in text and "#3" in text
    verdicts = text.split("other backends:\n")[1].split("chosen keys")[0].splitlines()
    families = {"ZeRO-0", "ZeRO-1", "ZeRO-2", "ZeRO-3", "FSDP2 reshard", "FSDP2 no reshard",
                "FSDP2 reshard + offload", "FSDP2 no reshard + offload"}
    import re

    row = next(x for x in text.splitlines() if x.startswith("backend"))
    winner = re.split(r"\s{2,}", row.strip())[1]
    named = {v.strip().split(":")[0] for v in verdicts}
    assert len(verdicts) == len(named) == len(families) - 1 and named | {winner} == families


def test_nothing_fits_says_what_would(capsys):
    rc = plan_cli.main(["--config", "ds_configs/r2060.json", "--world-size", "2", "--gpu-mem-gb", "2", "--fit",
                        *_sets(SYNTHETIC)])
    text = capsys.readouterr().out
    assert rc == 1
    line = next(x for x in text.splitlines() if x.startswith("nothing fits"))
    need = float(line.split("it would fit with ")[1].split(" GiB")[0])
    assert need > 2 / 0.9
    result = fit.search(config.load("ds_configs/r2060.json", SYNTHETIC), 2, need + 0.1, _gpu())
    assert result.best is not None


def test_fit_argument_errors(capsys):
    base = ["--config", "ds_configs/r50.json", "--world-size", "2", "--fit", *_sets(SYNTHETIC)]
    assert plan_cli.main(base + ["--micro-batch", "4"]) == 2
    assert "--micro-batch: not with --fit" in capsys.readouterr().err
    assert plan_cli.main(["--config", "ds_configs/r50.json", "--world-size", "2", "--fit", "--gpu-mem-gb", "80",
                          "--set", "engine.data.source=demo", "--set", "engine.head.num_classes=null",
                          "--num-classes", "1000"]) == 0
    assert "1,000 classes" in capsys.readouterr().out
    assert plan_cli.main(base + ["--link-gbps", "0"]) == 2
    assert "--link-gbps: expected > 0, got 0.0" in capsys.readouterr().err
    assert plan_cli.main(base + ["--card", "Z9"]) == 2
    assert "card: 'Z9' is not in the table" in capsys.readouterr().err
    assert plan_cli.main(["--config", "ds_configs/r50.json", "--world-size", "2", "--write", "x.json"]) == 2
    assert "--write needs --fit" in capsys.readouterr().err


# ---- the time model by hand ---------------------------------------------------------------------------------

def _step(cfg, world, hw=CPU):
    m = cfg.engine.model
    measure = planner.measure_backbone(m.name, m.embedding_size)
    prof = planner.profile_from(measure, m.checkpoint)
    n_local = -(-cfg.engine.head.num_classes // world)
    return timing.step_time(cfg, world, cfg.micro_batch_size, measure, prof, n_local, 0, hw), prof, measure


def _r18(stage=0, backend="deepspeed", checkpoint=None, accum=1, reshard=None, micro=4):
    ds = {"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": accum,
          "zero_optimization": {"stage": stage}}
    engine = {"model": {"name": "r18", "embedding_size": 512, "checkpoint": checkpoint or {}},
              "head": {"num_classes": 1000}, "train": {"backend": backend}}
    if backend == "fsdp":
        engine["fsdp"] = {"reshard_after_forward": reshard}
    return config.from_dict({**ds, "engine": engine})


def test_compute_and_recomputation_are_the_planners_flops_at_the_rate():
    plain, prof, _ = _step(_r18(), 2)
    assert plain.compute == pytest.approx(4 * 2 * prof.train_macs / (CPU.tflops * 1e12))
    assert plain.recompute == 0
    ck, prof_ck, _ = _step(_r18(checkpoint={"layer3": 2}), 2)
    assert prof_ck.recompute_macs > 0
    assert ck.recompute == pytest.approx(4 * 2 * prof_ck.recompute_macs / (CPU.tflops * 1e12))
    assert ck.compute == plain.compute and ck.total > plain.total


def test_normalisation_and_activation_layers_cost_by_their_elements():
    """BatchNorm and PReLU are priced per output element, forward and (where the gradient reaches) backward, and
    again in a checkpointed block's recomputation; the stem and layer1 of r18 hold most of those elements."""
    from dataclasses import replace

    hw = replace(CPU, norm_act_s=1e-9, norm_act_bwd_s=4e-9)
    base, _, _ = _step(_r18(), 2)
    plain, prof, _ = _step(_r18(), 2, hw)
    assert prof.norm_act_elems == prof.norm_act_backward_elems > 0
    assert plain.compute - base.compute == pytest.approx(4 * prof.norm_act_elems * (1e-9 + 4e-9))
    ck, prof_ck, _ = _step(_r18(checkpoint={"layer3": 2}), 2, hw)
    ck0, _, _ = _step(_r18(checkpoint={"layer3": 2}), 2)
    assert 0 < prof_ck.recompute_norm_act_elems < prof.norm_act_elems
    assert ck.recompute - ck0.recompute == pytest.approx(4 * prof_ck.recompute_norm_act_elems * 1e-9)
    gpu = timing.gpu_hardware("bf16", "H100")  # memory traffic at the card's bandwidth: 3 and 5 accesses of 2 bytes
    assert gpu.norm_act_s == pytest.approx(6 / 3350e9) and gpu.norm_act_bwd_s == pytest.approx(10 / 3350e9)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_collective_bytes_per_zero_stage(stage):
    """fp32 on 4 ranks, 2 micro-batches per step: ring all-reduce 2(n-1)/n of the buffer, all-gather and
    reduce-scatter (n-1)/n; ZeRO-2 reduces every micro-batch, ZeRO-3 gathers its large modules twice per
    micro-batch (forward, backward) and reduce-scatters every micro-batch."""
    n, accum = 4, 2
    t, prof, measure = _step(_r18(stage=stage, accum=accum), n)
    P, share = prof.trained, (n - 1) / n  # gradients of the trained parameters only
    gathered = sum(m for m in measure.module_params if m > 100000)
    expected = {0: 2 * share * 4 * P, 1: 2 * share * 4 * P, 2: accum * share * 4 * P + share * 4 * P,
                3: accum * (2 * share * 4 * gathered + share * 4 * P)}[stage]
    assert t.comm_bytes == pytest.approx(expected)


def test_fsdp_gathers_twice_with_reshard_once_without():
    n = 2
    with_reshard, prof, _ = _step(_r18(backend="fsdp", reshard=True), n)
    without, _, _ = _step(_r18(backend="fsdp", reshard=False), n)
    P = prof.num_params
    assert with_reshard.comm_bytes == pytest.approx(2 * P * 4 / 2 + P * 4 / 2)  # fp32: gathers x2 + reduce-scatter
    assert without.comm_bytes == pytest.approx(P * 4 / 2 + P * 4 / 2)


def test_gpu_overlaps_prefetched_collectives_a_cpu_does_not():
    """On a GPU FSDP2's prefetched gathers and reduce-scatters and ZeRO-0's bucketed all-reduce of fp32 gradients
    (engine.parallel.reducer) hide behind the compute (here all of them: a fast link, micro-batch 64); ZeRO-1's
    reduction after the backward does not. On a CPU nothing hides."""
    import dataclasses

    gpu = dataclasses.replace(_gpu(), link_gbps=1e4)
    fsdp, _, _ = _step(_r18(backend="fsdp", reshard=True, micro=64), 8, gpu)
    zero0, _, _ = _step(_r18(micro=64), 8, gpu)
    zero1, _, _ = _step(_r18(stage=1, micro=64), 8, gpu)
    assert fsdp.comm_bytes > 0 and fsdp.comm == 0
    assert zero0.comm_bytes > 0 and zero0.comm == 0
    assert zero1.comm >= zero1.comm_bytes / 1e13 > 0
    cpu = dataclasses.replace(CPU, link_gbps=1e4)
    cpu_fsdp, _, _ = _step(_r18(backend="fsdp", reshard=True, micro=64), 8, cpu)
    assert cpu_fsdp.comm >= cpu_fsdp.comm_bytes / 1e13 > 0


# ---- engine.auto's checks before the process group (engine/train/auto.py) ------------------------------------

def test_auto_keys_are_checked():
    with pytest.raises(config.ConfigError, match=r"engine.auto_mem_gb: has no effect without engine.auto=true"):
        config.load("ds_configs/quickstart.json", ["engine.auto_mem_gb=4"])
    with pytest.raises(config.ConfigError, match=r"engine.auto_mem_gb: expected >= 0 \(0: the device's memory\), "
                                                 r"got -1.0"):
        config.load("ds_configs/quickstart.json", ["engine.auto=true", "engine.auto_mem_gb=-1"])


def test_auto_refuses_before_the_process_group_and_sizes_the_budget(monkeypatch):
    """The launcher's world (WORLD_SIZE, LOCAL_WORLD_SIZE) and the budget: engine.auto_mem_gb, else the host's
    MemTotal over the ranks of the node. Nothing fits 0.3 GiB: one ConfigError naming what would fit."""
    import torch

    from engine.train import auto

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    tight = config.load("ds_configs/quickstart.json", ["engine.auto=true", "engine.auto_mem_gb=0.3"])
    with pytest.raises(config.ConfigError) as err:
        auto.check_fits(tight)
    message = str(err.value)
    assert message.startswith("engine.auto: nothing fits 0.3 GiB per rank on 2 rank(s)") and "\n" not in message
    need = float(message.split("it would fit with ")[1].split(" GiB")[0])
    auto.check_fits(config.load("ds_configs/quickstart.json", ["engine.auto=true", f"engine.auto_mem_gb={need}"]))
    host = config.load("ds_configs/quickstart.json", ["engine.auto=true"])
    assert auto.memory_budget_gb(host, torch.device("cpu"), 2) == pytest.approx(auto._host_memory_bytes() / 2 / GiB)


def test_auto_needs_the_class_count_before_the_data_is_opened():
    from engine.train import auto

    cfg = config.load("ds_configs/quickstart.json", ["engine.auto=true", "engine.head.num_classes=null"])
    with pytest.raises(config.ConfigError, match=r"engine.auto: needs engine.head.num_classes"):
        auto.check_fits(cfg)


def test_auto_reads_the_class_count_from_the_datas_property_file(tmp_path):
    """A recipe that leaves the class count to its RecordIO folder: engine.auto sizes the head from the folder's
    property file (as engine.plan does) and chooses; the count then still comes from the data at start-up."""
    from engine.train import auto

    (tmp_path / "property").write_text("2000000,112,112\n")
    for name in ("train.rec", "train.idx"):
        (tmp_path / name).write_bytes(b"")
    base = ["engine.auto=true", "engine.data.source=recordio", f"engine.data.path={tmp_path}",
            "engine.head.num_classes=null", "engine.eval.bins=[]"]
    cfg = config.load("ds_configs/quickstart.json", base + ["engine.auto_mem_gb=64"])
    assert cfg.engine.head.num_classes is None
    auto.check_fits(cfg)  # sized from the property file: no refusal
    # 1.5 GiB fits this job with 64 classes, not with the folder's 2M (centres of 128 floats and their
    # momentum): the count was read, not ignored
    (tmp_path / "property").write_text("64,112,112\n")
    auto.check_fits(config.load("ds_configs/quickstart.json", base + ["engine.auto_mem_gb=1.5"]))
    (tmp_path / "property").write_text("2000000,112,112\n")
    with pytest.raises(config.ConfigError, match=r"engine.auto: nothing fits 1.5 GiB"):
        auto.check_fits(config.load("ds_configs/quickstart.json", base + ["engine.auto_mem_gb=1.5"]))
