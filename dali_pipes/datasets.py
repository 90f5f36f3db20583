"""The public insightface training sets, by the folder name they are distributed under: what a recipe's
`engine.data.path` names, what belongs in that folder, and the published sizes.

An insightface RecordIO training folder holds ``train.rec`` (the records), ``train.idx`` (their offsets),
``property`` (``<identities>,112,112``) and, for most sets, the verification sets ``lfw.bin``, ``cfp_fp.bin`` and
``agedb_30.bin`` beside them (arcface_torch's ``val_targets`` are looked up there by name). The sizes below are the
ones arcface_torch's configs state (``num_classes``, ``num_image``); the data itself is always the authority when it
is present (`property` and the index are read, never this table). The table serves where the data is absent: the
message of a run whose folder is missing, a synthetic throughput run shaped like the set, and `engine.plan`.

No heavy imports: engine.config reads this before start-up.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Tuple

# What an insightface RecordIO folder holds (train.rec's index and the class-count file beside it).
RECORDIO_FILES = ("train.rec", "train.idx", "property")
# arcface_torch's val_targets: verification sets shipped beside train.rec.
VERIFICATION_SETS = ("lfw", "cfp_fp", "agedb_30")


@dataclass(frozen=True)
class KnownDataset:
    """One public training set: its name, published identity and image counts, the verification sets its
    folder ships."""

    name: str
    num_classes: int
    num_images: int
    verification: Tuple[str, ...] = VERIFICATION_SETS


# folder name -> the set (arcface_torch's configs: config.rec = "/train_tmp/<folder>")
KNOWN: Dict[str, KnownDataset] = {
    "faces_emore": KnownDataset("MS1MV2", 85742, 5822653),
    "ms1m-retinaface-t1": KnownDataset("MS1MV3", 93431, 5179510),
    "glint360k": KnownDataset("Glint360K", 360232, 17091657),
    "WebFace4M": KnownDataset("WebFace4M", 205990, 4235242),
    "WebFace12M": KnownDataset("WebFace12M", 617970, 12720066, ()),
    "WebFace42M": KnownDataset("WebFace42M", 2059906, 42474557, ()),
}


def folder_of(path: str | os.PathLike) -> Path:
    """The dataset folder `engine.data.path` names: the path itself, or the folder of a ``.rec`` file."""
    path = Path(path).expanduser()
    return path.parent if path.suffix == ".rec" else path


def known(path: Optional[str | os.PathLike]) -> Optional[KnownDataset]:
    """The public set whose folder `path` names (by its last component), or None."""
    if not path:
        return None
    return KNOWN.get(folder_of(path).name)


def read_property(path: str | os.PathLike) -> Optional[int]:
    """The identity count in the ``property`` file of the folder `path` names, or None when there is none (or
    it is not ``<identities>,<height>,<width>``)."""
    try:
        text = (folder_of(path) / "property").read_text().strip()
        return int(text.split(",")[0])
    except (OSError, ValueError):
        return None


def missing_files(path: str | os.PathLike) -> Tuple[str, ...]:
    """The RecordIO files a training folder lacks (``property`` is optional: the header record also counts the
    identities); all of them when the folder does not exist."""
    folder = folder_of(path)
    if Path(path).expanduser().suffix == ".rec":
        rec = Path(path).expanduser()
        needed = {rec.name: rec, rec.with_suffix(".idx").name: rec.with_suffix(".idx")}
    else:
        needed = {name: folder / name for name in RECORDIO_FILES[:2]}
    return tuple(name for name, p in needed.items() if not p.is_file())
