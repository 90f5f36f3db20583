"""engine.plan: the memory planner against hand-computed cases, real measurements and published numbers.
(The command and the predictions against launched runs: tests/launch/test_plan.py.)

References: parameter counts of a real (CPU) model; bytes saved for backward by a real CPU forward; the
formulas written out by hand for ZeRO stages and the Partial FC shard; arcface_torch's published IResNet
FLOPs and its V100 Partial FC memory table.
"""

import pytest
import torch

from engine.config import schema as config
from engine.perf import planner as plan
from heads.class_store import pinned_host_bytes
from tests.support.planning import fsdp_config


def _cfg(stage=1, precision="fp32", optim="sgd", momentum=0.9, micro=8, classes=1000, rate=1.0, emb=128,
         model="mbf", checkpoint=None):
    ds = {"train_micro_batch_size_per_gpu": micro, "zero_optimization": {"stage": stage}}
    if precision == "bf16-autocast":
        ds["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    elif precision == "fp16":
        ds["fp16"] = {"enabled": True}
    return config.from_dict({**ds, "engine": {
        "model": {"name": model, "embedding_size": emb, "checkpoint": checkpoint or {}},
        "head": {"num_classes": classes, "sample_rate": rate},
        "optim": {"name": optim, "momentum": momentum}}})


def _num_params(name, emb):
    import backbones

    return sum(p.numel() for p in backbones.build_backbone(name, embedding_size=emb).parameters())


def _trained_params(name, emb):
    """What gets gradients and optimizer state: IResNet's `features` BatchNorm weight is fixed, as in arcface_torch."""
    import backbones

    return sum(p.numel() for p in backbones.build_backbone(name, embedding_size=emb).parameters() if p.requires_grad)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_backbone_bytes_per_zero_stage_fp32_sgd(stage):
    """fp32 + SGD momentum on 4 ranks: each row equals the hand formula over the real parameter count."""
    P, n = _num_params("mbf", 128), 4
    p = plan.plan(_cfg(stage=stage), n)
    assert p.backbone.num_params == P
    assert p.row("backbone parameters").bytes == 4 * P / (n if stage == 3 else 1)
    assert p.row("backbone gradients").bytes == 4 * P / (n if stage >= 2 else 1)
    assert p.row("backbone optimizer state").bytes == 4 * P / (n if stage >= 1 else 1)
    if stage == 0:
        assert "ZeRO fp32 partition + grad" not in [r.name for r in p.rows]
    else:  # DeepSpeed keeps an fp32 partition and its gradient even for fp32 models
        assert p.row("ZeRO fp32 partition + grad").bytes == 8 * P / n


def test_backbone_bytes_adamw_fp16_and_autocast():
    P = _num_params("mbf", 128)
    adam = plan.plan(_cfg(stage=2, optim="adamw"), 8)
    assert adam.row("backbone optimizer state").bytes == 8 * P / 8  # two fp32 moments, partitioned
    no_mom = plan.plan(_cfg(stage=0, momentum=0.0), 8)
    assert no_mom.row("backbone optimizer state").bytes == 0
    fp16 = plan.plan(_cfg(stage=0, precision="fp16"), 8)
    assert fp16.row("backbone parameters").bytes == 2 * P
    assert fp16.row("fp32 master weights").bytes == 4 * P
    auto = plan.plan(_cfg(stage=1, precision="bf16-autocast"), 8)
    assert auto.row("backbone parameters").bytes == 4 * P  # fp32 parameters under autocast
    assert auto.row("autocast weight copies").bytes == 2 * P
    fp32 = plan.plan(_cfg(stage=1), 8)
    assert auto.row("activations").bytes == pytest.approx(fp32.row("activations").bytes / 2)


def test_head_bytes_by_hand():
    """1,000,001 classes on 4 ranks, E=128, rate 0.1, micro-batch 8: shard 250,001 rows, 25,000 sampled."""
    p = plan.plan(_cfg(classes=1_000_001, rate=0.1, micro=8), 4, device="cpu")
    rows, sampled, batch = 250_001, 25_000, 8 * 4
    assert p.num_sampled == sampled
    assert p.row("head weights").bytes == rows * 128 * 4
    assert p.row("head optimizer state").bytes == rows * 128 * 4  # SGD momentum, fp32
    # 32 x 25,000 logits: below the head's auto-chunking threshold (2**23), so one unchunked buffer
    assert p.row("head sampled rows").bytes == plan.HEAD_ROW_COPIES["unchunked"] * sampled * 128 * 4
    assert p.row("head logits").bytes == plan.HEAD_LOGIT_COPIES * batch * sampled * 4
    adam = plan.plan(_cfg(classes=1_000_001, rate=0.1, optim="adamw"), 4)
    assert adam.row("head optimizer state").bytes == 2 * rows * 128 * 4 + rows * 8  # m, v and a step per row
    # positives are always sampled: a tiny rate still keeps a whole global batch of rows
    tiny = plan.plan(_cfg(classes=1_000_000, rate=0.0001, micro=64), 2)
    assert tiny.num_sampled == 128


def test_head_auto_chunking_at_ten_million_classes():
    """32 x 500,000 logits exceed heads.softmax.AUTO_CHUNK_MIN_LOGITS: chunks of 2**20 / 32 = 32,768 columns."""
    p = plan.plan(_cfg(classes=10_000_000, rate=0.1, micro=16), 2, device="cpu")
    assert p.num_sampled == 500_000
    assert p.row("head logits").bytes == plan.HEAD_LOGIT_COPIES * 32 * 32_768 * 4
    assert p.row("head sampled rows").bytes == plan.HEAD_ROW_COPIES["chunked"] * 500_000 * 128 * 4


def test_head_storage_dtype_chunking_and_offload():
    """The issue's head options (read with defaults while HeadConfig may not have them yet)."""
    cfg = _cfg(classes=1_000_000, rate=0.1, micro=16)
    base = plan.plan(cfg, 2)
    cfg.engine.head.storage_dtype = "bf16"
    cfg.engine.head.chunk_size = 1000
    cfg.engine.head.offload = "cpu"
    p = plan.plan(cfg, 2)
    # pinned on the host: half the fp32 bytes, rounded up to a power of two (tests below)
    assert p.row("head weights").bytes == pinned_host_bytes(base.row("head weights").bytes // 2)
    assert p.row("head weights").where == "host" and p.row("head optimizer state").where == "host"
    assert p.row("head logits").bytes == plan.HEAD_LOGIT_COPIES * 32 * 1000 * 4
    assert p.total_bytes < base.total_bytes and p.host_bytes > 0
    assert plan.plan(cfg, 2, device="cpu").row("head weights").where == "device"  # on CPU the host is the device
    cfg.engine.head.storage_dtype = "fp8"
    with pytest.raises(ValueError, match=r"engine.head.storage_dtype: expected one of .*got 'fp8'"):
        plan.plan(cfg, 2)


def test_accumulation_holds_every_micro_batchs_sampled_row_gradients():
    """A sampled head with gradient accumulation keeps each micro-batch's row gradients (and, for 16-bit centres,
    the fetched rows) until the step: the 10M recipe at 8 x 2 on 2 CPU ranks measured 6.08 GiB (bf16 centres)
    and 7.00 GiB (fp32) where 16 x 1 measured 5.51 GiB; one micro-batch's working copies under-planned both
    (5.29 / 6.48). Same global batch, so only the sampled rows' row grows."""
    def rows(storage, micro, accum):
        cfg = config.load("ds_configs/10m_classes.json", [
            f"train_micro_batch_size_per_gpu={micro}", f"gradient_accumulation_steps={accum}",
            f"engine.head.storage_dtype={storage}", "engine.head.chunk_size=16384"])
        p = plan.plan(cfg, 2, device="cpu")
        return p.row("head sampled rows").bytes, p.total_bytes

    one_row = 500_000 * 128 * 4  # this rank's sampled rows at rate 0.1, fp32
    assert rows("bf16", 16, 1)[0] == plan.HEAD_ROW_COPIES["chunked"] * one_row
    bf16_rows, bf16_total = rows("bf16", 8, 2)
    fp32_rows, fp32_total = rows("fp32", 8, 2)
    assert bf16_rows == 6 * one_row  # 2 micro-batches x (gradient, fetched rows, their join)
    assert fp32_rows == 4 * one_row  # 2 micro-batches x (sparse gradient, its join)
    for planned, measured in ((bf16_total, 6.08), (fp32_total, 7.00)):
        assert abs(planned / 2 ** 30 / measured - 1) <= 0.05, (planned / 2 ** 30, measured)


def test_offloaded_head_counts_the_pinned_allocators_rounding(monkeypatch):
    """offload=cpu on a GPU: the head's weight and each optimizer-state table are pinned host tensors, which
    PyTorch's caching host allocator rounds up to a power of two: 29M classes x 128 x fp32 on one rank is 14.8 GB
    of weight (16 GiB pinned) and as much momentum. On the CPU nothing is pinned: exact bytes."""
    monkeypatch.delenv("PYTORCH_ALLOC_CONF", raising=False)
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    cfg = _cfg(classes=29_000_000, rate=0.1, micro=16)
    cfg.engine.head.offload = "cpu"
    raw = 29_000_000 * 128 * 4
    assert 14.8e9 < raw < 14.9e9
    p = plan.plan(cfg, 1)
    assert p.row("head weights").bytes == 16 * 2 ** 30
    assert p.row("head optimizer state").bytes == 16 * 2 ** 30  # SGD momentum: one fp32 table
    assert "13.83 GiB rounded up to 16.00 GiB" in p.row("head weights").note
    assert p.host_bytes >= 32 * 2 ** 30
    cpu = plan.plan(cfg, 1, device="cpu")
    assert cpu.row("head weights").bytes == raw and "rounded" not in cpu.row("head weights").note
    # AdamW: two pinned tables (each rounded) and its per-row step counts (not pinned, exact)
    cfg.engine.optim.name = "adamw"
    adam = plan.plan(cfg, 1)
    assert adam.row("head optimizer state").bytes == 2 * 16 * 2 ** 30 + 29_000_000 * 8
    # a torch whose allocator takes pinned_max_round_threshold_mb (2.13): exact above the threshold
    monkeypatch.setenv("PYTORCH_ALLOC_CONF", "pinned_max_round_threshold_mb:1024,pinned_max_cached_size_mb:1024")
    monkeypatch.setattr(torch, "__version__", "2.13.0")
    cfg.engine.optim.name = "sgd"
    assert plan.plan(cfg, 1).row("head weights").bytes == raw
    monkeypatch.setattr(torch, "__version__", "2.11.0+cu130")  # the lent GPU machines' torch: always rounds
    assert plan.plan(cfg, 1).row("head weights").bytes == 16 * 2 ** 30


def test_activations_equal_a_real_cpu_forward():
    """Meta-device count == bytes autograd saves in a real CPU training forward (batch 2, distinct storages)."""
    import backbones

    torch.manual_seed(0)
    model = backbones.build_backbone("mbf", embedding_size=128).train()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen, total = set(), 0

    def pack(t):
        nonlocal total
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params and ptr not in seen:
            seen.add(ptr)
            total += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(torch.randn(2, 3, 112, 112))
    prof = plan.profile_backbone("mbf", 128)
    assert prof.act_elems * 4 == pytest.approx(total / 2, rel=0.01)


def test_checkpointing_keeps_segment_inputs_and_one_segment():
    """r50 layer3 (14 blocks): one segment changes nothing at the peak (the whole stage is recomputed at once);
    14 segments keep 14 block inputs and recompute one block at a time."""
    full = plan.profile_backbone("r50", 512)
    one = plan.profile_backbone("r50", 512, {"layer3": 1})
    each = plan.profile_backbone("r50", 512, {"layer3": 14})
    assert one.ckpt_act_elems == full.act_elems
    # By hand (elements per image). layer3 block 0 (stride 2, downsample) saves its input 128x28x28 (bn1, and
    # the downsample conv: one storage), bn1's output, three 256x28x28 tensors (conv1 out, bn2 out, prelu out)
    # and two 256x14x14 (conv2 out, downsample conv out); blocks 1..13 save six 256x14x14 tensors each.
    # Each BatchNorm also saves 4 C-vectors (batch mean, inverse std, running mean and variance) per batch of
    # 2 images: 2C per image. Block 0 has bn1 (C=128), bn2, bn3 and the downsample BN (C=256); others three.
    a, b, c = 128 * 28 * 28, 256 * 28 * 28, 256 * 14 * 14
    block0 = 2 * a + 3 * b + 2 * c + 2 * (128 + 3 * 256)
    block = 6 * c + 2 * 3 * 256
    layer3 = block0 + 13 * block
    kept = a + 13 * c  # the 14 segment inputs
    peak_segment = max(block0 - a, block - c)  # the recomputed block, minus its input (already kept)
    expected = full.act_elems - layer3 + kept + peak_segment
    assert each.ckpt_act_elems == expected
    assert each.recompute_macs == one.recompute_macs > 0
    assert full.ckpt_act_elems == full.act_elems and full.recompute_macs == 0
    every = plan.profile_backbone("r50", 512, "all")
    assert every.ckpt_act_elems < each.ckpt_act_elems
    with pytest.raises(ValueError, match=r"unknown stage\(s\) \['layer9'\]"):
        plan.profile_backbone("r50", 512, {"layer9": 2})


@pytest.mark.parametrize("name,gmacs", [("r18", 2.6), ("r50", 6.3), ("r100", 12.1)])
def test_macs_match_arcface_torch_published_flops(name, gmacs):
    """arcface_torch's README lists r18 2.6, r50 6.3, r100 12.1 "GFLOPs" (multiply-accumulates, 112x112)."""
    assert plan.profile_backbone(name, 512).macs / 1e9 == pytest.approx(gmacs, rel=0.03)


# Output elements per image of r18's normalisation/activation layers in the stem and layer1, by hand: the stem's
# BatchNorm and PReLU at 64 x 112 x 112; layer1's first block BatchNorm, BatchNorm, PReLU at 64 x 112 x 112, then
# BatchNorm and the downsample's BatchNorm at 64 x 56 x 56; its second block four layers at 64 x 56 x 56.
R18_PREFIX_NORM_ACT = 2 * 64 * 112 * 112 + (3 * 64 * 112 * 112 + 2 * 64 * 56 * 56) + 4 * 64 * 56 * 56
# mbf's first block (arcface_torch's width scale 2): convolution to 128 x 56 x 56, BatchNorm, PReLU.
MBF_FIRST_NORM_ACT = 2 * 128 * 56 * 56


@pytest.mark.parametrize("name,freeze,unreached,skipped_norm_act", [
    ("r18", [], 0, 0),
    ("r18", ["conv1.*", "bn1.*", "prelu.*", "layer1.*"], 2, R18_PREFIX_NORM_ACT),  # a frozen prefix: no backward
    ("r18", ["layer2.*"], 0, 0),  # frozen in the middle: its input's gradient still flows, its weights' is skipped
    ("mbf", ["layers.0.*", "conv_sep.*"], 1, MBF_FIRST_NORM_ACT),  # depthwise; a frozen layer after trained ones
])
def test_training_macs_equal_what_autograd_runs(name, freeze, unreached, skipped_norm_act):
    """The time model's forward + backward MACs against torch's FlopCounterMode over a real forward and backward of
    the same model on the meta device (which layers autograd runs a backward for, and for which of input and
    weight); the first `unreached` blocks get no gradient, so checkpointing them recomputes nothing, and the
    normalisation/activation layers before them (`skipped_norm_act` output elements per image) run no backward."""
    from math import prod

    from torch.utils.flop_counter import FlopCounterMode

    def conv_backward(grad_out_shape, x_shape, w_shape, bias, stride, padding, dilation, transposed, output_padding,
                      groups, output_mask, **kwargs):
        # FlopCounterMode's own formula counts a grouped (depthwise) convolution's weight gradient as a dense one;
        # either gradient of a convolution costs its forward's multiplications: grad_out x weight's (c_in/groups, k, k)
        return 2 * prod(grad_out_shape) * prod(w_shape[1:]) * (int(output_mask[0]) + int(output_mask[1]))

    import backbones
    from engine.parallel.common import apply_finetune

    model = backbones.build_backbone(name, embedding_size=512, device="meta").train()
    if freeze:
        apply_finetune(model, freeze)
    with FlopCounterMode(display=False, custom_mapping={torch.ops.aten.convolution_backward: conv_backward}) as counter:
        model(torch.empty(2, 3, 112, 112, device="meta")).sum().backward()
    measure = plan.measure_backbone(name, 512, tuple(freeze))
    prof = plan.profile_from(measure, "all")
    assert 2 * prof.train_macs == pytest.approx(counter.get_total_flops() / 2, rel=1e-9)  # FLOPs = 2 x MACs
    blocks = [b for stage in measure.units.values() for b in stage]
    assert [b.grad for b in blocks] == [False] * unreached + [True] * (len(blocks) - unreached)
    assert prof.recompute_macs == pytest.approx(sum(b.macs for b in blocks[unreached:]))
    assert prof.norm_act_elems - prof.norm_act_backward_elems == skipped_norm_act
    assert prof.recompute_norm_act_elems == pytest.approx(sum(b.norm_act for b in blocks[unreached:]))
    if not freeze:
        assert prof.backward_ops == prof.num_ops


@pytest.mark.parametrize("num_classes,published_mib", [(8_000_000, 12310), (29_000_000, 32324)])
def test_arcface_torch_v100_partial_fc_table(num_classes, published_mib):
    """arcface_torch README, 8x V100-32GB, Partial FC 0.1 (gpustat MiB per GPU).

    Assumed setup (its speed benchmark): r50, embedding 512, batch 128 per GPU, fp16 autocast (fp32 weights),
    SGD momentum, data-parallel backbone (ZeRO-0), fp32 class centres with momentum, and one unchunked logits
    buffer as arcface_torch has (a chunk_size above the sampled count turns our auto-chunking off).
    """
    cfg = config.from_dict({"train_micro_batch_size_per_gpu": 128,
                            "torch_autocast": {"enabled": True, "dtype": "float16"},
                            "zero_optimization": {"stage": 0},
                            "engine": {"model": {"name": "r50", "embedding_size": 512},
                                       "head": {"num_classes": num_classes, "sample_rate": 0.1,
                                                "chunk_size": 10 ** 9}}})
    p = plan.plan(cfg, 8, mem_gb=32)
    assert p.total_bytes / 2 ** 20 == pytest.approx(published_mib, rel=0.25)


def test_headroom_is_the_boundary():
    """The largest class count / micro-batch that fit do fit, and one more does not."""
    cfg = _cfg(classes=1_000_000, rate=0.1, micro=16)
    p = plan.plan(cfg, 2, mem_gb=4, device="cpu")
    assert plan.plan(cfg, 2, mem_gb=4, device="cpu", num_classes=p.max_num_classes).fits
    assert not plan.plan(cfg, 2, mem_gb=4, device="cpu", num_classes=p.max_num_classes + 2).fits
    assert plan.plan(cfg, 2, mem_gb=4, device="cpu", micro_batch=p.max_micro_batch).fits
    assert not plan.plan(cfg, 2, mem_gb=4, device="cpu", micro_batch=p.max_micro_batch + 1).fits
    assert plan.plan(cfg, 2, mem_gb=0.5, device="cpu").max_num_classes is None  # the runtime alone is 0.7 GiB


def test_best_case_samples_per_sec():
    p = plan.plan(_cfg(classes=1000, rate=1.0), 4, peak_tflops=100.0)
    expected = 2 * p.backbone.train_macs + 6 * 4 * 250 * 128  # forward + backward (~3x forward) + head
    assert p.backbone.train_macs == pytest.approx(3 * p.backbone.macs, rel=0.01)
    assert p.train_flops_per_image == pytest.approx(expected)
    assert p.best_samples_per_sec == pytest.approx(100e12 / expected * 4)


def test_bad_arguments_name_the_value():
    cfg = _cfg()
    with pytest.raises(ValueError, match="world_size: expected an integer >= 1, got 0"):
        plan.plan(cfg, 0)
    with pytest.raises(ValueError, match=r"num_classes: expected an integer >= world size \(4\), got 2"):
        plan.plan(cfg, 4, num_classes=2)
    with pytest.raises(ValueError, match="device: expected 'gpu' or 'cpu', got 'tpu'"):
        plan.plan(cfg, 4, device="tpu")


# ---------------------------------------------------------------------------------------------------------------
# The 10M-class recipe, at 1M classes through the launcher: the planner's measured CPU reference
# ---------------------------------------------------------------------------------------------------------------

RECIPE_10M = "ds_configs/10m_classes.json"


def test_10m_recipe_loads():
    cfg = config.load(RECIPE_10M)
    h = cfg.engine.head
    assert (h.num_classes, h.sample_rate, cfg.engine.model.embedding_size) == (10_000_000, 0.1, 128)
    assert cfg.engine.train.max_steps >= 20
    # the demo identities (labels 0..63) are the positives; the other 9,999,936 classes are negatives only
    assert cfg.engine.data.source == "demo"


# ---------------------------------------------------------------------------------------------------------------
# FSDP2 (engine.train.backend: fsdp)
# ---------------------------------------------------------------------------------------------------------------

# r50 (embedding 512) by hand. Its largest block is any layer4 block after the first: bn1, conv1 3x3 512->512,
# bn2, prelu, conv2 3x3 512->512, bn3. Its root (outside every block): conv1 3x3 3->64, bn1, prelu, bn2 (512),
# fc 512*7*7 -> 512 with bias, features BatchNorm1d(512).
R50_UNIT = 2 * 512 + 512 * 512 * 9 + 2 * 512 + 512 + 512 * 512 * 9 + 2 * 512
R50_ROOT = 3 * 64 * 9 + 2 * 64 + 64 + 2 * 512 + (512 * 7 * 7 * 512 + 512) + 2 * 512


def test_fsdp_units_by_hand():
    prof = plan.profile_backbone("r50", 512)
    assert (prof.largest_unit_params, prof.root_params) == (R50_UNIT, R50_ROOT)
    # r2060's blocks are r50's blocks (the largest is again a layer4 block), its root the same stem and fc
    big = plan.profile_backbone("r2060", 512)
    assert (big.largest_unit_params, big.root_params, big.largest_segment_params) == (R50_UNIT, R50_ROOT, 0)
    # checkpointed as its recipe (layer3: 896 blocks in 100 segments, the longest of 9 blocks of 256 channels):
    # FSDP2 does not reshard after a recomputing forward, so a whole segment is gathered during its backward
    layer3_block = 2 * 256 + 256 * 256 * 9 + 2 * 256 + 256 + 256 * 256 * 9 + 2 * 256
    ckpt = plan.profile_backbone("r2060", 512, {"layer2": 20, "layer3": 100})
    assert ckpt.largest_segment_params == 9 * layer3_block
    p = plan.plan(config.load("ds_configs/r2060_fsdp.json"), 2)
    assert p.row("gathered parameters").bytes == (R50_ROOT + 9 * layer3_block + R50_UNIT) * 2  # bf16 recipe


@pytest.mark.parametrize("reshard", [True, False])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_fsdp_bytes_per_setting(reshard, precision):
    """4 ranks, SGD momentum: every backbone row equals the hand formula; no second fp32 copy of anything."""
    P, T, n, c = _num_params("r50", 512), _trained_params("r50", 512), 4, {"fp32": 4, "bf16": 2}[precision]
    assert T == P - 512  # the fixed `features` weight
    p = plan.plan(fsdp_config(reshard=reshard, precision=precision), n, device="cpu")
    assert p.row("backbone parameters").bytes == 4 * P / n  # the optimizer's masters, in fp32
    assert p.row("backbone gradients").bytes == 4 * T / n  # reduced and kept in fp32
    assert p.row("backbone optimizer state").bytes == 4 * T / n
    gathered = (R50_ROOT + 2 * R50_UNIT) if reshard else P  # root + running + prefetched block, or everything
    assert p.row("gathered parameters").bytes == gathered * c
    assert p.row("unsharded gradients").bytes == R50_UNIT * (c + 4 + 4 / n)
    names = [r.name for r in p.rows]
    for ds_only in ("ZeRO fp32 partition + grad", "fp32 master weights",
                    "autocast weight copies", "optimizer step temporaries"):  # temporaries: GPU only
        assert ds_only not in names
    fp32 = plan.plan(fsdp_config(reshard=reshard), n, device="cpu")
    act = p.row("activations").bytes
    assert act == fp32.row("activations").bytes * c / 4  # computed in the param dtype
    # on a CPU the gradient shards (fresh mmaps) do not reuse the activations the backward frees: the rows add up
    assert "backward frees" not in names
    # on a GPU they reuse what is freed by the time they arrive (engine.perf.planner._backward_overlap, checked by
    # hand below): at most the smaller side, as the larger-side bound says
    freed = act + (0 if reshard else (P - R50_ROOT - R50_UNIT) * c)
    assert plan.describe_backend(fsdp_config(reshard=reshard)) == (
        "FSDP2 (reshard_after_forward)" if reshard else "FSDP2 (no reshard after forward)")
    # on a GPU torch's optimizers step DTensor shards with foreach kernels: SGD's weight decay makes a new list
    # of gradients (one shard's worth); without weight decay and with SGD there is none
    gpu = plan.plan(fsdp_config(reshard=reshard, precision=precision), n, device="gpu")
    assert gpu.row("optimizer step temporaries").bytes == 4 * T / n
    assert -min(8 * T / n, freed) <= gpu.row("backward frees").bytes < 0
    cfg = fsdp_config(reshard=reshard, precision=precision)
    cfg.engine.optim.weight_decay = 0.0
    assert "optimizer step temporaries" not in [r.name for r in plan.plan(cfg, n, device="gpu").rows]


def test_fsdp_backward_timeline_by_hand():
    """Two blocks and a root of 1 parameter each (3 in all), 6 B of gradient shards (2 B per parameter):
    activations 8 B held by block 0 (early, freed last), 2 B by block 1, 1 B outside the blocks; no gathered
    units, 3 B of step temporaries. Backward: root's gradient first (2), then block 1 (frees 2, adds 2), then
    block 0 (frees 8, adds 2). Moments: 1+8+2+2 = 13, 1+8+2+2 = 13, 1+0+6 = 7, after: 6+3 = 9. Static sum
    11 + 6 + 3 = 20: 7 reused."""
    prof = plan.BackboneProfile(name="toy", embedding_size=1, num_params=3, act_elems=11, ckpt_act_elems=11,
                                largest_elems=8, macs=0, recompute_macs=0, root_params=1, held=((8.0, 1), (2.0, 1)))
    assert plan._backward_overlap(prof, act=1.0, activations=11.0, gathered_freed=0.0, grads=6.0, temps=3.0) == 7.0
    # parameters early instead: block 0 holds the activations and the parameters arrive last -> nothing to reuse
    late = plan.BackboneProfile(name="toy", embedding_size=1, num_params=3, act_elems=11, ckpt_act_elems=11,
                                largest_elems=8, macs=0, recompute_macs=0, root_params=0, held=((8.0, 3), (2.0, 0)))
    # moments: 1+10+0, 1+8+0, 1+0+6 (block 0 done), after 6+3: peak 11, static 20 -> 9 reused
    assert plan._backward_overlap(late, act=1.0, activations=11.0, gathered_freed=0.0, grads=6.0, temps=3.0) == 9.0


def test_fsdp_keeps_less_than_zero3_by_the_fp32_partition():
    """Same model, optimizer and world: FSDP2 (reshard) holds DeepSpeed ZeRO-3's fp32 partition + gradient (8 B
    per parameter / n) less, and no DeepSpeed buckets; the rows they share are equal."""
    P, n = _trained_params("r50", 512), 2
    fsdp = plan.plan(fsdp_config(), n, device="cpu")
    zero3 = plan.plan(config.from_dict({"train_micro_batch_size_per_gpu": 8, "zero_optimization": {"stage": 3},
                                        "engine": {"model": {"name": "r50", "embedding_size": 512},
                                                   "head": {"num_classes": 1000}}}), n, device="cpu")
    assert zero3.row("ZeRO fp32 partition + grad").bytes == 8 * P / n
    assert fsdp.row("backbone parameters").bytes == zero3.row("backbone parameters").bytes
    assert fsdp.row("backbone gradients").bytes == zero3.row("backbone gradients").bytes
    for shared in ("activations", "head weights", "head logits", "runtime"):
        assert fsdp.row(shared).bytes == zero3.row(shared).bytes, shared
    assert fsdp.total_bytes < zero3.total_bytes - 8 * P / n


def test_fsdp_hybrid_offload_and_accumulation(monkeypatch):
    P, T = _num_params("r50", 512), _trained_params("r50", 512)
    for key in plan.LOCAL_WORLD_ENV:
        monkeypatch.delenv(key, raising=False)
    # hybrid without --ranks-per-node: the launcher's processes per node, as the backend reads them
    assert plan.plan(fsdp_config(hybrid=True), 8).row("backbone parameters").bytes == 4 * P / 8  # one node
    monkeypatch.setenv("LOCAL_SIZE", "2")
    assert plan.plan(fsdp_config(hybrid=True), 8).row("backbone parameters").bytes == 4 * P / 2
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")  # torchrun's name first; 1 per node: every rank a replica
    assert plan.plan(fsdp_config(hybrid=True), 8).row("backbone parameters").bytes == 4 * P
    # hybrid on 8 ranks of 2 nodes: shards over the 4 ranks of a node, replicated across the 2 nodes
    hsdp = plan.plan(fsdp_config(hybrid=True, optim="adamw"), 8, ranks_per_node=4)
    assert hsdp.row("backbone parameters").bytes == 4 * P / 4
    assert hsdp.row("backbone optimizer state").bytes == 2 * 4 * T / 4
    assert plan.plan(fsdp_config(hybrid=False), 8).row("backbone parameters").bytes == 4 * P / 8
    with pytest.raises(ValueError, match="ranks_per_node: expected a divisor of the world size 8 .*got 3"):
        plan.plan(fsdp_config(hybrid=True), 8, ranks_per_node=3)
    # CPU offload on a GPU: shards, gradients and optimizer state on the host; the gathered units stay
    off = plan.plan(fsdp_config(offload=True), 4, device="gpu")
    host = ("backbone parameters", "backbone gradients", "backbone optimizer state")
    assert all(off.row(name).where == "host" for name in host)
    assert off.host_bytes == 4 * P / 4 + 2 * 4 * T / 4
    assert off.row("gathered parameters").where == "device"
    assert "optimizer step temporaries" not in [r.name for r in off.rows]  # the optimizer steps on the host
    assert "backward frees" not in [r.name for r in off.rows]  # gradient shards arrive on the host
    on = plan.plan(fsdp_config(), 4, device="gpu")
    moved = off.host_bytes + on.row("optimizer step temporaries").bytes + on.row("backward frees").bytes
    assert on.total_bytes - off.total_bytes == pytest.approx(moved * (1 + plan.CUDA_ALLOCATOR_SLACK))
    assert all(r.where == "device" for r in plan.plan(fsdp_config(offload=True), 4, device="cpu").rows
               if r.name in host)  # on a CPU the host is the device
    # accumulation: no-sync micro-batches keep every unit's unsharded gradient, in fp32 (also under bf16)
    acc = plan.plan(fsdp_config(accum=2, precision="bf16"), 4)
    assert acc.row("unsharded gradients (no-sync)").bytes == 4 * T + R50_UNIT * (2 + 4 + 4 / 4)
