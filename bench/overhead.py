"""Engine overhead: ArcScale's Trainer against a bare PyTorch loop with the same model, head and data, in one run.

    python bench/overhead.py [--world-size 1|2] [--backbone r50] [--precision fp32|bf16] [--micro-batch 4]
                             [--steps 1] [--warmup-steps 2] [--rounds 12] [--num-classes N] [--set KEY=VALUE ...]
    python bench/overhead.py --r2060 [--r2060-micro-batch 2]    # r2060 ZeRO-3 smoke run through the launcher
    python bench/overhead.py --matmul                           # fp32 vs bf16 matmul GFLOP/s on this machine

Engine side: exactly what run.py does -- ``engine.config.load(recipe, overrides)``, ``engine.runtime.dist.init()``,
``build_trainer(cfg)``, ``trainer.train()``, ``trainer.close()`` -- with synthetic "noise" data. The only addition is
one extra hook (run after the trainer's own logger and summary hooks) that takes the times.

Bare side, built in the same processes from the same resolved config: ``backbones.build_backbone`` on the
device, wrapped in ``torch.nn.parallel.DistributedDataParallel`` when there is more than one rank (with
arcface_torch's settings: ``broadcast_buffers=False, bucket_cap_mb=16``; arcface_torch also passes
``find_unused_parameters=True``, which costs it a graph walk per step: left out, the stricter baseline), the same
precision (``torch.autocast`` around the backbone when bf16), plain ``loss.backward()``, the same gradient
clipping as the recipe (``clip_grad_norm_`` on the backbone, as arcface_torch does) and the same per-step LR.
Its memory layout (``--bare-layout``): NCHW by default, as arcface_torch's loop (contiguous images and weights),
while the engine runs the recipe's ``engine.model.channels_last`` (NHWC in the CNN recipes: the convolutions'
own layout on oneDNN and on cuDNN's tensor cores); ``--bare-layout engine`` gives the bare loop the engine's
layout, which leaves only the step's other costs to compare. Its head (``--bare-head``): at sample rate 1.0 on
>= 2 ranks (the default, ``auto``) arcface_torch's own (PartialFC_V2 at rate 1.0: centres sharded over the
ranks, embeddings all-gathered with its AllGatherFunc, its DistCrossEntropyFunc, a dense gradient) stepped by
the same ``torch.optim.SGD``/``AdamW`` as the backbone (one optimizer, two parameter groups, as arcface_torch);
otherwise ``heads.PartialFC`` with ``heads.build_head_optimizer``, as the engine. Same synthetic data source (its
own seed, so its stream is independent of the engine's), same micro-batch, same thread count. Weights are
initialised separately; speed does not depend on their values.

The two are timed alternately: after ``--warmup-steps`` of each (not timed), ``--rounds`` pairs of segments of
``--steps`` optimizer steps each (default: 12 pairs of single steps), ordered E B | B E | E B | ... (ABBA), so
a drift of the machine hits both sides alike. Each segment is bracketed by barriers; samples/s is global (all
ranks). The figure of merit is the ratio engine / bare per pair: its median (robust to a load spike on a
shared machine) with the inter-quartile range, mean, min..max and the pooled ratio (total bare time / total
engine time) are printed. Target: >= 1.0 (the engine at least as fast as the plain loop). A second view, less
disturbed by other processes on a shared machine, is the CPU time all ranks spent for the same samples
(bare / engine; with one thread per rank it counts work, not waiting). Both sides run in the same processes, so neither gets a quieter machine.

Ranks are spawned here (``--world-size``, gloo on CPU, nccl on GPU through ``engine.runtime.dist.init``); each gets
``cpu_count // world_size`` threads, as ``engine.runtime.dist.init`` gives ranks launched by ``deepspeed``.

Note for CPUs without AVX512-BF16/AMX: bf16 matrix work is far slower than fp32 there (``--matmul`` shows by
how much); benchmark in fp32 on such machines and leave bf16 to GPUs.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Dict, List

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


# ---------------------------------------------------------------------------------------------------------------
# Configuration shared by both sides
# ---------------------------------------------------------------------------------------------------------------

def recipe_for(backbone: str) -> Path:
    """The recipe of that backbone when there is one (ds_configs/<name>.json), else the r50 recipe."""
    path = ROOT / "ds_configs" / f"{backbone}.json"
    return path if path.is_file() else ROOT / "ds_configs" / "r50.json"


def overrides_for(args: argparse.Namespace, output_dir: str) -> List[str]:
    total_steps = args.warmup_steps + args.rounds * args.steps
    out = [
        f"engine.model.name={args.backbone}",
        f"train_micro_batch_size_per_gpu={args.micro_batch}",
        "gradient_accumulation_steps=1",
        "engine.data.source=synthetic",
        "engine.data.synthetic=noise",
        f"engine.train.max_steps={total_steps}",
        f"engine.train.output_dir={output_dir}",
        "engine.optim.warmup_steps=0",
        f"torch_autocast.enabled={'true' if args.precision == 'bf16' else 'false'}",
        "torch_autocast.dtype=bfloat16",
        # the recipes' checkpoints and evaluation (its dataset's .bin files) are not what is measured
        "engine.checkpoint.every=0", "engine.checkpoint.every_minutes=0", "engine.eval.targets=[]",
    ]
    if args.num_classes is not None:
        out.append(f"engine.head.num_classes={args.num_classes}")
    return out + list(args.overrides)


def _sync(device) -> None:
    import torch

    from engine.runtime import dist

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    dist.barrier()


# ---------------------------------------------------------------------------------------------------------------
# The bare PyTorch loop
# ---------------------------------------------------------------------------------------------------------------

def _dense_head_classes():
    """arcface_torch's PartialFC_V2 at sample rate 1.0 (partial_fc_v2.py), as plain torch: the class centres
    sharded over the ranks, the embeddings all-gathered with its AllGatherFunc, cosine logits against every
    local centre, the margin, and its DistCrossEntropyFunc (max and sum all-reduced, gradient softmax - one-hot
    over the global batch). The centres are a dense nn.Parameter with a dense gradient, stepped by the same
    torch.optim.SGD as the backbone (arcface_torch's one optimizer with two parameter groups). The margin is
    heads.CombinedMarginLoss (arcface_torch's, with acos/cos on the target entries only)."""
    import torch
    import torch.distributed as tdist

    class AllGather(torch.autograd.Function):
        @staticmethod
        def forward(ctx, tensor, *gather_list):
            tdist.all_gather(list(gather_list), tensor)
            return tuple(gather_list)

        @staticmethod
        def backward(ctx, *grads):
            grads = list(grads)
            rank = tdist.get_rank()
            ops = [tdist.reduce(g, i, tdist.ReduceOp.SUM, async_op=True) for i, g in enumerate(grads)]
            for op in ops:
                op.wait()
            grads[rank] *= len(grads)  # as arcface_torch: the loss is a mean over the global batch
            return (grads[rank], *[None] * len(grads))

    class DistCrossEntropy(torch.autograd.Function):
        @staticmethod
        def forward(ctx, logits, label):
            batch = logits.size(0)
            max_logits, _ = torch.max(logits, dim=1, keepdim=True)
            tdist.all_reduce(max_logits, tdist.ReduceOp.MAX)
            logits.sub_(max_logits)
            logits.exp_()
            sum_exp = torch.sum(logits, dim=1, keepdim=True)
            tdist.all_reduce(sum_exp, tdist.ReduceOp.SUM)
            logits.div_(sum_exp)
            index = torch.where(label != -1)[0]
            loss = torch.zeros(batch, 1, device=logits.device)
            loss[index] = logits[index].gather(1, label[index])
            tdist.all_reduce(loss, tdist.ReduceOp.SUM)
            ctx.save_for_backward(index, logits, label)
            return loss.clamp_min_(1e-30).log_().mean() * (-1)

        @staticmethod
        def backward(ctx, loss_gradient):
            index, logits, label = ctx.saved_tensors
            one_hot = torch.zeros((index.size(0), logits.size(1)), device=logits.device)
            one_hot.scatter_(1, label[index], 1)
            logits[index] -= one_hot
            logits.div_(logits.size(0))
            return logits * loss_gradient.item(), None

    class DenseSoftmaxHead(torch.nn.Module):
        def __init__(self, margin, embedding_size: int, num_classes: int, device):
            super().__init__()
            rank, world = tdist.get_rank(), tdist.get_world_size()
            self.num_local = num_classes // world + int(rank < num_classes % world)
            self.class_start = num_classes // world * rank + min(rank, num_classes % world)
            self.weight = torch.nn.Parameter(torch.normal(0, 0.01, (self.num_local, embedding_size), device=device))
            self.margin = margin
            self.embedding_size = embedding_size

        def forward(self, local_embeddings, local_labels):
            local_labels = local_labels.long().view(-1)
            world, batch = tdist.get_world_size(), local_embeddings.size(0)
            gathered = [torch.zeros((batch, self.embedding_size), device=local_embeddings.device)
                        for _ in range(world)]
            labels_list = [torch.zeros(batch, dtype=torch.long, device=local_labels.device) for _ in range(world)]
            embeddings = torch.cat(AllGather.apply(local_embeddings, *gathered))
            tdist.all_gather(labels_list, local_labels)
            labels = torch.cat(labels_list).view(-1, 1)
            positive = (self.class_start <= labels) & (labels < self.class_start + self.num_local)
            labels[~positive] = -1
            labels[positive] -= self.class_start
            logits = torch.nn.functional.linear(torch.nn.functional.normalize(embeddings),
                                                torch.nn.functional.normalize(self.weight)).clamp(-1, 1)
            logits = self.margin(logits, labels.view(-1))
            return DistCrossEntropy.apply(logits, labels)

    return DenseSoftmaxHead


class BareLoop:
    """The same training step written as a plain PyTorch script would write it (no DeepSpeed)."""

    def __init__(self, cfg, device, rank: int, world_size: int, bare_head: str = "auto",
                 bare_layout: str = "nchw"):
        import torch

        import backbones
        import heads
        from dali_pipes.synthetic import SlotIterator, SyntheticSource

        e = cfg.engine
        if e.model.checkpoint:
            raise ValueError("bench/overhead.py: the bare loop has no activation checkpointing; "
                             "pass --set engine.model.checkpoint={} to compare without it")
        if cfg.precision == "fp16":
            raise ValueError("bench/overhead.py: precision fp16 is not benchmarked; use fp32 or bf16")
        self.cfg, self.device, self.world_size = cfg, device, world_size
        self.autocast = cfg.precision == "bf16"
        self.clip = float(cfg.deepspeed.get("gradient_clipping", 0.0) or 0.0)
        torch.manual_seed(e.train.seed + 1)
        model = backbones.build_backbone(e.model.name, embedding_size=e.model.embedding_size,
                                         dropout=e.model.dropout).to(device)
        # nchw: as arcface_torch's loop (contiguous weights and images); engine: the engine's layout
        self.channels_last = bare_layout == "engine" and e.model.channels_last
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.params = [p for p in model.parameters() if p.requires_grad]
        if world_size > 1:
            model = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None,
                broadcast_buffers=False, bucket_cap_mb=16)
        self.model = model
        o = e.optim
        h = e.head
        margin = heads.CombinedMarginLoss(h.scale, *h.margin,
                                          interclass_filtering_threshold=h.interclass_filtering_threshold,
                                          margin_grad=h.margin_grad)
        if bare_head == "auto":
            bare_head = "dense" if h.sample_rate == 1.0 and world_size > 1 else "partial_fc"
        self.bare_head = bare_head
        dense = bare_head == "dense"
        if dense:
            if h.sample_rate < 1.0 or world_size < 2:
                raise ValueError("bench/overhead.py --bare-head dense: arcface_torch's sample-rate-1.0 head on >= 2 "
                                 "ranks; use --bare-head partial_fc for a sampled head or one rank")
            self.head = _dense_head_classes()(margin, e.model.embedding_size, h.num_classes, device)
        else:
            self.head = heads.PartialFC(margin, e.model.embedding_size, h.num_classes, h.sample_rate,
                                        device=device, seed=e.train.seed + 1)
        # dense: one optimizer for backbone and centres, as arcface_torch (two parameter groups)
        groups = [{"params": self.params}] + ([{"params": [self.head.weight], "lr": o.lr * h.lr_scale}]
                                              if dense else [])
        if o.name == "sgd":
            self.optimizer = torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
        else:
            self.optimizer = torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                                               weight_decay=o.weight_decay)
        self.head_optimizer = None if dense else heads.build_head_optimizer(
            o.name, [self.head.weight], lr=o.lr * h.lr_scale, momentum=o.momentum, weight_decay=o.weight_decay,
            betas=tuple(o.betas), eps=o.eps)
        # Same source, other seed: same cost, independent of the engine's stream.
        source = SyntheticSource(cfg.micro_batch_size, h.num_classes, device, seed=e.train.seed + 1,
                                 mode=e.data.synthetic)
        self.data = SlotIterator(source, rank, world_size, 1)
        self.model.train()
        self.head.train()
        self.step_count = 0
        self.last_loss = None

    def step(self, max_steps: int) -> None:
        import torch

        from engine.train.trainer import lr_factor

        o = self.cfg.engine.optim
        lr = o.lr * lr_factor(self.step_count % max_steps, max_steps=max_steps, warmup_steps=0,
                              schedule=o.schedule, power=o.poly_power, milestones=o.step_milestones,
                              gamma=o.step_gamma)
        self.optimizer.param_groups[0]["lr"] = lr
        for g in (self.head_optimizer.param_groups if self.head_optimizer else self.optimizer.param_groups[1:]):
            g["lr"] = lr * self.cfg.engine.head.lr_scale
        images, labels = next(self.data)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            embeddings = self.model(images)
        loss = self.head(embeddings.float(), labels)
        loss.backward()
        if self.clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.head_optimizer is not None:
            self.head_optimizer.step()
            self.head_optimizer.zero_grad(set_to_none=True)
        self.step_count += 1
        self.last_loss = loss.detach()


# ---------------------------------------------------------------------------------------------------------------
# The timing hook: runs inside trainer.train(), after the trainer's own hooks
# ---------------------------------------------------------------------------------------------------------------

def _all_reduce_sum(value: float, device) -> float:
    import torch
    import torch.distributed as tdist

    from engine.runtime import dist

    if not dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    tdist.all_reduce(t)
    return float(t.item())


def _make_timer_hook(bare: BareLoop, args: argparse.Namespace):
    from engine.train.hooks import Hook

    class AlternatingTimer(Hook):
        """Times engine segments between its calls and runs (and times) the bare segments in between."""

        def __init__(self):
            self.plan: List[str] = []
            for r in range(args.rounds):
                self.plan += ["E", "B"] if r % 2 == 0 else ["B", "E"]
            self.segments: List[Dict[str, Any]] = []
            self._t0 = 0.0
            self._in_segment = 0

        def _now(self, trainer) -> float:
            _sync(trainer.device)
            self._cpu_mark = time.process_time()
            return time.perf_counter()

        def _record(self, side: str, seconds: float, trainer, cpu_start: float) -> None:
            # CPU seconds of all ranks together: a second view that a busy, shared machine disturbs less
            cpu = _all_reduce_sum(time.process_time() - cpu_start, trainer.device)
            sps = args.steps * trainer.global_batch_size / seconds
            self.segments.append({"side": side, "seconds": seconds, "samples_per_sec": sps, "cpu_seconds": cpu,
                                  "loadavg_1m": os.getloadavg()[0]})

        def _run_bare_segments(self, trainer) -> None:
            while self.plan and self.plan[0] == "B":
                t0 = self._now(trainer)
                cpu0 = self._cpu_mark
                for _ in range(args.steps):
                    bare.step(trainer.max_steps)
                bare.last_loss.item()  # the engine's logger reads its loss too
                self._record("bare", self._now(trainer) - t0, trainer, cpu0)
                self.plan.pop(0)

        def on_step_end(self, trainer, step: int, loss) -> None:
            if step < args.warmup_steps:
                return
            if step == args.warmup_steps:
                for _ in range(args.warmup_steps):  # bare warm-up, not timed
                    bare.step(trainer.max_steps)
                self._run_bare_segments(trainer)  # none: the plan starts with the engine
                self._t0 = self._now(trainer)
                self._cpu0 = self._cpu_mark
                return
            self._in_segment += 1
            if self._in_segment < args.steps:
                return
            assert self.plan and self.plan[0] == "E", self.plan
            self._record("engine", self._now(trainer) - self._t0, trainer, self._cpu0)
            self.plan.pop(0)
            self._in_segment = 0
            self._run_bare_segments(trainer)
            self._t0 = self._now(trainer)
            self._cpu0 = self._cpu_mark

    return AlternatingTimer()


# ---------------------------------------------------------------------------------------------------------------
# One rank
# ---------------------------------------------------------------------------------------------------------------

def rank_main(args: argparse.Namespace, output_dir: str, result_path: str) -> None:
    """Body of each rank: run.py's sequence with the timing hook and a bare loop alongside."""
    import torch

    from engine.config import schema as config
    from engine.runtime import dist

    cfg = config.load(recipe_for(args.backbone), overrides_for(args, output_dir))
    device = dist.init(timeout_s=cfg.engine.train.dist_timeout_s)
    if args.deepspeed_allreduce:  # the engine as before engine.parallel.reducer: DeepSpeed's own ZeRO-0 all-reduce
        from engine.parallel import deepspeed_backend

        deepspeed_backend.USE_GRAD_REDUCER = False
    from engine.train.build import build_trainer

    rank, world_size = dist.get_rank(), dist.get_world_size()
    t_begin = time.perf_counter()

    def progress(what: str) -> None:
        if rank == 0:
            print(f"[overhead] {what} (+{time.perf_counter() - t_begin:.1f} s)", file=sys.stderr, flush=True)

    progress(f"process group up, world {world_size}, {torch.get_num_threads()} thread(s) per rank")
    bare = BareLoop(cfg, device, rank, world_size, args.bare_head, args.bare_layout)
    progress("bare loop built")
    timer = _make_timer_hook(bare, args)
    t_start = time.perf_counter()
    trainer = build_trainer(cfg, hooks=[timer])
    progress("trainer built; training")
    try:
        trainer.train()
    finally:
        trainer.close()
    progress("done")
    if rank == 0:
        result = {
            "segments": timer.segments,
            "world_size": world_size,
            "threads_per_rank": torch.get_num_threads(),
            "global_batch_size": trainer.global_batch_size,
            "precision": cfg.precision,
            "zero_stage": cfg.zero_stage,
            "backbone": cfg.engine.model.name,
            "num_classes": cfg.engine.head.num_classes,
            "gradient_clipping": cfg.deepspeed.get("gradient_clipping"),
            "recipe": str(recipe_for(args.backbone).relative_to(ROOT)), "bare_head": bare.bare_head,
            "engine_layout": "nhwc" if cfg.engine.model.channels_last else "nchw",
            "bare_layout": "nhwc" if bare.channels_last else "nchw",
            "grad_reducer": getattr(trainer.backbone, "reducer", None) is not None,
            "device": str(device),
            "train_seconds": time.perf_counter() - t_start,
        }
        Path(result_path).write_text(json.dumps(result))
    dist.destroy()


def _rank_entry(rank: int, world_size: int, port: int, args: argparse.Namespace, output_dir: str,
                result_path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_SIZE=str(world_size),
                      LOCAL_WORLD_SIZE=str(world_size))
    try:
        rank_main(args, output_dir, result_path)
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)


def spawn_ranks(args: argparse.Namespace) -> Dict[str, Any]:
    from engine.runtime.dist import find_free_port

    ctx = mp.get_context("spawn")
    port = find_free_port()
    with tempfile.TemporaryDirectory(prefix="arcscale_overhead_") as tmp:
        result_path = str(Path(tmp) / "result.json")
        procs = [ctx.Process(target=_rank_entry, args=(r, args.world_size, port, args, str(Path(tmp) / "run"),
                                                       result_path))
                 for r in range(args.world_size)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + args.timeout
        try:
            while any(p.is_alive() for p in procs):
                failed = [(r, p.exitcode) for r, p in enumerate(procs) if p.exitcode not in (None, 0)]
                if failed:
                    raise RuntimeError(f"rank(s) failed (rank, exit code): {failed}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"benchmark did not finish within {args.timeout:.0f} s")
                time.sleep(0.5)
            failed = [(r, p.exitcode) for r, p in enumerate(procs) if p.exitcode != 0]
            if failed:
                raise RuntimeError(f"rank(s) failed (rank, exit code): {failed}")
        finally:
            for p in procs:
                if p.is_alive():
                    p.terminate()
                p.join(timeout=10)
        return json.loads(Path(result_path).read_text())


# ---------------------------------------------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------------------------------------------

def _spread(values: List[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} (min {min(values):.3f}, max {max(values):.3f}, std {std:.3f})"


def _quartiles(values: List[float]) -> List[float]:
    if len(values) < 2:
        return [values[0], values[0]]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return [q[0], q[2]]


def summarise(result: Dict[str, Any], args: argparse.Namespace) -> Dict[str, Any]:
    segs = result["segments"]
    engine = [s for s in segs if s["side"] == "engine"]
    bare = [s for s in segs if s["side"] == "bare"]
    assert len(engine) == len(bare) == args.rounds, (len(engine), len(bare))
    ratios = [e["samples_per_sec"] / b["samples_per_sec"] for e, b in zip(engine, bare)]
    pooled = sum(b["seconds"] for b in bare) / sum(e["seconds"] for e in engine)
    cpu_ratios = [b["cpu_seconds"] / e["cpu_seconds"] for e, b in zip(engine, bare)]
    loads = [x["loadavg_1m"] for x in segs]
    return {
        "bench": "overhead",
        "backbone": result["backbone"], "precision": result["precision"], "zero_stage": result["zero_stage"],
        "bare_head": result["bare_head"], "grad_reducer": result["grad_reducer"],
        "engine_layout": result["engine_layout"], "bare_layout": result["bare_layout"],
        "world_size": result["world_size"], "threads_per_rank": result["threads_per_rank"],
        "micro_batch": args.micro_batch, "global_batch_size": result["global_batch_size"],
        "num_classes": result["num_classes"], "steps_per_segment": args.steps, "rounds": args.rounds,
        "warmup_steps": args.warmup_steps, "device": result["device"],
        "engine_samples_per_sec": [round(e["samples_per_sec"], 3) for e in engine],
        "bare_samples_per_sec": [round(b["samples_per_sec"], 3) for b in bare],
        "ratio_per_pair": [round(r, 4) for r in ratios],
        "ratio_mean": round(statistics.mean(ratios), 4),
        "ratio_std": round(statistics.stdev(ratios), 4) if len(ratios) > 1 else 0.0,
        "ratio_min": round(min(ratios), 4), "ratio_max": round(max(ratios), 4),
        "ratio_median": round(statistics.median(ratios), 4),
        "ratio_iqr": [round(q, 4) for q in _quartiles(ratios)],
        "ratio_pooled": round(pooled, 4),
        "cpu_time_ratio_per_pair": [round(r, 4) for r in cpu_ratios],
        "cpu_time_ratio_median": round(statistics.median(cpu_ratios), 4),
        "cpu_time_ratio_pooled": round(sum(b["cpu_seconds"] for b in bare) / sum(e["cpu_seconds"] for e in engine), 4),
        "loadavg_1m_min": round(min(loads), 2), "loadavg_1m_max": round(max(loads), 2),
        "train_seconds": round(result["train_seconds"], 1),
    }


def run_overhead(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    result = spawn_ranks(args)
    s = summarise(result, args)
    engine = [e["samples_per_sec"] for e in result["segments"] if e["side"] == "engine"]
    bare = [b["samples_per_sec"] for b in result["segments"] if b["side"] == "bare"]
    print(f"\n== engine overhead: {s['backbone']} {s['precision']} ZeRO-{s['zero_stage']} on {s['device']} vs a bare "
          f"DDP loop with the {s['bare_head']} head, images and weights {s['engine_layout'].upper()} (engine) / "
          f"{s['bare_layout'].upper()} (bare), "
          f"world {s['world_size']} x {s['threads_per_rank']} thread(s), micro-batch {s['micro_batch']} "
          f"(global {s['global_batch_size']}), {s['num_classes']} classes")
    print(f"   {args.rounds} rounds x {args.steps} steps per side (ABBA), {args.warmup_steps} warm-up steps each")
    print(f"   engine samples/s : {_spread(engine)}")
    print(f"   bare   samples/s : {_spread(bare)}")
    print(f"   ratio engine/bare per pair: {_spread(s['ratio_per_pair'])}")
    print(f"   ratio engine/bare: median {s['ratio_median']:.3f} (IQR {s['ratio_iqr'][0]:.3f}..{s['ratio_iqr'][1]:.3f}), "
          f"pooled {s['ratio_pooled']:.3f}  [{'OK' if s['ratio_median'] >= 1.0 else 'BELOW'} target 1.0]")
    print(f"   CPU-time ratio bare/engine (all ranks' CPU seconds for the same samples): "
          f"median {s['cpu_time_ratio_median']:.3f}, {_spread(s['cpu_time_ratio_per_pair'])}; "
          f"pooled {s['cpu_time_ratio_pooled']:.3f}")
    print(f"   1-min load average during the run: {s['loadavg_1m_min']:.1f}..{s['loadavg_1m_max']:.1f} "
          f"on {os.cpu_count()} CPUs")
    s["total_seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(s))
    return 0


def run_matmul(args: argparse.Namespace) -> int:
    """fp32 vs bf16 matmul (and 3x3 conv) throughput on this machine's CPU, 1 thread and all threads."""
    import torch

    out = []
    for threads in sorted({1, os.cpu_count() or 1}):
        torch.set_num_threads(threads)
        for dtype in (torch.float32, torch.bfloat16):
            n = 1024
            a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
            a @ b
            reps = 20 if dtype == torch.float32 else 2
            t = time.perf_counter()
            for _ in range(reps):
                a @ b
            mm = 2 * n ** 3 * reps / (time.perf_counter() - t) / 1e9
            x = torch.randn(8, 64, 56, 56, dtype=dtype)
            w = torch.randn(64, 64, 3, 3, dtype=dtype)
            torch.nn.functional.conv2d(x, w, padding=1)
            reps = 5 if dtype == torch.float32 else 1
            t = time.perf_counter()
            for _ in range(reps):
                torch.nn.functional.conv2d(x, w, padding=1)
            conv = 2 * 8 * 64 * 56 * 56 * 64 * 9 * reps / (time.perf_counter() - t) / 1e9
            row = {"threads": threads, "dtype": str(dtype).replace("torch.", ""),
                   "matmul_1024_gflops": round(mm, 2), "conv3x3_64ch_56px_gflops": round(conv, 2)}
            out.append(row)
            print(json.dumps(row), flush=True)
    flags = ""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        pass
    isa = sorted({f for f in flags.split() if f.startswith(("avx512", "amx")) or f in ("avx2", "avx")})
    print(json.dumps({"cpu": platform.processor() or platform.machine(), "isa_flags": isa,
                      "torch": torch.__version__}))
    return 0


def _sample_rank_rss(proc: "subprocess.Popen", timeout_s: float) -> Dict[int, int]:
    """Wait for the launcher; meanwhile sample the RSS of each rank (``--local_rank=N`` children) twice a second.

    summary.json holds the ranks' own peak RSS when a run finishes; this sampled peak is there when it does not
    (a rank killed for memory never writes one).
    """
    import psutil

    peaks: Dict[int, int] = {}
    deadline = time.monotonic() + timeout_s
    root = psutil.Process(proc.pid)
    while proc.poll() is None:
        if time.monotonic() > deadline:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
            break
        try:
            children = root.children(recursive=True)
        except psutil.Error:
            children = []
        for child in children:
            try:
                rank = next((int(a.split("=", 1)[1]) for a in child.cmdline() if a.startswith("--local_rank=")),
                            None)
                if rank is not None:
                    peaks[rank] = max(peaks.get(rank, 0), child.memory_info().rss)
            except (psutil.Error, ValueError):
                continue
        time.sleep(0.5)
    proc.wait()
    return peaks


def run_r2060(args: argparse.Namespace) -> int:
    """Two ranks through the real launcher: r2060, ZeRO-3, activation checkpointing, fp32, 2 steps.

    Micro-batch 2 per rank by default: IResNet ends in BatchNorm1d over the embedding (as arcface_torch's
    does), which raises "Expected more than 1 value per channel when training" for a batch of one.
    """
    launcher = Path(sys.executable).parent / "deepspeed"
    from engine.runtime.dist import find_free_port

    out_dir = Path(tempfile.mkdtemp(prefix="arcscale_r2060_"))
    overrides = [
        f"train_micro_batch_size_per_gpu={args.r2060_micro_batch}", "gradient_accumulation_steps=1",
        "torch_autocast.enabled=false", "engine.head.num_classes=1000",
        "engine.data.source=synthetic", "engine.data.synthetic=noise",
        f"engine.train.max_steps={args.r2060_steps}", "engine.train.log_every=1",
        f"engine.train.output_dir={out_dir}", "engine.checkpoint.every=0", "engine.checkpoint.every_minutes=0",
        "engine.eval.targets=[]",
    ] + list(args.overrides)
    cmd = [str(launcher if launcher.exists() else "deepspeed"), "--num_gpus", "2",
           "--master_port", str(find_free_port()), "run.py", "--config", "ds_configs/r2060.json"]
    for o in overrides:
        cmd += ["--set", o]
    print("$ " + " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    log_path = out_dir / "launcher.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, text=True)
        sampled = _sample_rank_rss(proc, args.r2060_timeout)
    wall = time.perf_counter() - t0
    output = log_path.read_text(errors="replace")
    tail = "\n".join(output.splitlines()[-40:])
    summary_path = out_dir / "summary.json"
    sampled_gib = {r: round(b / 2 ** 30, 2) for r, b in sorted(sampled.items())}
    if proc.returncode != 0 or not summary_path.is_file():
        print(tail)
        killed = "return code = -9" in output or proc.returncode in (-9, 137, 247)
        print(json.dumps({"bench": "r2060", "ok": False, "returncode": proc.returncode,
                          "rank_killed_by_sigkill": killed,
                          "hint": ("a rank got SIGKILL: on a CPU machine that is the kernel's OOM killer, most "
                                   "likely (see dmesg)") if killed else None,
                          "peak_rss_sampled_gib_per_rank": sampled_gib,
                          "launcher_wall_s": round(wall, 1), "log": str(log_path)}))
        return 1
    summary = json.loads(summary_path.read_text())
    metrics = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    gb = summary["global_batch_size"]
    step_s = {m["step"]: round(gb / m["samples_per_sec"], 1) for m in metrics}
    res = {
        "bench": "r2060", "ok": True, "world_size": summary["world_size"], "precision": summary["precision"],
        "zero_stage": summary["zero_stage"], "global_batch_size": gb, "steps": summary["steps"],
        "step_seconds_by_step": step_s,
        "samples_per_sec_after_first_step": summary["samples_per_sec"],
        "step_seconds_after_first_step": (round(gb / summary["samples_per_sec"], 1)
                                          if summary["samples_per_sec"] else None),
        "peak_rss_gib_per_rank": [round(b / 2 ** 30, 2) for b in summary["peak_memory_bytes_per_rank"]],
        "peak_memory_kind": summary["peak_memory_kind"], "peak_rss_sampled_gib_per_rank": sampled_gib,
        "wall_time_s": round(summary["wall_time_s"], 1),
        "launcher_wall_s": round(wall, 1), "first_loss": summary["first_loss"],
        "final_loss": summary["final_loss"], "output_dir": str(out_dir),
    }
    print(tail)
    print(json.dumps(res))
    return 0


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--world-size", type=int, default=1, help="ranks to spawn (gloo on CPU)")
    p.add_argument("--backbone", default="r50")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="fp32 on CPUs without bf16 units; bf16 = torch_autocast on both sides")
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=1, help="optimizer steps per timed segment")
    p.add_argument("--warmup-steps", type=int, default=2, help="untimed steps per side before the segments")
    p.add_argument("--rounds", type=int, default=12, help="engine/bare segment pairs (order alternates)")
    p.add_argument("--num-classes", type=int, default=None, help="head classes (default: the recipe's)")
    p.add_argument("--bare-head", choices=("auto", "dense", "partial_fc"), default="auto",
                   help="the bare loop's head: dense = arcface_torch's sample-rate-1.0 softmax (sharded centres, "
                        "dense gradient, one SGD with the backbone); partial_fc = heads.PartialFC as the engine "
                        "(sampled heads); auto (default): dense at rate 1.0 on >= 2 ranks, else partial_fc")
    p.add_argument("--bare-layout", choices=("nchw", "engine"), default="nchw",
                   help="the bare loop's memory layout: nchw (default) = contiguous, as arcface_torch's loop; "
                        "engine = the engine's engine.model.channels_last (NHWC in the CNN recipes), the "
                        "like-for-like view of the step's other costs")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="extra config override, applied to both sides (repeatable)")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds before the ranks are killed")
    p.add_argument("--deepspeed-allreduce", action="store_true",
                   help="engine side with DeepSpeed's own ZeRO-0 gradient all-reduce (after the backward, on a "
                        "concatenation of every gradient) instead of engine.parallel.reducer's: the before/after "
                        "comparison")
    p.add_argument("--r2060", action="store_true", help="run the r2060 ZeRO-3 smoke run instead")
    p.add_argument("--r2060-steps", type=int, default=2)
    p.add_argument("--r2060-micro-batch", type=int, default=2,
                   help="per rank; >= 2 because the embedding BatchNorm1d cannot train on one sample")
    p.add_argument("--r2060-timeout", type=float, default=1800.0)
    p.add_argument("--matmul", action="store_true", help="measure fp32 vs bf16 matmul/conv throughput instead")
    args = p.parse_args(argv)
    if args.world_size < 1 or args.steps < 1 or args.warmup_steps < 1 or args.rounds < 1 or args.micro_batch < 1:
        p.error("--world-size, --steps, --warmup-steps, --rounds and --micro-batch must be >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.matmul:
        return run_matmul(args)
    if args.r2060:
        return run_r2060(args)
    return run_overhead(args)


if __name__ == "__main__":
    sys.exit(main())
