"""Training checkpoints that survive a change of world size, and the final model export.

A checkpoint is a directory ``<output_dir>/checkpoints/step_<8 digits>/`` holding

- ``backbone.pt``: the full fp32 backbone state_dict with arcface_torch's keys (DeepSpeed's fp32 master weights
  where it keeps them), so it also loads into arcface_torch's model with ``strict=True``;
- ``backbone_optim.pt``: the backbone optimizer state per parameter name, full size (``momentum_buffer`` for
  SGD; ``exp_avg``, ``exp_avg_sq`` and the step count for AdamW), gathered from ZeRO partitions;
- ``head_rank<r>.pt`` (one per rank of the saving run): that rank's class rows ``[class_start, class_start +
  num_local)`` of the Partial FC weight and the same rows of its optimizer state, with the global range;
- ``rng_rank<r>.pt`` (one per rank): that rank's torch RNG state (CPU, and CUDA when training on a GPU), restored
  when the run resumes on the same world size, so dropout and drop-path draw what the uninterrupted run drew;
- ``meta.json`` (written last): step, epoch, world size, data position, Partial FC sampling step, shapes.

None of these depends on the world size or the ZeRO stage, so a run saved on W ranks resumes on W' ranks under
any stage: every rank re-slices the class rows it now owns from the shards that overlap its new range
(memory-mapped, so no rank reads the whole head), and ZeRO re-partitions the backbone state as it loads.

Never losing data: ranks write into ``step_X.tmp/``; after a barrier rank 0 writes ``meta.json``, renames the
directory to ``step_X`` (atomic on one filesystem) and then points ``latest`` at it (written to a temporary
name and renamed). A crash leaves at worst a ``.tmp`` directory, which is never resumed from and is removed by
the next save. Multi-node runs need ``output_dir`` on storage every node sees (as DeepSpeed's checkpoints do).

BatchNorm running statistics are per rank (as in arcface_torch, whose DDP does not broadcast buffers); a
checkpoint carries rank 0's, as the exported model does, and every rank resumes from them. They only serve
evaluation: training normalises with batch statistics, so the weights' trajectory is unaffected.

Not restored: RNG states on another world size (there is no per-rank stream to continue; each rank keeps the
stream seeded at start-up), DALI's own random state (its flips after a resume differ; data order comes from
the loader state, and the synthetic source is addressed by sample slot) and, under fp16, the dynamic loss
scale, which restarts from its initial value.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from engine import dist, parallel
from engine.hooks import Hook

FORMAT_VERSION = 1
_STEP_PREFIX = "step_"


# ---------------------------------------------------------------------------------------------------------------
# Locations
# ---------------------------------------------------------------------------------------------------------------

def checkpoint_root(output_dir: os.PathLike) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(root: os.PathLike) -> List[Path]:
    """Complete checkpoints under `root`, oldest first (``.tmp`` directories are not complete)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(_STEP_PREFIX)
             and p.name[len(_STEP_PREFIX):].isdigit() and (p / "meta.json").is_file()]
    return sorted(found, key=lambda p: int(p.name[len(_STEP_PREFIX):]))


def resolve_resume(spec: Optional[str], output_dir: os.PathLike) -> Optional[Path]:
    """The checkpoint directory `engine.checkpoint.resume` names, or None to start fresh.

    ``"auto"``: the newest complete checkpoint under ``<output_dir>/checkpoints`` if there is one (else start
    fresh), so the same command both starts and resumes a job. A path: that checkpoint, which must exist.
    """
    if not spec:
        return None
    if spec == "auto":
        found = list_checkpoints(checkpoint_root(output_dir))
        return found[-1] if found else None
    path = Path(spec)
    if path.is_dir() and not (path / "meta.json").is_file() and list_checkpoints(path):
        path = list_checkpoints(path)[-1]  # a checkpoints/ folder: its newest
    if not (path / "meta.json").is_file():
        raise FileNotFoundError(f"engine.checkpoint.resume: {spec!r} is not a complete checkpoint "
                                f"(no {path / 'meta.json'}); expected a step_<N> directory written by ArcScale, "
                                f"a checkpoints/ directory holding some, or 'auto'")
    return path


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".part")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _atomic_write_text(text: str, path: Path) -> None:
    tmp = path.with_name(path.name + ".part")
    tmp.write_text(text)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------------------
# Backbone: full fp32 weights and optimizer state, independent of ZeRO partitioning
# ---------------------------------------------------------------------------------------------------------------

def _zero_stage(engine) -> int:
    return int(engine.zero_optimization_stage())


def _inner_optimizer(engine) -> torch.optim.Optimizer:
    """The torch optimizer holding the state (DeepSpeed's ZeRO/fp16 wrappers keep it in ``.optimizer``)."""
    opt = engine.optimizer
    return opt if isinstance(opt, torch.optim.Optimizer) else opt.optimizer


def _state_keys(inner: torch.optim.Optimizer) -> List[str]:
    if isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)):
        return ["exp_avg", "exp_avg_sq"]
    if any(g.get("momentum", 0) for g in inner.param_groups):
        return ["momentum_buffer"]
    return []


def _state_tensors(engine, inner: torch.optim.Optimizer) -> List[torch.Tensor]:
    """The tensors the optimizer keeps state for. ZeRO-3 puts its flat fp32 partitions into the param groups
    only for the duration of a step, so they are taken from the ZeRO optimizer itself."""
    tensors = [p for group in inner.param_groups for p in group["params"]]
    tensors += list(getattr(engine.optimizer, "fp32_partitioned_groups_flat", None) or [])
    unique = {id(t): t for t in tensors}
    return list(unique.values())


def _materialise_state(engine, inner: torch.optim.Optimizer) -> None:
    """Create the optimizer's lazily built state as zeros, which is what its first step would do.

    SGD: a zero momentum buffer gives ``buf = 0 * momentum + grad = grad`` on the next step, as a missing one
    does. AdamW: zero moments and step 0. Needed because DeepSpeed's full-state setters write into it.
    """
    keys = _state_keys(inner)
    for p in _state_tensors(engine, inner):
        state = inner.state[p]
        for key in keys:
            if key not in state:
                state[key] = torch.zeros_like(p, memory_format=torch.preserve_format)
        if "exp_avg" in keys and "step" not in state:
            state["step"] = torch.tensor(0.0)


def _has_state(inner: torch.optim.Optimizer) -> bool:
    keys = _state_keys(inner)
    return bool(keys) and any(keys[0] in s for s in inner.state.values())


def _adam_step(inner: torch.optim.Optimizer) -> Optional[float]:
    for s in inner.state.values():
        if "step" in s:
            return float(s["step"])
    return None


def gather_optimizer_state(engine) -> Dict[str, Any]:
    """The backbone optimizer state by parameter name, full size, kept on rank 0 (all ranks must call).

    Empty (``keys == []``) before the first optimizer step or for SGD without momentum.
    """
    module = engine.module
    inner = _inner_optimizer(engine)
    optim: Dict[str, Any] = {"keys": [], "state": {}, "adam_step": None}
    if not _has_state(inner):
        return optim
    keys = _state_keys(inner)
    optim["keys"], optim["adam_step"] = keys, _adam_step(inner)
    stage = _zero_stage(engine)
    if stage >= 1:
        from deepspeed.utils import safe_get_full_optimizer_state
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        entry = {}
        for key in keys:
            value = safe_get_full_optimizer_state(p, key) if stage >= 1 else inner.state[p].get(key)
            entry[key] = None if value is None else value.detach().to("cpu", torch.float32).clone()
        if dist.get_rank() == 0:  # the others only take part in the gathers
            optim["state"][name] = entry
    return optim


def load_backbone(engine, weights: Dict[str, torch.Tensor], optim: Optional[Dict[str, Any]]) -> None:
    """Load gathered backbone weights and optimizer state into `engine` under any ZeRO stage (all ranks call)."""
    parallel.load_full_state_dict(engine, weights)  # model weights and DeepSpeed's fp32 master copies
    stage = _zero_stage(engine)
    module = engine.module
    if not optim or not optim.get("keys"):
        return
    inner = _inner_optimizer(engine)
    keys = _state_keys(inner)
    if keys != list(optim["keys"]):
        raise ValueError(f"checkpoint's backbone optimizer state has {optim['keys']}, but this run's optimizer "
                         f"keeps {keys}: engine.optim.name or momentum differ from the saved run")
    _materialise_state(engine, inner)
    link = getattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state", None)
    if link is not None:  # ZeRO-1/2 map each parameter onto its state only after a first step: do it now
        link()
    if stage >= 1:
        from deepspeed.utils import safe_set_full_optimizer_state
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        for key in keys:
            value = optim["state"][name][key]
            if value is None:
                continue
            if stage >= 1:
                safe_set_full_optimizer_state(p, value.to(p.device, torch.float32), key)
            else:
                inner.state[p][key].copy_(value.to(p.device, inner.state[p][key].dtype))
    if optim.get("adam_step") is not None:
        for s in inner.state.values():
            if "step" in s:
                if torch.is_tensor(s["step"]):
                    s["step"].fill_(optim["adam_step"])
                else:
                    s["step"] = optim["adam_step"]


# ---------------------------------------------------------------------------------------------------------------
# Head: class rows with their global range; re-sliced for the loading run's shards
# ---------------------------------------------------------------------------------------------------------------

def _head_param(trainer) -> torch.nn.Parameter:
    return trainer.head.weight


def rng_state(device: torch.device) -> Dict[str, Any]:
    """This process's torch RNG state: the CPU generator and, when training on CUDA, that device's."""
    cuda = device.type == "cuda"
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if cuda else None}


def set_rng_state(state: Dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"], device)


def head_shard(trainer) -> Dict[str, Any]:
    """This rank's rows of the class weight and of every per-row optimizer state tensor."""
    head, weight = trainer.head, _head_param(trainer)
    state = trainer.head_optimizer.state.get(weight, {})
    rows, other = {}, {}
    for key, value in state.items():
        if torch.is_tensor(value) and value.dim() >= 1 and value.shape[0] == head.num_local:
            rows[key] = value.detach().cpu().clone()
        else:
            other[key] = value
    return {"class_start": head.class_start, "num_local": head.num_local, "num_classes": head.num_classes,
            "embedding_size": weight.shape[1], "weight": weight.detach().cpu().clone(), "rows": rows,
            "other": other}


def load_head(trainer, directory: Path, meta: Dict[str, Any]) -> None:
    """Fill this rank's class rows (and their optimizer state) from the saved shards overlapping them."""
    head, weight = trainer.head, _head_param(trainer)
    if meta["num_classes"] != head.num_classes or meta["embedding_size"] != weight.shape[1]:
        raise ValueError(f"checkpoint {directory} has a head of {meta['num_classes']} classes x "
                         f"{meta['embedding_size']}; this run's engine.head.num_classes / engine.model."
                         f"embedding_size give {head.num_classes} x {weight.shape[1]}")
    lo, hi = head.class_start, head.class_start + head.num_local
    state = trainer.head_optimizer.state[weight]
    covered = 0
    for entry in meta["head_shards"]:
        s_lo, s_hi = entry["class_start"], entry["class_start"] + entry["num_local"]
        a, b = max(lo, s_lo), min(hi, s_hi)
        if a >= b:
            continue
        shard = torch.load(directory / entry["file"], map_location="cpu", mmap=True, weights_only=True)
        with torch.no_grad():
            weight[a - lo:b - lo].copy_(shard["weight"][a - s_lo:b - s_lo].to(weight.device, weight.dtype))
            for key, value in shard["rows"].items():
                if key not in state:
                    state[key] = torch.zeros((head.num_local,) + tuple(value.shape[1:]), dtype=value.dtype,
                                             device=weight.device)
                state[key][a - lo:b - lo].copy_(value[a - s_lo:b - s_lo].to(state[key].device, state[key].dtype))
            for key, value in shard["other"].items():
                state.setdefault(key, value)
        covered += b - a
    if covered != head.num_local:
        raise ValueError(f"checkpoint {directory}: its head shards cover {covered} of this rank's "
                         f"{head.num_local} classes [{lo}, {hi}); the checkpoint is incomplete")
    head.step = int(meta["head_step"])


# ---------------------------------------------------------------------------------------------------------------
# Save / load a whole trainer
# ---------------------------------------------------------------------------------------------------------------

def _data_state(trainer) -> Optional[Dict[str, Any]]:
    data = trainer.data
    return data.state_dict() if hasattr(data, "state_dict") else None


def save(trainer, root: Optional[os.PathLike] = None, keep: int = 0) -> Path:
    """Write a checkpoint of `trainer` at its current step; return its directory (all ranks must call).

    `keep` > 0 removes the oldest complete checkpoints beyond the newest `keep`.
    """
    root = Path(root) if root is not None else checkpoint_root(trainer.output_dir)
    final = root / f"{_STEP_PREFIX}{trainer.step:08d}"
    tmp = root / (final.name + ".tmp")
    rank = dist.get_rank()
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)  # left by a crash: never complete, never resumed from
        tmp.mkdir()
    dist.barrier()

    weights = parallel.full_state_dict(trainer.model_engine, everywhere=False)
    if rank == 0:
        _atomic_save(weights, tmp / "backbone.pt")
    del weights
    optim = gather_optimizer_state(trainer.model_engine)
    if rank == 0:
        _atomic_save(optim, tmp / "backbone_optim.pt")
    del optim
    shard_file = f"head_rank{rank:05d}.pt"
    _atomic_save(head_shard(trainer), tmp / shard_file)
    _atomic_save(rng_state(trainer.device), tmp / f"rng_rank{rank:05d}.pt")
    shards = dist.all_gather_object({"file": shard_file, "class_start": trainer.head.class_start,
                                     "num_local": trainer.head.num_local})
    dist.barrier()  # every rank's files are complete
    if rank == 0:
        meta = {
            "format": FORMAT_VERSION, "step": trainer.step, "epoch": trainer.epoch,
            "world_size": dist.get_world_size(), "global_batch_size": trainer.global_batch_size,
            "backbone": trainer.cfg.engine.model.name, "num_classes": trainer.head.num_classes,
            "embedding_size": _head_param(trainer).shape[1], "head_step": trainer.head.step,
            "head_shards": shards, "data": _data_state(trainer), "config_digest": trainer.cfg.digest(),
        }
        _atomic_write_text(json.dumps(meta, indent=1), tmp / "meta.json")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _atomic_write_text(final.name + "\n", root / "latest")
        if keep > 0:
            for old in list_checkpoints(root)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def load(trainer, directory: os.PathLike) -> Dict[str, Any]:
    """Restore `trainer` from a checkpoint saved at any world size and ZeRO stage (all ranks must call)."""
    directory = Path(directory)
    meta = json.loads((directory / "meta.json").read_text())
    if meta.get("format") != FORMAT_VERSION:
        raise ValueError(f"checkpoint {directory} has format {meta.get('format')}; this ArcScale reads "
                         f"format {FORMAT_VERSION}")
    if meta["backbone"] != trainer.cfg.engine.model.name:
        raise ValueError(f"checkpoint {directory} is of backbone {meta['backbone']!r}; engine.model.name is "
                         f"{trainer.cfg.engine.model.name!r}")
    load_head(trainer, directory, meta)
    weights = torch.load(directory / "backbone.pt", map_location="cpu", mmap=True, weights_only=True)
    optim = torch.load(directory / "backbone_optim.pt", map_location="cpu", mmap=True, weights_only=True)
    load_backbone(trainer.model_engine, weights, optim)
    del weights, optim
    trainer.step = int(meta["step"])
    trainer.epoch = int(meta["epoch"])
    rng_file = directory / f"rng_rank{dist.get_rank():05d}.pt"
    if int(meta["world_size"]) == dist.get_world_size() and rng_file.exists():
        set_rng_state(torch.load(rng_file, map_location="cpu", weights_only=True), trainer.device)
    data_state = meta.get("data")
    if data_state is not None and hasattr(trainer.data, "load_state_dict"):
        trainer.data.load_state_dict(data_state)  # both loaders convert positions across world sizes
    dist.barrier()
    return meta


def export_model(trainer, path: os.PathLike) -> Optional[Path]:
    """Write the backbone's fp32 state_dict (arcface_torch keys) to `path` on rank 0 (all ranks must call)."""
    weights = parallel.full_state_dict(trainer.model_engine, everywhere=False)
    path = Path(path)
    if dist.get_rank() == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        _atomic_save(weights, path)
    dist.barrier()
    return path if dist.get_rank() == 0 else None


class CheckpointHook(Hook):
    """Save every `every` optimizer steps and at the end of training; export ``model.pt`` at the end."""

    def __init__(self, every: int, keep: int, export: bool = True):
        self.every = every
        self.keep = keep
        self.export = export
        self.last_saved_step: Optional[int] = None

    def on_step_end(self, trainer, step: int, loss: torch.Tensor) -> None:
        if self.every > 0 and step % self.every == 0:
            save(trainer, keep=self.keep)
            self.last_saved_step = step

    def on_train_end(self, trainer) -> None:
        if self.every > 0 and self.last_saved_step != trainer.step:
            save(trainer, keep=self.keep)
            self.last_saved_step = trainer.step
        if self.export:
            export_model(trainer, trainer.output_dir / "model.pt")
