"""The training data's folder as a run needs it: present before anything heavy starts (`check_present`, one
line naming the path, what belongs there and the override for a synthetic throughput run), its verification
sets found by name beside ``train.rec`` (`engine.eval.targets`, as arcface_torch's ``val_targets``), and its
class count where the data is absent (`num_classes_hint`, for engine.plan).

What an insightface folder holds and the public sets' sizes are dali_pipes.datasets'.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, List, Optional, Tuple

from engine.config.files import ConfigError

SYNTHETIC_OVERRIDE = "--set engine.data.source=synthetic"


def _layout(targets: List[str]) -> str:
    from dali_pipes import datasets

    bins = ", ".join(f"{name}.bin" for name in targets)
    return ", ".join(datasets.RECORDIO_FILES) + (f" and the verification sets {bins}" if bins else "")


def check_present(cfg: Any) -> None:
    """The dataset `engine.data` names is there (recordio: train.rec and train.idx; folder: the directory), checked
    by the entry point before the process group and before any model is built. A synthetic run, or the demo set
    (generated on first use), needs nothing.

    Raises:
        ConfigError: one line: the path, what belongs there, and the override for a synthetic throughput run
            (with the class count to give it when the path names no public set).
    """
    from dali_pipes import datasets

    d = cfg.engine.data
    if d.source not in ("recordio", "folder") or not d.path:
        return
    path = Path(d.path).expanduser()
    synthetic = SYNTHETIC_OVERRIDE
    public = datasets.known(d.path)
    if public is None and cfg.engine.head.num_classes is None:
        synthetic += " --set engine.head.num_classes=N"
    if d.source == "folder":
        if not path.is_dir():
            raise ConfigError(f"engine.data.path: {d.path} not found: expected a folder with one sub-folder of "
                              f"images per identity; for a throughput run without data: {synthetic}")
        return
    missing = datasets.missing_files(path)
    if not missing:
        return
    what = f"{public.name} ({datasets.folder_of(path).name}), " if public else ""
    found = "not found" if not datasets.folder_of(path).exists() else f"lacks {', '.join(missing)}"
    raise ConfigError(f"engine.data.path: {d.path} {found}: expected {what}an insightface RecordIO folder with "
                      f"{_layout(list(cfg.engine.eval.targets))}; for a throughput run without data: {synthetic}")


def target_folder(cfg: Any) -> Optional[Path]:
    """The folder `engine.eval.targets` are looked up in: the training data's (the demo set's when that is the
    source)."""
    from dali_pipes import datasets

    d = cfg.engine.data
    if d.source == "demo":
        from dali_pipes.loader import ensure_demo

        return ensure_demo(d.path)
    return datasets.folder_of(d.path) if d.path else None


def resolve_targets(cfg: Any) -> Tuple[List[Path], List[str]]:
    """(paths of the `engine.eval.targets` found beside the training data, names of those missing)."""
    names = list(cfg.engine.eval.targets)
    if not names:
        return [], []
    folder = target_folder(cfg)
    found, missing = [], []
    for name in names:
        path = folder / f"{name}.bin"
        (found if path.is_file() else missing).append(path if path.is_file() else name)
    return found, missing


def check_targets(cfg: Any) -> None:
    """`engine.eval.targets` are names (``lfw``, not a path) of sets beside a named dataset folder.

    Raises:
        ConfigError: naming the entry.
    """
    ev, d = cfg.engine.eval, cfg.engine.data
    for i, name in enumerate(ev.targets):
        if not name or "/" in name or name.endswith(".bin"):
            raise ConfigError(f"engine.eval.targets[{i}]: expected the name of a verification set beside the "
                              f"training data (e.g. 'lfw' for <engine.data.path>/lfw.bin), got {name!r}; a .bin "
                              "elsewhere goes in engine.eval.bins")
    if ev.targets and not d.path and d.source != "demo":
        raise ConfigError(f"engine.eval.targets: {list(ev.targets)} are looked up beside the training data, but "
                          "engine.data.path is not set; set it, or list the files in engine.eval.bins")


def num_classes_hint(cfg: Any) -> Optional[int]:
    """The class count for a plan when `engine.head.num_classes` is left to the data: the ``property`` file of the
    folder `engine.data.path` names when it is here, else the published count of the public set it names."""
    from dali_pipes import datasets

    h, d = cfg.engine.head, cfg.engine.data
    if h.num_classes is not None:
        return h.num_classes
    if not d.path:
        return None
    counted = datasets.read_property(d.path)
    if counted is not None:
        return counted
    public = datasets.known(d.path)
    return public.num_classes if public else None


def synthetic_classes(cfg: Any) -> Optional[int]:
    """Synthetic data with `engine.head.num_classes` left out: the class count of the public set
    `engine.data.path` names (a throughput run shaped like it), else None."""
    from dali_pipes import datasets

    d = cfg.engine.data
    if d.source != "synthetic" or cfg.engine.head.num_classes is not None:
        return None
    public = datasets.known(d.path)
    return public.num_classes if public else None
