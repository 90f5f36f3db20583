"""Start a run from existing weights: `engine.model.init_from` (backbone) and `engine.head.init_from` (class centres).

    engine.model.init_from: /models/ms1mv3_arcface_r50/backbone.pth   # arcface_torch .pth, checkpoint_gpu_*.pt,
                                                                       # or ArcScale's model.pt
    engine.model.init_strict: true      # false: another embedding head may differ (kept initialised, listed)
    engine.head.init_from: outputs/old/checkpoints/step_5000          # an ArcScale checkpoint's class centres

**Backbone.** The file is read once per rank, weights only and memory-mapped (engine.state.weights; no code in
the file can run; tensors stay mapped from the page cache, which the ranks of a node share) and checked against
the backbone the config names, built on the meta device (no memory), *before* the real model is built: a
wrong file stops a 1.1 B-parameter job in seconds, naming the keys that differ. Loading then goes through
the backend seam (`ParallelBackbone.load_full_state_dict`): ZeRO-0/1/2 copy into each rank's module, ZeRO-3
gathers, overwrites and re-partitions one parameter at a time, FSDP2 copies each rank's shard, and the fp32
master weights are set from the file's values exactly. So no rank holds the whole model beyond the mapped
file and the one parameter being copied.

**Strict** (the default): the file must have exactly the model's keys and shapes. With ``init_strict: false``
the *embedding head* may differ -- the layers whose shape depends on ``embedding_size`` (IResNet's ``fc`` and
``features``, MobileFaceNet's ``features`` linear and BatchNorm, ViT's ``feature`` linear and BatchNorm),
found by building the model at two embedding sizes on the meta device: such keys that are missing from the
file or have another shape keep the values this run initialised them with (taken from the backend's full
state, which costs one full fp32 copy per rank while loading), and are listed. Anything else that differs is
another architecture and stays an error. A file holding inf or NaN is refused, naming the tensor.

**Head.** `engine.head.init_from` names an ArcScale checkpoint (a ``step_N`` directory, or a ``checkpoints``
directory: its newest) whose head has this run's class count and embedding size. Each rank reads only the
saved shards overlapping its own classes (any world size), as a resume does, but takes only the class
centres: not their optimizer state, nor the head's sampling step. It may also name arcface_torch's Partial FC
shards: the ``checkpoint_gpu_<rank>.pt`` files its train_v2.py writes with ``save_all_states`` (one per GPU,
``state_dict_softmax_fc["weight"]`` the rank's contiguous block of classes), or the older
``softmax_fc_gpu_<rank>.pt``; one of the files or their folder, any number of them, onto any world size.

A resumed run (`engine.checkpoint.resume` finding a checkpoint) takes its weights from the checkpoint; the
init_from files are then not read, and the log says so.
"""
from __future__ import annotations

import collections
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Set, Tuple

import torch

from engine.runtime.log import get_logger

log = get_logger(__name__)

__all__ = ["BackboneInit", "embedding_head_keys", "plan_backbone_init", "load_backbone_init", "load_head_init",
           "resolve_checkpoint_dir", "arcface_torch_head_shards"]

_SHOW = 8  # keys named per list in an error message


@dataclass
class BackboneInit:
    """What `plan_backbone_init` found: the file's tensors to load and the model keys it leaves as initialised.

    Attributes:
        path: the weights file.
        state: model key -> the file's tensor (memory-mapped), for every key that is loaded.
        skipped: model keys kept at their initial values (init_strict false: the embedding head differs).
        ignored: file keys not loaded (not in the model, or of another shape).
        notes: what rank 0 prints about the file (a stripped ``module.`` prefix, an arcface_torch checkpoint).
    """

    path: Path
    state: Dict[str, torch.Tensor]
    skipped: List[str] = field(default_factory=list)
    ignored: List[str] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)

    @property
    def num_parameters(self) -> int:
        return sum(t.numel() for k, t in self.state.items() if t.is_floating_point())


def _meta_shapes(name: str, embedding_size: int) -> Dict[str, Tuple[int, ...]]:
    import backbones

    model = backbones.build_backbone(name, embedding_size=embedding_size, device="meta")
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def embedding_head_keys(name: str, embedding_size: int,
                        shapes: Optional[Dict[str, Tuple[int, ...]]] = None) -> Set[str]:
    """The state_dict keys of the modules whose shape depends on `embedding_size` (the embedding head).

    Found by building the model on the meta device at `embedding_size` and at `embedding_size + 1`: a module
    with any tensor of another shape belongs to the head, and so do all of its keys (a BatchNorm's batch
    counter included). Nothing is allocated.
    """
    shapes = shapes if shapes is not None else _meta_shapes(name, embedding_size)
    other = _meta_shapes(name, embedding_size + 1)
    modules = {k.rpartition(".")[0] for k in shapes if other.get(k) != shapes[k]}
    return {k for k in shapes if k.rpartition(".")[0] in modules}


def _listing(keys: List[str]) -> str:
    shown = ", ".join(keys[:_SHOW])
    return f"{shown}{f', ... ({len(keys)} in all)' if len(keys) > _SHOW else ''}"


def _shape(t: Tuple[int, ...]) -> str:
    return "[" + ", ".join(str(d) for d in t) + "]"


def plan_backbone_init(path: str, name: str, embedding_size: int, *, strict: bool = True) -> BackboneInit:
    """Read `path` (weights only, memory-mapped) and check it against backbone `name` at `embedding_size`.

    Cheap (no real model is built), so build_trainer calls it before building the backbone. Every rank calls
    it and reaches the same verdict on the same file.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a weights-only state_dict (a pickle that would run code is refused), keys or shapes that
            do not fit (each list named: shape mismatches with both shapes, missing keys, unexpected keys),
            or a tensor holding inf/NaN.
    """
    from engine.state.weights import read_state_dict

    what = "engine.model.init_from"
    path_ = Path(path).expanduser()
    state = read_state_dict(path_, what=what, mmap=True)
    notes: List[str] = []
    if all(k.startswith("module.") for k in state):  # saved from a DDP/DeepSpeed wrapper instead of its module
        state = {k[len("module."):]: v for k, v in state.items()}
        notes.append("keys saved with a 'module.' prefix (a wrapped model); prefix removed")
    expected = _meta_shapes(name, embedding_size)
    missing = sorted(k for k in expected if k not in state)
    unexpected = sorted(k for k in state if k not in expected)
    mismatched = sorted(k for k in expected if k in state and tuple(state[k].shape) != expected[k])
    skipped: List[str] = []
    ignored: List[str] = []
    if missing or unexpected or mismatched:
        head = embedding_head_keys(name, embedding_size, expected)
        head_modules = {k.rpartition(".")[0] for k in head}
        foreign = ([k for k in missing + mismatched if k not in head]
                   + [k for k in unexpected if k.rpartition(".")[0] not in head_modules])
        if strict or foreign:
            parts = []
            if mismatched:
                parts.append("shape mismatch: " + _listing([f"{k} (file {_shape(tuple(state[k].shape))}, model "
                                                            f"{_shape(expected[k])})" for k in mismatched]))
            if missing:
                parts.append(f"missing from the file: {_listing(missing)}")
            if unexpected:
                parts.append(f"unexpected in the file: {_listing(unexpected)}")
            if foreign:
                hint = (f"the file holds another architecture than engine.model.name={name!r} (keys outside the "
                        f"embedding head differ: {_listing(sorted(foreign))})")
            else:
                hint = (f"only the embedding head ({', '.join(sorted(head_modules))}) differs, e.g. another "
                        "embedding_size: set engine.model.embedding_size to the file's, or "
                        "engine.model.init_strict=false to load the rest and keep the head initialised")
            raise ValueError(f"{what}: {path_} does not fit backbone {name!r} with embedding_size "
                             f"{embedding_size}: {'; '.join(parts)}; {hint}")
        # a head module that differs is kept whole (a BatchNorm's counter with its statistics)
        kept = {k.rpartition(".")[0] for k in missing + mismatched}
        skipped = sorted(k for k in expected if k.rpartition(".")[0] in kept)
        ignored = sorted(set(unexpected) | {k for k in state if k.rpartition(".")[0] in kept})
        for k in ignored:
            del state[k]
    for k, t in state.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"{what}: {path_}: tensor {k!r} holds inf or NaN; refusing to start from it")
    return BackboneInit(path=path_, state=state, skipped=skipped, ignored=ignored, notes=notes)


def load_backbone_init(backbone, init: BackboneInit) -> None:
    """Load `init` into `backbone` (a ParallelBackbone) through the seam. All ranks call (a collective under
    ZeRO-3 / FSDP); the log says what was loaded and what was kept initialised."""
    state = dict(init.state)
    if init.skipped:  # the run's own initial values of the head keys the file does not provide
        current = backbone.full_state_dict()
        state.update({k: current[k] for k in init.skipped})
        del current
    backbone.load_full_state_dict(state)
    log.info(f"engine.model.init_from: loaded {len(init.state)} tensors ({init.num_parameters:,} values) "
             f"from {init.path}")
    for note in init.notes:
        log.info(f"engine.model.init_from: {note}")
    if init.skipped:
        log.info(f"engine.model.init_from: kept initialised (init_strict false): {', '.join(init.skipped)}")
    if init.ignored:
        log.info(f"engine.model.init_from: not loaded from the file: {', '.join(init.ignored)}")


def resolve_checkpoint_dir(spec: str) -> Path:
    """An ArcScale checkpoint directory (``step_N`` with meta.json), or the newest one inside `spec`.

    Raises:
        FileNotFoundError: `spec` is neither.
    """
    from engine.state import checkpoint

    path = Path(spec).expanduser()
    if path.is_dir() and not (path / "meta.json").is_file():
        found = checkpoint.list_checkpoints(path) or checkpoint.list_checkpoints(checkpoint.checkpoint_root(path))
        if found:
            path = found[-1]
    if not (path / "meta.json").is_file():
        raise FileNotFoundError(f"engine.head.init_from: {spec!r} is not an ArcScale checkpoint (no "
                                f"{path / 'meta.json'}); expected a step_<N> directory, a checkpoints/ directory "
                                "or an output_dir holding some")
    return path


def load_head_init(trainer, spec: str) -> Path:
    """Copy the class centres `spec` names into `trainer.head` (all ranks; each takes the rows of its own
    classes): an ArcScale checkpoint, or arcface_torch's Partial FC shards (`arcface_torch_head_shards`). The
    head's optimizer state and sampling step stay fresh.

    Raises:
        FileNotFoundError: neither an ArcScale checkpoint nor arcface_torch's files.
        ValueError: another class count or embedding size than this run's (both named), an incomplete set of
            shards, or an unreadable file.
    """
    from engine.state import checkpoint

    head = trainer.head
    arcface = arcface_torch_head_shards(spec)
    if arcface:
        where = f"engine.head.init_from: arcface_torch's {arcface[0].parent}/{arcface[0].name.rsplit('_', 1)[0]}_*.pt"
        path, (shards, meta) = arcface[0].parent, _arcface_torch_shards(arcface, head.weight.shape[1], where)
    else:
        path = resolve_checkpoint_dir(spec)
        state, shards = checkpoint.read(path, (head.class_start, head.class_start + head.num_local))
        meta, where = state["meta"], f"engine.head.init_from: checkpoint {path}"
    step = head.step
    # load_head fills the weight rows and the optimizer's row state; the latter goes to a throw-away optimizer
    centres_only = types.SimpleNamespace(head=head, head_optimizer=types.SimpleNamespace(
        state=collections.defaultdict(dict)))
    checkpoint.load_head(centres_only, shards, {**meta, "head_step": step}, where=where)
    head.step = step
    if not bool(torch.isfinite(head.weight.detach()).all()):
        raise ValueError(f"{where}: the class centres of this rank's classes hold inf or NaN; refusing to start "
                         "from them")
    source = f"{len(arcface)} arcface_torch shard(s) in {path}" if arcface else str(path)
    log.info(f"engine.head.init_from: class centres of {meta['num_classes']:,} classes from {source}")
    return path


# arcface_torch's per-rank files holding its Partial FC shard: train_v2.py's save_all_states checkpoint
# (``state_dict_softmax_fc``), and before it (2021-2022) the head's own state_dict in softmax_fc_gpu_<rank>.pt.
ARCFACE_TORCH_HEAD_FILES = ("checkpoint_gpu_", "softmax_fc_gpu_")


def arcface_torch_head_shards(spec: str) -> List[Path]:
    """arcface_torch's per-rank head files that `spec` names, in rank order: `spec` is one of them (its
    siblings are the others) or the folder holding them; [] when it names none (an ArcScale checkpoint).

    Raises:
        ValueError: the ranks' numbers are not 0 .. N-1 (a shard is missing: named).
    """
    path = Path(spec).expanduser()
    if path.is_file():
        prefixes = [p for p in ARCFACE_TORCH_HEAD_FILES if path.name.startswith(p) and path.suffix == ".pt"]
        if not prefixes:
            return []
        folder = path.parent
    elif path.is_dir() and not (path / "meta.json").is_file():
        folder, prefixes = path, list(ARCFACE_TORCH_HEAD_FILES)
    else:
        return []
    for prefix in prefixes:
        files = {}
        for f in folder.glob(f"{prefix}*.pt"):
            number = f.name[len(prefix):-len(".pt")]
            if number.isdigit():
                files[int(number)] = f
        if files:
            missing = sorted(set(range(max(files) + 1)) - set(files))
            if missing:
                raise ValueError(f"engine.head.init_from: {folder} has arcface_torch head shards {prefix}<rank>.pt "
                                 f"of ranks {sorted(files)} but not of rank(s) {missing}: every rank's file is "
                                 "needed (each holds its own block of classes)")
            return [files[r] for r in range(len(files))]
    return []


def _arcface_torch_shards(files: List[Path], embedding_size: int, where: str):
    """(shards, meta) for checkpoint.load_head from arcface_torch's per-rank files: rank r's ``weight`` holds
    classes [class_start, class_start + rows) of arcface_torch's split (the same contiguous split as
    heads.partial_fc.shard_range), so the files' row counts give the class count and every shard's range.
    Each file is opened memory-mapped; a rank copies only the rows of the shards overlapping its classes."""
    from engine.state.weights import load_weights_only
    from heads.partial_fc import shard_range

    weights = []
    for f in files:
        try:
            saved = load_weights_only(f)
        except Exception as exc:  # noqa: BLE001 - ReadError names the file
            raise ValueError(f"{where}: {exc}") from None
        fc = saved.get("state_dict_softmax_fc", saved) if isinstance(saved, dict) else None
        weight = fc.get("weight") if isinstance(fc, dict) else None
        if not torch.is_tensor(weight) or weight.dim() != 2 or not weight.is_floating_point():
            raise ValueError(f"{where}: {f} holds no Partial FC shard (expected 'state_dict_softmax_fc' with a "
                             "2-D 'weight', as arcface_torch's train_v2.py saves with save_all_states)")
        if weight.shape[1] != embedding_size:
            raise ValueError(f"{where}: {f}'s class centres have embedding size {weight.shape[1]}; this run's "
                             f"engine.model.embedding_size is {embedding_size}")
        weights.append(weight)
    total, world = sum(int(w.shape[0]) for w in weights), len(weights)
    shards = []
    for rank, (f, weight) in enumerate(zip(files, weights)):
        start, rows = shard_range(total, rank, world)
        if rows != weight.shape[0]:
            raise ValueError(f"{where}: {f} holds {weight.shape[0]} classes, but arcface_torch's split of "
                             f"{total:,} classes over {world} ranks gives rank {rank} {rows}; the files are not "
                             "one run's complete set")
        entry = {"class_start": start, "num_local": rows}
        shards.append((entry, lambda w=weight: {"weight": w, "rows": {}, "other": {}}))
    return shards, {"num_classes": total, "embedding_size": embedding_size}


def say_resume_wins(resume_path: Path, model_init: Optional[str], head_init: Optional[str]) -> None:
    """Log that the init_from files are not read because the run resumes from a checkpoint."""
    if model_init or head_init:
        names = " and ".join(n for n, v in (("engine.model.init_from", model_init),
                                            ("engine.head.init_from", head_init)) if v)
        log.info(f"resuming from {resume_path}: {names} not loaded (a resumed run continues from its "
                 "checkpoint's weights)")
