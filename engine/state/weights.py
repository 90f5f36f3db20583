"""Reading tensors from files without running code: the one weights-only ``torch.load`` of the engine
(`load_weights_only`, used for checkpoints too), and backbone weights from ArcScale's ``model.pt``,
arcface_torch's ``.pth`` and the backbone part of its ``checkpoint_gpu_*.pt``.

Used by checkpoints (engine/state/checkpoint.py), the ONNX exporter, the IJB evaluation,
``engine.model.init_from`` (engine/state/pretrained.py) and any tool that needs a trained backbone as a plain
module.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import torch
from torch import nn

from engine.runtime.fileio import ReadError

__all__ = ["load_weights_only", "read_state_dict", "load_backbone", "model_settings"]


def load_weights_only(path: Union[str, os.PathLike], *, mmap: bool = True) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU: tensors and containers only, nothing in the file can
    run code (any other pickle is refused).

    With `mmap`, tensors stay memory-mapped from the file (pages are read when a tensor is used), so a caller
    that copies one tensor at a time into a sharded model, or a rank that needs a few rows of a head shard,
    never holds the whole file in memory; a file in torch's legacy (pre-1.6, non-zip) format cannot be mapped
    and is read whole.

    Raises:
        ReadError: naming `path`: missing, or unreadable (truncated, corrupt, not weights-only; the error
            torch gave is in the message and in `detail`). torch alone reports a truncated file as
            ``PytorchStreamReader failed ...``, without the file.
    """
    path = Path(path)
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except RuntimeError as exc:
            if not (mmap and "mmap" in str(exc)):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)  # legacy format: no mmap
    except FileNotFoundError:
        raise ReadError(f"{path}: missing", "missing") from None
    except Exception as exc:  # zip, pickle and unpickling errors of every kind: name the file
        text = str(exc).strip()
        detail = f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"
        raise ReadError(f"{path}: unreadable ({detail})", detail) from None


def read_state_dict(path: Union[str, Path], *, what: str = "--model",
                    mmap: bool = False) -> Dict[str, torch.Tensor]:
    """The backbone state_dict stored in `path`, as saved (dtypes kept), read without running any code.

    Read by `load_weights_only` (nothing in the file can run code); with `mmap` the tensors stay mapped.

    Args:
        path: ArcScale ``model.pt`` or arcface_torch ``.pth`` (a state_dict), or an arcface_torch
            ``checkpoint_gpu_*.pt`` (a dict with ``state_dict_backbone``).
        what: the option or config key that named the file, for error messages.
        mmap: memory-map the tensors instead of reading them.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a weights-only torch file, or not a mapping of names to tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what}: weights file {path} not found")
    try:
        weights = load_weights_only(path, mmap=mmap)
    except ReadError as exc:  # UnpicklingError for a pickle with arbitrary objects, or a corrupt file
        raise ValueError(f"{path}: not a weights-only torch file ({exc.detail}); expected a state_dict saved with "
                         "torch.save(model.state_dict())") from None
    if isinstance(weights, Mapping) and "state_dict_backbone" in weights:
        weights = weights["state_dict_backbone"]  # arcface_torch's save_all_states checkpoint
    if not isinstance(weights, Mapping) or not weights or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in weights.items()):
        raise ValueError(f"{path}: expected a state_dict (a mapping of parameter names to tensors), "
                         f"got {type(weights).__name__}")
    return dict(weights)


DEFAULT_EMBEDDING_SIZE = 512  # arcface_torch's embedding_size / num_features


def model_settings(model: Union[str, Path], backbone: Optional[str] = None,
                   embedding_size: Optional[int] = None, *, option: str = "--backbone") -> Tuple[str, int, str]:
    """(backbone name, embedding size, where they came from) for a weights file: as given, else from the run's
    resolved ``config.json`` beside it (``engine.model.name`` / ``embedding_size``, what engine.train writes
    next to ``model.pt``), else the embedding size arcface_torch's default (512) and the name an error.

    Raises:
        ValueError: no backbone given and no config.json beside the file to read it from (naming `option`),
            or an unreadable config.json.
    """
    import json

    if backbone is not None and embedding_size is not None:
        return backbone, int(embedding_size), "given"
    config = Path(model).expanduser().parent / "config.json"
    if config.is_file():
        try:
            section = json.loads(config.read_text())["engine"]["model"]
            name, size = str(section["name"]), int(section["embedding_size"])
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{config}: not a run's config.json with engine.model.name and embedding_size "
                             f"({type(exc).__name__}: {exc}); pass {option} and --embedding-size") from None
        return backbone or name, int(embedding_size or size), f"{config}"
    if backbone is None:
        raise ValueError(f"{option}: required for {model} (no run config.json beside it to read the backbone "
                         "from)")
    return backbone, DEFAULT_EMBEDDING_SIZE, "given (embedding size: the default 512)"


def load_backbone(path: Union[str, Path], name: str, *, embedding_size: int = 512) -> nn.Module:
    """Build backbone `name` and load the state_dict in `path` into it, strictly, in fp32 eval mode.

    The module is built on the meta device and takes the loaded tensors (``assign=True``), so an r2060 costs
    one copy of its weights in host memory, not two. The file is read by `read_state_dict` (weights only).

    Args:
        path: ArcScale ``model.pt`` or arcface_torch ``.pth`` (a state_dict); an arcface_torch
            ``checkpoint_gpu_*.pt`` (a dict with ``state_dict_backbone``) also works.
        name: backbone name (``backbones.list_backbones()``).
        embedding_size: the model's output width (arcface_torch's ``embedding_size``/``num_features``).

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a weights-only state_dict, or its keys/shapes do not fit the backbone (named).
    """
    import backbones

    path = Path(path)
    weights = read_state_dict(path)
    weights = {k: v.float() if v.is_floating_point() else v for k, v in weights.items()}
    model = backbones.build_backbone(name, embedding_size=embedding_size, device="meta")
    try:
        model.load_state_dict(weights, strict=True, assign=True)
    except RuntimeError as exc:
        detail = str(exc).replace("\n\t", " ").replace("\n", " ")
        raise ValueError(f"{path}: the weights do not fit backbone {name!r} with embedding_size "
                         f"{embedding_size}: {detail}") from None
    return model.eval()
