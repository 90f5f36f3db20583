"""FSDP2 backend (engine/parallel/fsdp_backend.py) on 2 gloo ranks against plain torch on one process.

One spawned 2-rank run trains every case; the reference runs here, in the test process. Each FSDP rank reads
its own micro-batches and accumulates ACC of them; the reference reads all of them (step s: micro-batch 0 of
rank 0, of rank 1, micro-batch 1 of rank 0, ...) and divides each loss by 2 * ACC. The loss is a per-sample
mean, so the averaged FSDP gradient equals the reference's, and every backbone parameter must agree after the
SGD-momentum steps. BatchNorm running statistics are rank-local buffers (arcface_torch's DDP does not broadcast
them), so they are compared between FSDP runs of the same rank, not with the reference. (The backend's pieces
that need no process group: tests/unit/test_fsdp.py.)
"""
import math

import pytest
import torch

from engine.runtime.spawn import run_distributed

NAME, EMB, MICRO, ACC, SEED = "r18", 16, 4, 2, 3
LR, MOMENTUM, WD = 0.02, 0.9, 5e-4
CLIP = 0.5  # below both steps' global gradient norms (asserted), so clipping acts
# Relative error in the 2-norm over all backbone parameters (tests/distributed/test_deepspeed_backend.py: fp32 summation
# order differs between FSDP's reduce-scatter and local accumulation; element-wise comparison is noise).
# Measured here: 5e-7 for every r18 case. Micro-batches of 4, not 2: the last BatchNorm1d normalises each of
# the 16 channels over the micro-batch, and with 2 samples a channel's variance came out below its eps, so
# the gradient was mostly rounding (plain fp32 vs fp64 differed by 1e-4 in the gradient norm).
TOL = 1e-5

# Precision cases run mbf (cheapest backbone with BatchNorm and PReLU; bf16 is 30-130x slower than fp32 on CPUs
# without native bf16) on micro-batches of 2 with BatchNorm in eval mode (running statistics): in training
# mode mbf's two BatchNorms over 1x1 maps and 2 samples make the loss so ill-conditioned that plain fp32 and
# fp64 updates differ by 3%, which would hide any error of the mixed precision itself. A training-mode bf16
# step is still run and must be finite.
MBF, MBF_MICRO = "mbf", 2
OTHERS = ("mbf", "vit_t")  # the other backbone families, for the initialisation check
# Low precision vs fp32, on the update after the steps (weights - initial weights), 2-norm relative. bf16 keeps 8
# significant bits (rounding up to 2^-9 = 0.2% per value) and activations and gradients are rounded at each of
# mbf's ~50 layers, adding up like a random walk to a few percent: plain bf16 autocast vs fp64 gave 1.6%, FSDP
# bf16 gives 1.6% (2 steps). fp16 keeps 11 bits but 5 exponent bits: eval-mode mbf's activations shrink to
# 1e-5..1e-7, below fp16's smallest normal (6e-5), where it keeps fewer bits (the loss scale does not help
# there: 2^8..2^16 give the same); FSDP fp16 gives 1.3% (1 step). 15% is ~10x these; a wrong gradient scale
# (x2) would give 100%. That the masters and optimizer state stay fp32 is asserted separately.
LOWP_TOL = 0.15


def _micro_batch(step: int, micro: int, rank: int, size: int = MICRO):
    g = torch.Generator().manual_seed(1000 * step + 10 * micro + rank)
    return torch.randn(size, 3, 112, 112, generator=g), torch.randn(size, EMB, generator=g)


def _loss(emb: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return (emb.float() - targets).pow(2).mean()


def _sgd(module: torch.nn.Module) -> torch.optim.Optimizer:
    params = [p for p in module.parameters() if p.requires_grad]  # all decayed, as arcface_torch
    return torch.optim.SGD(params, lr=LR, momentum=MOMENTUM, weight_decay=WD)


def _rel(a: dict, b: dict, keys) -> float:
    x = torch.cat([a[k].double().flatten() for k in keys])
    y = torch.cat([b[k].double().flatten() for k in keys])
    return ((x - y).norm() / y.norm()).item()


def _update_rel(got: dict, ref: dict, init: dict, keys) -> float:
    """_rel of the change from `init`: the weights move little in 2 steps, so this is the sharper test."""
    return _rel({k: got[k] - init[k] for k in keys}, {k: ref[k] - init[k] for k in keys}, keys)


def _param_names(name: str = NAME):
    import backbones

    return [n for n, _ in backbones.build_backbone(name, embedding_size=EMB, device="meta").named_parameters()]


# ---------------------------------------------------------------------------------------------------------------
# The 2-rank side
# ---------------------------------------------------------------------------------------------------------------

def _build(name: str = NAME, **kw):
    from engine.parallel.fsdp_backend import build_fsdp_backbone

    kw.setdefault("gradient_accumulation_steps", ACC)
    kw.setdefault("make_optimizer", _sgd)
    return build_fsdp_backbone(name, embedding_size=EMB, seed=SEED, device=torch.device("cpu"), **kw)


def _train(bb, steps, acc: int = ACC, size: int = MICRO):
    """FSDP optimizer steps `steps` on this rank's micro-batches: the unclipped norms, the steps' applied
    flags and the embeddings' dtype."""
    import torch.distributed as dist

    rank, norms, applied = dist.get_rank(), [], []
    for step in steps:
        for micro in range(acc):
            images, targets = _micro_batch(step, micro, rank, size)
            emb = bb(images)
            bb.backward(_loss(emb, targets), boundary=micro == acc - 1)
        applied.append(bb.step())
        norms.append(bb.last_grad_norm)
    return norms, applied, emb.dtype


def _two_rank_cases() -> dict:
    """Every FSDP case, on each rank; rank 0 returns full state dicts, rank 1 only what is checked per rank."""
    import os

    import torch.distributed as dist

    from engine.parallel.fsdp_backend import DynamicLossScale

    rank = dist.get_rank()
    out = {}
    keep = (lambda sd: sd) if rank == 0 else (lambda sd: None)

    # ZeRO-3-like; then checkpoint round trip into a fresh ZeRO-2-like run, and one more step on both.
    bb = _build(reshard_after_forward=True)
    out["init"] = keep(bb.full_state_dict())
    out["other_inits"] = {n: keep(_build(n, gradient_accumulation_steps=1).full_state_dict()) for n in OTHERS}
    _train(bb, range(2))
    bb.eval()
    with torch.no_grad():  # an evaluation forward leaves the root gathered: state must still come out right
        bb(_micro_batch(9, 0, rank)[0])
    bb.train()
    out["z3"] = keep(bb.full_state_dict())
    out["z3_bn"] = _bn_buffers(bb.full_state_dict())  # each rank's own
    weights, optim = bb.full_state_dict(everywhere=False), bb.optimizer_state()
    out["z3_optim"] = keep(optim)
    out["rank0_only"] = (rank == 0) == bool(weights) and (rank == 0) == bool(optim["state"])
    weights, optim = _broadcast((weights, optim))  # what every rank reads from a checkpoint
    fresh = _build(reshard_after_forward=False)
    fresh.load_full_state_dict(weights)
    fresh.load_optimizer_state(optim)
    out["fresh_loaded"] = keep((fresh.full_state_dict(), fresh.optimizer_state()))
    _train(bb, [2])
    _train(fresh, [2])
    out["z3_step3"], out["fresh_step3"] = keep(bb.full_state_dict()), keep(fresh.full_state_dict())
    del bb, fresh

    # ZeRO-2-like with every block checkpointed: BN statistics must match the run without checkpointing.
    bb = _build(reshard_after_forward=False, checkpoint="all")
    _train(bb, range(2))
    out["z2_ac"] = keep(bb.full_state_dict())
    out["z2_ac_bn"] = _bn_buffers(bb.full_state_dict())
    del bb

    # Clipping (global norm across shards), partial checkpointing, CPU offload.
    bb = _build(reshard_after_forward=True, checkpoint={"layer2": 1, "layer3": 2}, gradient_clipping=CLIP,
                cpu_offload=True)
    out["clip_norms"], _, _ = _train(bb, range(2))
    out["clip"] = keep(bb.full_state_dict())
    del bb

    # HSDP on a 2 x 1 mesh: two "nodes" of one process each (the launcher's LOCAL_SIZE says 1 per node).
    os.environ.pop("LOCAL_WORLD_SIZE", None)
    os.environ["LOCAL_SIZE"] = "1"
    bb = _build(hybrid=True)
    out["hsdp_mesh"] = tuple(bb.mesh.shape)
    _train(bb, range(2))
    out["hsdp"] = keep(bb.full_state_dict())
    del bb

    # mbf, BatchNorm in eval mode: fp32; fp32 with a loss scale whose first step overflows (skipped); bf16;
    # fp16. Then one training-mode bf16 step.
    mbf = {}
    for case in ("fp32", "scaled", "bf16", "fp16", "bf16_train"):
        precision = {"scaled": "fp32", "bf16_train": "bf16"}.get(case, case)
        bb = _build(MBF, precision=precision, gradient_accumulation_steps=1,
                    fp16={"initial_scale_power": 8} if case == "fp16" else None)
        bb.train(case == "bf16_train")
        if case == "scaled":
            bb.scaler = DynamicLossScale(initial_scale_power=200, hysteresis=1)  # 2^200: inf in fp32
            before = bb.full_state_dict()
            _, skipped, _ = _train(bb, [0], acc=1, size=MBF_MICRO)
            after = bb.full_state_dict()
            mbf["overflow"] = (skipped, bb.loss_scale(), all(torch.equal(after[k], before[k]) for k in before))
            bb.scaler.scale = 2.0 ** 10  # a power of two: scaling and unscaling are exact in fp32
        states, applied = [], []
        for step in range(1 if case in ("fp16", "bf16_train") else 2):  # fp16 is slow on CPUs too: 1 step
            _, ok, dtype = _train(bb, [step], acc=1, size=MBF_MICRO)
            states.append(keep(bb.full_state_dict()))
            applied += ok
        masters = {p.dtype for p in bb.module.parameters()}
        masters |= {s.dtype for st in bb.optimizer.state.values() for s in st.values() if torch.is_tensor(s)}
        mbf[case] = {"states": states, "applied": applied, "dtype": dtype, "masters": masters}
        del bb
    out["mbf"] = mbf

    # AdamW state round trip (moments and step count), then one more step on both; SGD state refused.
    def adamw(module):
        return torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-3, weight_decay=WD)

    bb = _build(MBF, gradient_accumulation_steps=1, make_optimizer=adamw).eval()
    _train(bb, [0], acc=1, size=MBF_MICRO)
    weights, optim = _broadcast((bb.full_state_dict(everywhere=False), bb.optimizer_state()))
    fresh = _build(MBF, gradient_accumulation_steps=1, make_optimizer=adamw).eval()
    fresh.load_full_state_dict(weights)
    fresh.load_optimizer_state(optim)
    loaded = fresh.optimizer_state()
    _train(bb, [1], acc=1, size=MBF_MICRO)
    _train(fresh, [1], acc=1, size=MBF_MICRO)
    out["adamw"] = keep((optim, loaded, bb.full_state_dict(), fresh.full_state_dict()))
    sgd = _build(MBF, gradient_accumulation_steps=1)
    try:
        sgd.load_optimizer_state(optim)
        out["wrong_kind"] = None
    except ValueError as e:
        out["wrong_kind"] = str(e)
    return out


def _bn_buffers(state: dict) -> dict:
    return {k: v for k, v in state.items() if k.endswith(("running_mean", "running_var", "num_batches_tracked"))}


def _broadcast(obj):
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# ---------------------------------------------------------------------------------------------------------------
# The 1-process reference
# ---------------------------------------------------------------------------------------------------------------

def _plain(name: str = NAME):
    import backbones

    torch.manual_seed(SEED)
    model = backbones.build_backbone(name, embedding_size=EMB)
    return model, _sgd(model)


def _plain_train(model, opt, steps, clip: float = 0.0, acc: int = ACC, size: int = MICRO):
    norms = []
    params = [p for p in model.parameters() if p.requires_grad]
    for step in steps:
        for micro in range(acc):
            for rank in range(2):
                images, targets = _micro_batch(step, micro, rank, size)
                (_loss(model(images), targets) / (2 * acc)).backward()
        if clip:
            norms.append(float(torch.nn.utils.clip_grad_norm_(params, clip)))
        opt.step()
        opt.zero_grad()
    return norms


def _load_plain(model, opt, weights: dict, optim: dict) -> None:
    """Checkpoint (per-name format) into a plain model and torch optimizer."""
    model.load_state_dict(weights, strict=True)
    assert optim["keys"] == ["momentum_buffer"]
    for name, p in model.named_parameters():
        if p.requires_grad:
            opt.state[p]["momentum_buffer"] = optim["state"][name]["momentum_buffer"].clone()


@pytest.fixture(scope="module")
def runs():
    two = run_distributed(_two_rank_cases, 2, timeout_s=600)
    ref = {}
    model, opt = _plain()
    ref["init"] = {k: v.clone() for k, v in model.state_dict().items()}
    _plain_train(model, opt, range(2))
    ref["2"] = model.state_dict()
    model, opt = _plain()
    ref["clip_norms"] = _plain_train(model, opt, range(2), clip=CLIP)
    ref["clip"] = model.state_dict()
    model, opt = _plain(MBF)
    ref["mbf_init"] = {k: v.clone() for k, v in model.state_dict().items()}
    model.eval()
    _plain_train(model, opt, range(2), acc=1, size=MBF_MICRO)
    ref["mbf"] = model.state_dict()
    return two, ref


# ---------------------------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------------------------

def test_initial_weights_are_the_plain_build(runs):
    """Built on the meta device, sharded, then initialised one module at a time: bitwise the weights and
    buffers of torch.manual_seed(seed); build_backbone(name) on one process, for each backbone family."""
    two, ref = runs
    for name, got in [(NAME, two[0]["init"]), *two[0]["other_inits"].items()]:
        want = ref["init"] if name == NAME else _plain_init(name)
        assert list(got) == list(want), name
        assert [k for k in got if not torch.equal(got[k], want[k])] == [], name


@pytest.mark.parametrize("case", ["z3", "z2_ac", "hsdp"])
def test_two_ranks_equal_one_rank_with_accumulation(runs, case):
    """reshard_after_forward true (z3) and false with every block checkpointed (z2_ac), and HSDP on a 2 x 1
    mesh: 2 ranks x 2 accumulated micro-batches == 1 process accumulating all 4, after 2 SGD-momentum steps."""
    two, ref = runs
    keys = _param_names()
    err = _rel(two[0][case], ref["2"], keys)
    print(f"{case}: weights {err:.2e}, update {_update_rel(two[0][case], ref['2'], ref['init'], keys):.2e}")
    assert err <= TOL, f"{case}: backbone parameters differ by {err:.2e} relative"
    assert _rel(ref["2"], ref["init"], keys) > 50 * TOL  # training moved the weights far beyond the tolerance
    if case == "hsdp":
        assert two[0]["hsdp_mesh"] == two[1]["hsdp_mesh"] == (2, 1)


def test_checkpointing_updates_batchnorm_statistics_once(runs):
    """Each rank's running statistics with every block checkpointed equal those without (recomputation in
    backward leaves no trace), and the batch counter counts the 4 real forwards."""
    two, _ = runs
    for rank in range(2):
        plain, ac = two[rank]["z3_bn"], two[rank]["z2_ac_bn"]
        counters = [k for k in plain if k.endswith("num_batches_tracked")]
        assert counters and all(int(plain[k]) == int(ac[k]) == 2 * ACC for k in counters)
        stats = [k for k in plain if not k.endswith("num_batches_tracked")]
        assert _rel(ac, plain, stats) <= TOL


def test_clipping_uses_the_global_norm(runs):
    """Clipping at CLIP: the norm FSDP computes from its shards is the full gradient's (both ranks agree), it
    exceeded CLIP (so clipping acted), and the clipped weights equal the reference's."""
    two, ref = runs
    assert min(ref["clip_norms"]) > CLIP, ref["clip_norms"]
    for rank in range(2):
        for got, want in zip(two[rank]["clip_norms"], ref["clip_norms"]):
            assert math.isclose(got, want, rel_tol=TOL), (got, want)
    keys = _param_names()
    print(f"clip: weights {_rel(two[0]['clip'], ref['clip'], keys):.2e}, update "
          f"{_update_rel(two[0]['clip'], ref['clip'], ref['init'], keys):.2e}")
    assert _rel(two[0]["clip"], ref["clip"], keys) <= TOL
    assert _rel(ref["clip"], ref["2"], keys) > 50 * TOL  # clipping changed the result


def test_state_round_trip_fresh_fsdp_and_plain(runs):
    """full_state_dict / optimizer_state from 2-rank FSDP (rank 0 only when asked), loaded into a fresh FSDP
    run with the other reshard setting and into a plain model: identical state, and the next step of each
    equals the uninterrupted run's."""
    two, ref = runs
    r0 = two[0]
    assert r0["rank0_only"] and two[1]["rank0_only"]
    weights, optim = r0["z3"], r0["z3_optim"]
    assert optim["keys"] == ["momentum_buffer"] and optim["adam_step"] is None
    assert sorted(optim["state"]) == sorted(n for n in _param_names() if n != "features.weight")  # frozen
    loaded_w, loaded_o = r0["fresh_loaded"]
    assert all(torch.equal(loaded_w[k], weights[k]) for k in _param_names())
    assert all(torch.equal(loaded_o["state"][n]["momentum_buffer"], optim["state"][n]["momentum_buffer"])
               for n in optim["state"])
    keys = _param_names()
    assert _rel(r0["fresh_step3"], r0["z3_step3"], keys) <= TOL
    model, opt = _plain()
    _load_plain(model, opt, weights, optim)
    _plain_train(model, opt, [2])
    assert _rel(model.state_dict(), r0["z3_step3"], keys) <= TOL


def test_loss_scale_overflow_skips_the_step(runs):
    """A loss scale that overflows skips the step (weights untouched) and halves the scale; with a
    power-of-two scale the steps then equal the unscaled run exactly."""
    two, _ = runs
    mbf = two[0]["mbf"]
    skipped, scale, unchanged = mbf["overflow"]
    assert skipped == [False] and scale == 2.0 ** 199 and unchanged
    assert mbf["scaled"]["applied"] == [True, True]
    keys = _param_names(MBF)
    assert _rel(mbf["scaled"]["states"][-1], mbf["fp32"]["states"][-1], keys) == 0.0


def test_second_backbone_family_equals_plain(runs):
    """mbf (its blocks are the body's modules) under FSDP, fp32, equals plain torch after 2 steps."""
    two, ref = runs
    keys = _param_names(MBF)
    err = _rel(two[0]["mbf"]["fp32"]["states"][-1], ref["mbf"], keys)
    print(f"mbf fp32: weights {err:.2e}")
    assert err <= TOL
    assert _rel(ref["mbf"], ref["mbf_init"], keys) > 50 * TOL


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_low_precision_close_to_fp32(runs, precision):
    """bf16/fp16 compute with fp32 masters: computed in the low precision (embeddings' dtype), fp32 parameters
    and optimizer state, finite, and the update within LOWP_TOL of the fp32 run's (which equals plain torch's)."""
    two, ref = runs
    mbf = two[0]["mbf"]
    keys = _param_names(MBF)
    low = mbf[precision]
    assert all(low["applied"]) and low["dtype"] == {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    assert low["masters"] == {torch.float32}
    got = low["states"][-1]
    want = mbf["fp32"]["states"][len(low["states"]) - 1]  # after as many steps
    assert all(torch.isfinite(got[k]).all() for k in got)
    err = _update_rel(got, want, ref["mbf_init"], keys)
    print(f"{precision} update vs fp32: {err:.4f} relative")
    assert 1e-4 < err <= LOWP_TOL, err  # > 1e-4: the run really computed in low precision


def test_bf16_training_mode_step(runs):
    """A training-mode bf16 step (BatchNorm on batch statistics, its affine parameters cast to fp32): finite,
    applied, running statistics kept in fp32 and updated once."""
    two, ref = runs
    run = two[0]["mbf"]["bf16_train"]
    state = run["states"][-1]
    assert run["applied"] == [True] and run["dtype"] == torch.bfloat16 and run["masters"] == {torch.float32}
    assert all(torch.isfinite(v).all() for v in state.values())
    stats = [k for k in state if k.endswith(("running_mean", "running_var"))]
    assert stats and all(state[k].dtype == torch.float32 for k in stats)
    assert all(int(state[k]) == 1 for k in state if k.endswith("num_batches_tracked"))
    variances = [k for k in stats if k.endswith("running_var")]
    assert all(not torch.equal(state[k], torch.ones_like(state[k])) for k in variances)  # updated from 1


def test_adamw_state_round_trip(runs):
    """AdamW: both moments and the step count survive the per-name format (bias correction uses the step:
    the next step of the loaded run is bitwise the original's); an SGD run refuses AdamW state by name."""
    two, _ = runs
    optim, loaded, after, after_loaded = two[0]["adamw"]
    assert optim["keys"] == ["exp_avg", "exp_avg_sq"] and optim["adam_step"] == 1.0
    assert loaded["keys"] == optim["keys"] and loaded["adam_step"] == 1.0
    assert sorted(loaded["state"]) == sorted(optim["state"])
    assert all(torch.equal(loaded["state"][n][k], optim["state"][n][k]) for n in optim["state"] for k in optim["keys"])
    assert all(torch.equal(after[k], after_loaded[k]) for k in _param_names(MBF))
    for rank in range(2):
        assert "exp_avg" in two[rank]["wrong_kind"] and "momentum_buffer" in two[rank]["wrong_kind"]


def _plain_init(name: str) -> dict:
    import backbones

    torch.manual_seed(SEED)
    return backbones.build_backbone(name, embedding_size=EMB).state_dict()
