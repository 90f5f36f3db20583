"""FSDP2 through the whole engine: config -> build_trainer -> Trainer, against DeepSpeed.

Every run is the tiny r18 of tests/support/configs.py (BatchNorm, micro-batch 4, global batch 8, SGD with
momentum, poly LR, sample_rate 1) on synthetic data addressed by global micro-batch slot, so 2 ranks x 1 micro-batch and
1 rank x 2 accumulated micro-batches see the same images in each optimizer step. One 2-rank spawn trains every
2-rank case, one 1-rank spawn the references and the cross-backend resumes:

1. fp32 equivalence after 2 steps: fsdp (reshard_after_forward true, and false with every block checkpointed)
   and DeepSpeed ZeRO-3 on 2 ranks == fsdp on 1 rank accumulating 2 micro-batches; also with gradient clipping
   below the gradient norm (fsdp and ZeRO-3 vs the 1-rank run with the same clipping). Both backends start
   from the plain seeded build, bit for bit (ZeRO-3 included).
2. bf16: fsdp (FSDP2 mixed precision) and DeepSpeed ZeRO-3 with torch_autocast stay finite and agree with each
   other and with fp32 within BF16_TOL after 2 steps.
3. Cross-backend resume: 2 steps of fsdp on 2 ranks, checkpoint, 2 more under DeepSpeed ZeRO-1 on 1 rank with
   accumulation 2 == 4 straight fsdp steps on 2 ranks; and 2 steps of ZeRO-1 on 2 ranks, then 2 of fsdp on 1
   rank == 4 straight ZeRO-1 steps.
"""
import os

import pytest
import torch

from engine.runtime.spawn import run_distributed
from tests.support.configs import NUM_CLASSES, tiny_r18_config

# Relative error in the 2-norm over all backbone parameters (resp. all head rows), as
# tests/distributed/test_deepspeed_backend.py: fp32 summation order differs between a reduce-scatter and local
# accumulation, so element-wise comparison is noise.
TOL = 1e-5
CLIP = 0.5  # below every step's global gradient norm (asserted), so clipping acts
AUTOCAST = {"enabled": True, "dtype": "bfloat16"}
# bf16 vs bf16 and bf16 vs fp32, on the update after 2 steps (weights - initial weights), 2-norm relative.
# bf16 keeps 8 significant bits (a rounding of up to 2^-9 = 0.2% per value); activations and gradients are
# rounded at each of r18's ~40 layers and the errors add like a random walk, so a few percent are expected
# between any two bf16 computations and fp32. The two backends also round differently: FSDP2 computes the
# whole forward in bf16 (parameters cast, BatchNorm statistics in fp32), autocast only the matmul-like ops.
# Measured on r18, micro-batch 4, 2 steps: see test_bf16_backends_agree's printout. A wrong gradient scale
# (x2 or /2) would give 50-100%.
BF16_TOL = 0.15

TWO_RANK_CASES = {
    # name: (engine.train.backend, ZeRO stage, dotted overrides)
    "fsdp": ("fsdp", 0, {}),
    "zero3": ("deepspeed", 3, {}),
    "fsdp_keep_ckpt": ("fsdp", 0, {"engine.fsdp.reshard_after_forward": False, "engine.model.checkpoint": "all"}),
    "fsdp_clip": ("fsdp", 0, {"gradient_clipping": CLIP}),
    "zero3_clip": ("deepspeed", 3, {"gradient_clipping": CLIP}),
    "fsdp_bf16": ("fsdp", 0, {"torch_autocast": AUTOCAST}),
    "zero3_bf16": ("deepspeed", 3, {"torch_autocast": AUTOCAST}),
}
ONE_RANK_CASES = {
    "ref": ("fsdp", 0, {}),
    "ref_clip": ("fsdp", 0, {"gradient_clipping": CLIP}),
}
RESUME_STEPS = 4  # the straight runs; the resumed ones take over after step 2
RESUME_SOURCES = {"fsdp_4": ("fsdp", 0), "zero1_4": ("deepspeed", 1)}  # 2 ranks, checkpoint at step 2
RESUMED = {"zero1_from_fsdp": ("deepspeed", 1, "fsdp_4"), "fsdp_from_zero1": ("fsdp", 0, "zero1_4")}  # 1 rank


def _raw(out_dir: str, world: int, backend: str, stage: int, sets: dict, max_steps: int = 2) -> dict:
    raw = tiny_r18_config(out_dir, world, stage, max_steps=max_steps)
    raw["engine"]["train"]["backend"] = backend
    for dotted, value in sets.items():
        node = raw
        *path, last = dotted.split(".")
        for key in path:
            node = node.setdefault(key, {})
        node[last] = value
    return raw


def _grad_norms_hook():
    """A hook recording the backbone's global gradient norm before clipping after every step (fsdp: its own;
    DeepSpeed: the engine's)."""
    from engine.train.hooks import Hook

    class GradNorms(Hook):
        def __init__(self):
            self.norms = []

        def on_step_end(self, trainer, step, loss):
            bb = trainer.backbone
            norm = bb.last_grad_norm if bb.name == "fsdp" else bb.engine.get_global_grad_norm()
            self.norms.append(None if norm is None else float(norm))

    return GradNorms()


def _train(raw: dict, *, initial: bool = False) -> dict:
    """build_trainer + train; the full backbone (rank 0), this rank's head rows, losses, gradient norms."""
    import time

    from engine.config import schema as config
    from engine.runtime import dist
    from engine.train.build import build_trainer

    t0 = time.perf_counter()
    norms = _grad_norms_hook()
    trainer = build_trainer(config.from_dict(raw), hooks=[norms])
    out = {}
    if initial:
        out["initial"] = trainer.backbone.full_state_dict(everywhere=False)
    trainer.train()
    rank0 = dist.get_rank() == 0
    state = trainer.backbone.full_state_dict(everywhere=False)
    out.update(backbone=state if rank0 else None, head=trainer.head.weight.detach().cpu().clone(),
               class_start=trainer.head.class_start, norms=norms.norms,
               losses=[r["loss"] for r in trainer.hooks[0].history if "loss" in r],
               resumed_from=None if trainer.resumed_from is None else str(trainer.resumed_from),
               precision=trainer.cfg.precision, backend=trainer.backbone.name)
    trainer.close()
    out["seconds"] = time.perf_counter() - t0
    return out


def _two_ranks(out_dir: str) -> dict:
    from engine.runtime import dist

    dist.init()  # as run.py: DeepSpeed's comm layer too (ZeRO-3's zero.Init reads the world size from it)
    results = {}
    for name, (backend, stage, sets) in TWO_RANK_CASES.items():
        raw = _raw(os.path.join(out_dir, name), 2, backend, stage, sets)
        results[name] = _train(raw, initial=name in ("fsdp", "zero3"))
    for name, (backend, stage) in RESUME_SOURCES.items():
        raw = _raw(os.path.join(out_dir, name), 2, backend, stage, {"engine.checkpoint": {"every": 2, "keep": 0,
                                                                                              "export": False}},
                   max_steps=RESUME_STEPS)
        results[name] = _train(raw)
    return results


def _one_rank(out_dir: str) -> dict:
    from engine.runtime import dist

    dist.init()
    results = {}
    for name, (backend, stage, sets) in ONE_RANK_CASES.items():
        results[name] = _train(_raw(os.path.join(out_dir, name), 1, backend, stage, sets))
    for name, (backend, stage, source) in RESUMED.items():
        step2 = os.path.join(out_dir, source, "checkpoints", "step_00000002")
        raw = _raw(os.path.join(out_dir, name), 1, backend, stage,
                   {"engine.checkpoint": {"resume": step2, "export": False}}, max_steps=RESUME_STEPS)
        results[name] = _train(raw)
    return results


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("fsdp_engine"))
    two = run_distributed(_two_ranks, 2, out, timeout_s=900)
    one = run_distributed(_one_rank, 1, out, timeout_s=900)
    print("seconds per run:", {name: round(r["seconds"], 1) for name, r in [*two[0].items(), *one[0].items()]})
    return two, one[0]


# ---------------------------------------------------------------------------------------------------------------
# Comparisons
# ---------------------------------------------------------------------------------------------------------------

def _param_names():
    import backbones

    return [n for n, _ in backbones.build_backbone("r18", embedding_size=16, device="meta").named_parameters()]


def _flat(state: dict) -> torch.Tensor:
    return torch.cat([state[k].double().flatten() for k in _param_names()])


def _rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.double() - ref.double()).norm() / ref.double().norm()).item()


def _head(run_per_rank) -> torch.Tensor:
    """The head's rows in class order (the 2-rank shards concatenated, checked contiguous)."""
    if isinstance(run_per_rank, dict):
        return run_per_rank["head"]
    r0, r1 = run_per_rank
    assert r0["class_start"] == 0 and r1["class_start"] == r0["head"].shape[0]
    head = torch.cat([r0["head"], r1["head"]])
    assert head.shape[0] == NUM_CLASSES
    return head


def _plain_initial() -> dict:
    import backbones

    torch.manual_seed(3)  # engine.train.seed of the tiny config
    return backbones.build_backbone("r18", embedding_size=16).state_dict()


def _case(two, name):
    return two[0][name], (two[0][name], two[1][name])


def test_both_backends_start_from_the_plain_build(runs):
    """fsdp (meta build, sharded) and ZeRO-3 (zero.Init, partitioned) initialise bit for bit as
    torch.manual_seed(seed); build_backbone(name) on one process: every parameter and buffer."""
    two, _ = runs
    want = _plain_initial()
    for name in ("fsdp", "zero3"):
        got = two[0][name]["initial"]
        assert list(got) == list(want), name
        assert [k for k in want if not torch.equal(got[k], want[k])] == [], name


@pytest.mark.parametrize("name, ref", [("fsdp", "ref"), ("zero3", "ref"), ("fsdp_keep_ckpt", "ref"),
                                       ("fsdp_clip", "ref_clip"), ("zero3_clip", "ref_clip")])
def test_two_ranks_equal_one_rank_with_accumulation(runs, name, ref):
    """fsdp (reshard_after_forward true; false with every block checkpointed; clipped) and ZeRO-3 (plain,
    clipped) on 2 ranks == fsdp on 1 rank accumulating 2 micro-batches, after 2 optimizer steps through the
    Trainer: every backbone parameter, every head row, the loss. (ZeRO-3 2 ranks == DeepSpeed 1 rank is
    tests/distributed/test_deepspeed_backend.py's.)"""
    two, one = runs
    r0, ranks = _case(two, name)
    want = one[ref]
    assert r0["backend"] == TWO_RANK_CASES[name][0] and want["backend"] == "fsdp"
    err = _rel(_flat(r0["backbone"]), _flat(want["backbone"]))
    print(f"{name}: backbone {err:.2e}")
    assert err <= TOL, f"{name}: backbone parameters differ by {err:.2e} relative"
    err = _rel(_head(ranks), _head(want))
    assert err <= TOL, f"{name}: head rows differ by {err:.2e} relative"
    assert len(r0["losses"]) == 2 and all(abs(a - b) <= TOL * abs(b) for a, b in zip(r0["losses"], want["losses"]))


def test_training_moved_the_weights_and_clipping_acted(runs):
    """Guard against a vacuous pass: training moved the backbone far beyond TOL; clipping changed the result,
    and each clipped step's gradient norm exceeded CLIP on every backend and rank, agreeing between them."""
    two, one = runs
    ref, clipped = _flat(one["ref"]["backbone"]), _flat(one["ref_clip"]["backbone"])
    assert _rel(ref, _flat(_plain_initial())) > 50 * TOL
    assert _rel(clipped, ref) > 50 * TOL
    want = one["ref_clip"]["norms"]
    assert len(want) == 2 and min(want) > CLIP, want
    for name in ("fsdp_clip", "zero3_clip"):
        for rank in (0, 1):
            got = two[rank][name]["norms"]
            assert all(abs(g - w) <= 1e-4 * w for g, w in zip(got, want)), (name, rank, got, want)


def test_bf16_backends_agree(runs):
    """bf16 under fsdp (FSDP2 mixed precision: bf16 parameters for compute, fp32 reduction and masters) and under
    DeepSpeed ZeRO-3 with torch_autocast: finite, and their updates agree with each other and with fp32 within
    BF16_TOL after 2 steps; each really computed in bf16 (differs from fp32 by more than fp32 noise)."""
    two, _ = runs
    initial = _flat(_plain_initial())
    fp32 = _flat(two[0]["fsdp"]["backbone"]) - initial
    updates = {}
    for name in ("fsdp_bf16", "zero3_bf16"):
        run = two[0][name]
        assert run["precision"] == "bf16"
        assert all(torch.isfinite(v).all() for v in run["backbone"].values()), name
        assert all(torch.isfinite(two[r][name]["head"]).all() for r in (0, 1)), name
        updates[name] = _flat(run["backbone"]) - initial
    errs = {"fsdp_bf16 vs zero3_bf16": _rel(updates["fsdp_bf16"], updates["zero3_bf16"]),
            "fsdp_bf16 vs fp32": _rel(updates["fsdp_bf16"], fp32),
            "zero3_bf16 vs fp32": _rel(updates["zero3_bf16"], fp32)}
    print("bf16 update differences (2-norm relative):", {k: f"{v:.4f}" for k, v in errs.items()})
    assert all(v <= BF16_TOL for v in errs.values()), errs
    assert errs["fsdp_bf16 vs fp32"] > 100 * TOL and errs["zero3_bf16 vs fp32"] > 100 * TOL, errs
    loss_fsdp, loss_ds = two[0]["fsdp_bf16"]["losses"], two[0]["zero3_bf16"]["losses"]
    assert all(abs(a - b) <= 0.02 * abs(b) for a, b in zip(loss_fsdp, loss_ds)), (loss_fsdp, loss_ds)


@pytest.mark.parametrize("resumed, straight", [("zero1_from_fsdp", "fsdp_4"), ("fsdp_from_zero1", "zero1_4")])
def test_resume_across_backends_and_world_sizes(runs, resumed, straight):
    """A checkpoint written at step 2 by one backend on 2 ranks, resumed by the other on 1 rank accumulating 2
    micro-batches for steps 3-4, ends where the straight 4-step run ends: backbone, optimizer momentum (else
    step 3 differs), head rows, LR schedule and data position."""
    two, one = runs
    got, (s0, s1) = one[resumed], _case(two, straight)[1]
    assert got["resumed_from"] and got["resumed_from"].endswith("step_00000002"), got["resumed_from"]
    assert got["backend"] == RESUMED[resumed][0] != s0["backend"]
    assert len(got["losses"]) == 2 and len(s0["losses"]) == RESUME_STEPS
    err = _rel(_flat(got["backbone"]), _flat(s0["backbone"]))
    print(f"{resumed}: backbone {err:.2e}")
    assert err <= TOL, f"{resumed}: backbone differs from the straight run by {err:.2e}"
    assert _rel(_head(got), _head((s0, s1))) <= TOL
    assert all(abs(a - b) <= TOL * abs(b) for a, b in zip(got["losses"], s0["losses"][2:]))


def test_straight_runs_of_both_backends_agree(runs):
    """The two straight 4-step runs (fsdp and ZeRO-1, 2 ranks) agree with each other too."""
    two, _ = runs
    assert _rel(_flat(two[0]["fsdp_4"]["backbone"]), _flat(two[0]["zero1_4"]["backbone"])) <= TOL
    assert _rel(_head(_case(two, "fsdp_4")[1]), _head(_case(two, "zero1_4")[1])) <= TOL
