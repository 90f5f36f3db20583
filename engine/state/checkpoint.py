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
the next save. Multi-node runs need ``output_dir`` on storage every node sees (as DeepSpeed's checkpoints do;
engine.state.rundir checks it at start-up).

Never writing garbage: a checkpoint (or model.pt) holding a non-finite value is refused before any file is
written, naming the tensor; the previous checkpoints and ``latest`` stay as they were. A write that fails (disk
full, I/O error) names the file and the errno on every rank, removes the partial ``.tmp`` directory and also
leaves the previous checkpoints and ``latest`` intact. Files are fsynced before the rename that publishes them.
Pruning (`keep`) only considers checkpoints up to the step being saved, so after a resume from an older
checkpoint it never deletes the one resumed from in favour of newer ones of the abandoned continuation.

Reading: an unreadable file (truncated, corrupt) is named in the error. ``resume=auto`` then falls back to the
next older checkpoint that every rank can read, saying so. A checkpoint carries its run's identity
(engine.state.rundir.identity); resuming one of another run (another backbone, head size, data source, seed,
optimizer kind) is refused naming both, and settings that changed since it was saved are listed.

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
from typing import Any, Dict, Iterable, List, Optional, Tuple

import torch

from engine.runtime import dist, fileio
from engine.runtime.log import get_logger
from engine.state import rundir
from engine.state.weights import load_weights_only

log = get_logger(__name__)

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


def _step_of(path: Path) -> int:
    return int(path.name[len(_STEP_PREFIX):])


CheckpointWriteError = fileio.WriteError  # a file could not be written (names it and the errno)
CheckpointReadError = fileio.ReadError  # a file cannot be read (names it)


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


def load_head(trainer, shards: Iterable[Tuple[Dict[str, Any], Any]], meta: Dict[str, Any], where: str) -> None:
    """Fill this rank's class rows (and their optimizer state) from the saved shards overlapping them.

    `shards`: (entry, loader) pairs; entry holds the shard's class_start and num_local, loader() returns the
    shard (only called for shards that overlap this rank's rows). Optimizer row state the saved shards do not
    have (saved before the head's first step) is dropped, as a fresh optimizer would not have it either.
    """
    head, weight = trainer.head, _head_param(trainer)
    if meta["num_classes"] != head.num_classes or meta["embedding_size"] != weight.shape[1]:
        raise ValueError(f"{where} has a head of {meta['num_classes']} classes x "
                         f"{meta['embedding_size']}; this run's engine.head.num_classes / engine.model."
                         f"embedding_size give {head.num_classes} x {weight.shape[1]}")
    lo, hi = head.class_start, head.class_start + head.num_local
    state = trainer.head_optimizer.state[weight]
    covered, saved_keys = 0, set()
    for entry, loader in shards:
        s_lo, s_hi = entry["class_start"], entry["class_start"] + entry["num_local"]
        a, b = max(lo, s_lo), min(hi, s_hi)
        if a >= b:
            continue
        shard = loader()
        with torch.no_grad():
            weight[a - lo:b - lo].copy_(shard["weight"][a - s_lo:b - s_lo].to(weight.device, weight.dtype))
            for key, value in shard["rows"].items():
                if key not in state:
                    state[key] = torch.zeros((head.num_local,) + tuple(value.shape[1:]), dtype=value.dtype,
                                             device=weight.device)
                state[key][a - lo:b - lo].copy_(value[a - s_lo:b - s_lo].to(state[key].device, state[key].dtype))
            for key, value in shard["other"].items():
                state[key] = value
        saved_keys |= set(shard["rows"]) | set(shard["other"])
        covered += b - a
    if covered != head.num_local:
        raise ValueError(f"{where}: its head shards cover {covered} of this rank's "
                         f"{head.num_local} classes [{lo}, {hi}); the checkpoint is incomplete")
    for key in set(state) - saved_keys:
        del state[key]
    head.step = int(meta["head_step"])


# ---------------------------------------------------------------------------------------------------------------
# The whole training state: captured and restored by one pair of functions, in memory or on disk
# ---------------------------------------------------------------------------------------------------------------

def _data_state(trainer) -> Optional[Dict[str, Any]]:
    """Rank 0's loader position, on every rank (each loader converts it to its own shard, any world size)."""
    data = trainer.data
    mine = data.state_dict() if hasattr(data, "state_dict") else None
    return dist.all_gather_object(mine)[0]


def _meta(trainer, data_state: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    run_id, id_keys = rundir.identity(trainer.cfg)
    return {
        "format": FORMAT_VERSION, "step": trainer.step, "epoch": trainer.epoch,
        "world_size": dist.get_world_size(), "global_batch_size": trainer.global_batch_size,
        "backbone": trainer.cfg.engine.model.name, "backend": trainer.backbone.name,
        "num_classes": trainer.head.num_classes, "embedding_size": _head_param(trainer).shape[1],
        "head_step": trainer.head.step, "data": data_state, "scaler": trainer.backbone.scaler_state(),
        "config_digest": trainer.cfg.digest(), "run_identity": run_id, "identity": id_keys,
        "output_dir": str(trainer.output_dir), "config": trainer.cfg.to_dict(),
    }


def check_identity(trainer, meta: Dict[str, Any], where: str) -> None:
    """Refuse a checkpoint of another run (engine.state.rundir.IDENTITY_KEYS differ); note the settings that changed.

    A checkpoint without an identity (saved by an ArcScale from before run identities, same format version)
    is resumed with a warning naming it and the identity keys nobody can check: its backbone and head shape
    are still checked against this run's as they are restored.

    Raises:
        ValueError: naming both runs (output_dir and identity digest) and each differing key with both values.
    """
    run_id, keys = rundir.identity(trainer.cfg)
    saved_id, saved_keys = meta.get("run_identity"), meta.get("identity")
    if saved_id is None:
        shape_keys = ("engine.model.name", "engine.model.embedding_size", "engine.head.num_classes")
        unchecked = ", ".join(k for k in rundir.IDENTITY_KEYS if k not in shape_keys)
        log.warning(f"{where} carries no run identity (saved before ArcScale recorded one): its backbone and head "
                    f"shape are checked, but not that it is this run's ({unchecked}); resuming it as this run's",
                    once=True)
        return
    if saved_id != run_id:
        diffs = "; ".join(f"{k}: {saved_keys.get(k)!r} there, {v!r} here" for k, v in keys.items()
                          if saved_keys.get(k) != v)
        raise ValueError(f"{where} belongs to another run (run {saved_id}, output_dir "
                         f"{meta.get('output_dir')}) than this one (run {run_id}, output_dir "
                         f"{trainer.output_dir}): {diffs}. Resume it with its own config, or start this run "
                         f"in another output_dir (or with engine.checkpoint.overwrite=true to delete it)")
    if "config" in meta:
        changed = rundir.changed_settings(meta["config"], trainer.cfg)
        if changed:
            listed = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items())
            log.info(f"resuming {where} with changed settings: {listed}")


def capture(trainer, everywhere: bool = True) -> Dict[str, Any]:
    """Every piece of training state of `trainer` (all ranks must call: the backbone is gathered).

    Returns {"meta": step, epoch, world size, data position, Partial FC sampling step, loss scaler, shapes;
    "backbone": full fp32 weights; "backbone_optim": optimizer state by parameter name; "head": this rank's
    class rows and their optimizer rows with the global range; "rng": this rank's RNG state}. Unless
    `everywhere`, the backbone parts are kept on rank 0 only (what a checkpoint writes). In-memory snapshots
    (`Trainer.state_dict`) and on-disk checkpoints (`save`) are this same dict.
    """
    return {
        "meta": _meta(trainer, _data_state(trainer)),
        "backbone": trainer.backbone.full_state_dict(everywhere=everywhere),
        "backbone_optim": trainer.backbone.optimizer_state(everywhere=everywhere),
        "head": head_shard(trainer),
        "rng": rng_state(trainer.device),
    }


def _warn_not_restored(what: List[str], where: str) -> None:
    if what:
        log.warning(f"resuming from {where} without restoring: {'; '.join(what)}", once=True)


def restore(trainer, state: Dict[str, Any], head_shards: Optional[Iterable[Tuple[Dict[str, Any], Any]]] = None,
            where: str = "an in-memory state") -> None:
    """Restore every piece `capture` returns into `trainer` (all ranks must call: ZeRO/FSDP scatter).

    `head_shards`: (entry, loader) pairs of saved shards, where entry has class_start/num_local and loader()
    returns the shard dict; default: `state["head"]`, this rank's own shard (a state captured on the same
    world size). A part the state lacks, or cannot apply here (RNG of another world size, a loss scale this
    optimizer has no scaler for), is named in one warning; nothing is skipped silently.
    """
    meta = state["meta"]
    check_identity(trainer, meta, where)
    if meta.get("backbone") not in (None, trainer.cfg.engine.model.name):
        raise ValueError(f"{where} is of backbone {meta['backbone']!r}; engine.model.name is "
                         f"{trainer.cfg.engine.model.name!r}")
    not_restored: List[str] = []
    if head_shards is None:
        own = state["head"]
        head_shards = [(own, lambda own=own: own)]
    load_head(trainer, head_shards, meta, where)
    trainer.backbone.load_full_state_dict(state["backbone"])
    trainer.backbone.load_optimizer_state(state.get("backbone_optim") or {})
    trainer.step = int(meta["step"])
    trainer.epoch = int(meta["epoch"])
    if "scaler" not in meta:
        if trainer.cfg.precision == "fp16":
            not_restored.append("the fp16 loss scale (not in the checkpoint: it restarts from its initial value)")
    elif meta["scaler"]:
        trainer.backbone.load_scaler_state(meta["scaler"])
    rng = state.get("rng")
    if int(meta["world_size"]) != dist.get_world_size():
        not_restored.append(f"RNG state (saved on {meta['world_size']} ranks, resumed on "
                            f"{dist.get_world_size()}: each rank keeps the stream seeded at start-up)")
    elif rng is None:
        not_restored.append("RNG state (no rng_rank<r>.pt: saved by an older ArcScale)")
    else:
        set_rng_state(rng, trainer.device)
    data_state = meta.get("data")
    if data_state is None:
        not_restored.append("the data position (none saved: the loader starts at the beginning of epoch 0)")
    elif not hasattr(trainer.data, "load_state_dict"):
        not_restored.append(f"the data position (this run's data, {type(trainer.data).__name__}, "
                            f"cannot be repositioned)")
    else:
        trainer.data.load_state_dict(data_state)  # both loaders convert positions across world sizes
        trainer.epoch = getattr(trainer.data, "epoch", trainer.epoch)
    _warn_not_restored(not_restored, where)


def _attempt(errors: List[str], fn, *args) -> None:
    """Run `fn(*args)` unless an earlier write of this save failed; keep the message of a failure."""
    if errors:
        return
    try:
        fn(*args)
    except CheckpointWriteError as exc:
        errors.append(f"[rank {dist.get_rank()}] {exc}")


def first_nonfinite(tensors: Dict[str, Any], what: str) -> Optional[str]:
    """'<what> <name>' of the first floating-point tensor in `tensors` (nested dicts) holding inf or NaN."""
    for name, value in tensors.items():
        if isinstance(value, dict):
            found = first_nonfinite(value, f"{what} {name}")
            if found:
                return found
        elif torch.is_tensor(value) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
            return f"{what} {name!r}"
    return None


def _refuse_nonfinite(errors: List[str], tensors: Dict[str, Any], what: str, target: Path) -> None:
    found = first_nonfinite(tensors, what)
    if found and not errors:
        errors.append(f"[rank {dist.get_rank()}] refusing to write {target}: {found} holds inf or NaN values")


def save(trainer, root: Optional[os.PathLike] = None, keep: int = 0) -> Path:
    """Write a checkpoint of `trainer` at its current step; return its directory (all ranks must call).

    `keep` > 0 removes the oldest complete checkpoints up to this step beyond the newest `keep`.

    Raises:
        CheckpointWriteError: on every rank, when some rank could not write its files (named, with the errno)
            or the state holds a non-finite value (named); nothing of this checkpoint is published then.
    """
    root = Path(root) if root is not None else checkpoint_root(trainer.output_dir)
    final = root / f"{_STEP_PREFIX}{trainer.step:08d}"
    tmp = root / (final.name + ".tmp")
    rank = dist.get_rank()
    errors: List[str] = []
    if rank == 0:
        try:
            root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)  # left by a crash: never complete, never resumed from
            tmp.mkdir()
        except OSError as exc:
            errors.append(f"[rank 0] {fileio.write_error(tmp, exc)}")
    errors = [e for e in dist.all_gather_object(errors[0] if errors else None) if e]
    if errors:
        raise CheckpointWriteError(errors[0])

    # Every rank takes part in every gather below even after a failed write, so no rank waits alone.
    data_state = _data_state(trainer)
    weights = trainer.backbone.full_state_dict(everywhere=False)
    if rank == 0:
        _refuse_nonfinite(errors, weights, "backbone weight", final)
        _attempt(errors, fileio.atomic_save, weights, tmp / "backbone.pt")
    del weights
    optim = trainer.backbone.optimizer_state(everywhere=False)
    if rank == 0:
        _refuse_nonfinite(errors, optim.get("state", {}), "backbone optimizer state", final)
        _attempt(errors, fileio.atomic_save, optim, tmp / "backbone_optim.pt")
    del optim
    shard_file = f"head_rank{rank:05d}.pt"
    shard = head_shard(trainer)
    _refuse_nonfinite(errors, {"weight": shard["weight"], **shard["rows"]}, "head shard", final)
    _attempt(errors, fileio.atomic_save, shard, tmp / shard_file)
    _attempt(errors, fileio.atomic_save, rng_state(trainer.device), tmp / f"rng_rank{rank:05d}.pt")
    gathered = dist.all_gather_object(({"file": shard_file, "class_start": trainer.head.class_start,
                                        "num_local": trainer.head.num_local}, errors[0] if errors else None))
    shards = [entry for entry, _ in gathered]
    errors = [e for _, e in gathered if e]  # every rank's files are complete, or every rank knows they are not
    if rank == 0:
        if not errors:
            meta = {**_meta(trainer, data_state), "head_shards": shards}
            _attempt(errors, fileio.atomic_write_text, json.dumps(meta, indent=1), tmp / "meta.json")
        if not errors:
            try:
                if final.exists():
                    shutil.rmtree(final)
                os.replace(tmp, final)
            except OSError as exc:
                errors.append(f"[rank 0] {fileio.write_error(final, exc)}")
        if not errors:
            _attempt(errors, fileio.atomic_write_text, final.name + "\n", root / "latest")
            _prune(root, trainer.step, keep)
        if errors:
            shutil.rmtree(tmp, ignore_errors=True)  # frees what it held (a full disk); `latest` is untouched
    errors = [e for e in dist.all_gather_object(errors[0] if errors else None) if e]
    if errors:
        raise CheckpointWriteError(f"checkpoint step {trainer.step} not written: {errors[0]}; the previous "
                                   f"checkpoints in {root} are intact")
    return final


def _prune(root: Path, step: int, keep: int) -> None:
    """Delete the complete checkpoints up to `step` beyond the newest `keep`. Later ones (left by a
    continuation abandoned for an older checkpoint) are kept until this run overwrites them."""
    if keep > 0:
        done = [p for p in list_checkpoints(root) if _step_of(p) <= step]
        for old in done[:-keep]:
            shutil.rmtree(old, ignore_errors=True)


def read(directory: os.PathLike, class_range: Optional[Tuple[int, int]] = None
         ) -> Tuple[Dict[str, Any], List[Tuple[Dict[str, Any], Any]]]:
    """A checkpoint directory as `capture`'s dict (tensors memory-mapped) plus its head shards as
    (entry, loader) pairs for `restore`, so only the shards overlapping a rank's classes are read.

    With `class_range` (lo, hi) the shards overlapping those classes are read now, so every file this rank
    needs has been opened when `read` returns. Raises CheckpointReadError naming an unreadable file.
    """
    directory = Path(directory)
    try:
        meta = json.loads((directory / "meta.json").read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointReadError(f"{directory / 'meta.json'}: unreadable ({exc})") from None
    if meta.get("format") != FORMAT_VERSION:
        raise ValueError(f"checkpoint {directory} has format {meta.get('format')}; this ArcScale reads "
                         f"format {FORMAT_VERSION}")
    rng_file = directory / f"rng_rank{dist.get_rank():05d}.pt"
    state = {"meta": meta, "backbone": load_weights_only(directory / "backbone.pt"),
             "backbone_optim": load_weights_only(directory / "backbone_optim.pt"),
             "rng": load_weights_only(rng_file) if rng_file.exists() else None}
    shards = []
    for entry in meta["head_shards"]:
        path = directory / entry["file"]
        lo, hi = class_range or (0, -1)
        if entry["class_start"] < hi and lo < entry["class_start"] + entry["num_local"]:
            loaded = load_weights_only(path)
            shards.append((entry, lambda loaded=loaded: loaded))
        else:
            shards.append((entry, lambda path=path: load_weights_only(path)))
    return state, shards


def _class_range(trainer) -> Tuple[int, int]:
    return trainer.head.class_start, trainer.head.class_start + trainer.head.num_local


def load(trainer, directory: os.PathLike) -> Dict[str, Any]:
    """Restore `trainer` from a checkpoint saved at any world size, ZeRO stage or backend (all ranks call).

    Every rank first opens the files it needs; if one cannot, every rank raises the same CheckpointReadError
    (before any rank has changed its state or entered a collective of the restore).
    """
    state, shards, error = _try_read(directory, _class_range(trainer))
    errors = [e for e in dist.all_gather_object(error) if e]
    if errors:
        raise CheckpointReadError(errors[0])
    restore(trainer, state, head_shards=shards, where=f"checkpoint {directory}")
    dist.barrier()
    return state["meta"]


def _try_read(directory, class_range):
    try:
        state, shards = read(directory, class_range)
        return state, shards, None
    except CheckpointReadError as exc:
        return None, None, f"[rank {dist.get_rank()}] {exc}"


def resume(trainer) -> Optional[Path]:
    """Load the checkpoint `engine.checkpoint.resume` names into `trainer` (all ranks); None to start fresh.

    With "auto", a newest checkpoint that some rank cannot read is skipped for the next older one, with a
    warning naming the file; a named checkpoint that cannot be read is an error.
    """
    spec = trainer.cfg.engine.checkpoint.resume
    trainer.resumed_from = None
    if not spec:
        return None
    if spec == "auto":
        candidates = list(reversed(list_checkpoints(checkpoint_root(trainer.output_dir))))
    else:
        candidates = [resolve_resume(spec, trainer.output_dir)]
    failures: List[str] = []
    for i, path in enumerate(candidates):
        state, shards, error = _try_read(path, _class_range(trainer))
        errors = [e for e in dist.all_gather_object(error) if e]
        if not errors:
            if failures:
                log.warning(f"resuming from {path}, the newest checkpoint that every rank can read", once=True)
            restore(trainer, state, head_shards=shards, where=f"checkpoint {path}")
            dist.barrier()
            trainer.resumed_from = path
            log.info(f"resumed from {path}: continuing after step {trainer.step}")
            return path
        if spec != "auto":
            raise CheckpointReadError(f"engine.checkpoint.resume: checkpoint {path} cannot be read: {errors[0]}")
        failures.append(errors[0])
        after = f"falling back to {candidates[i + 1]}" if i + 1 < len(candidates) else "no older checkpoint"
        log.warning(f"checkpoint {path} cannot be read: {errors[0]}; {after}", once=True)
    if failures:
        raise CheckpointReadError(f"engine.checkpoint.resume=auto: none of the {len(failures)} checkpoints under "
                                  f"{checkpoint_root(trainer.output_dir)} can be read (newest: {failures[0]})")
    return None


def export_model(trainer, path: os.PathLike) -> Optional[Path]:
    """Write the backbone's fp32 state_dict (arcface_torch keys) to `path` on rank 0 (all ranks must call).

    Raises CheckpointWriteError on every rank when the weights hold a non-finite value or the write fails.
    """
    weights = trainer.backbone.full_state_dict(everywhere=False)  # contiguous, whatever the training layout
    path = Path(path)
    errors: List[str] = []
    if dist.get_rank() == 0:
        _refuse_nonfinite(errors, weights, "backbone weight", path)
        path.parent.mkdir(parents=True, exist_ok=True)
        _attempt(errors, fileio.atomic_save, weights, path)
    errors = [e for e in dist.all_gather_object(errors[0] if errors else None) if e]
    if errors:
        raise CheckpointWriteError(f"model export failed: {errors[0]}")
    return path if dist.get_rank() == 0 else None
