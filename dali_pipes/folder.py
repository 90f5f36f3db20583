"""Image-folder datasets: one sub-folder per identity, labels from the sorted folder names.

``root/<identity>/<image>``: identities are the sorted names of the non-hidden sub-folders of ``root`` and get
labels ``0 .. C-1`` in that order; images inside an identity folder are its files with an extension of a format
Pillow can open (``image_extensions()``: JPEG, PNG, BMP, WebP, PGM/PPM/PBM, TIFF, GIF, ...), sorted by name.
``dali_pipes.pack`` writes a rec with the same samples in the same order, so a folder and the rec packed from it
give the same batches.
"""
from __future__ import annotations

import functools
import os
from pathlib import Path

__all__ = ["image_extensions", "scan_image_folder", "FolderSource"]

# Formats Pillow identifies but cannot decode without other software (or that are not pictures of faces).
_UNDECODABLE = {"BUFR", "GRIB", "HDF5", "WMF", "MPEG", "EPS"}


@functools.lru_cache(maxsize=None)
def image_extensions() -> tuple[str, ...]:
    """File extensions (lower case, with the dot) of every image format this Pillow can open."""
    from PIL import Image

    Image.init()
    return tuple(sorted(ext for ext, fmt in Image.registered_extensions().items()
                        if fmt in Image.OPEN and fmt not in _UNDECODABLE))


def scan_image_folder(root: str | os.PathLike) -> tuple[list[Path], list[int], list[str]]:
    """List ``(files, labels, identity_names)`` of a folder-per-identity tree, in label-then-name order.

    Raises:
        FileNotFoundError: ``root`` is not a directory.
        ValueError: no identity folders, or an identity folder holds no image (named in the message).
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    identities = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not identities:
        raise ValueError(f"{root}: no identity sub-folders; expected one folder of images per identity")
    extensions = image_extensions()
    files: list[Path] = []
    labels: list[int] = []
    for label, name in enumerate(identities):
        folder = root / name
        images = sorted(
            p for p in folder.iterdir()
            if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in extensions
        )
        if not images:
            raise ValueError(
                f"{folder}: empty identity folder (no image file Pillow can open, e.g. .jpg/.png/.bmp/.pgm); "
                f"every identity needs at least one image"
            )
        files.extend(images)
        labels.extend([label] * len(images))
    return files, labels, identities


class FolderSource:
    """Sample source over an image folder (see module docstring); safe to use from DataLoader workers."""

    kind = "folder"

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.files, self.labels, self.identities = scan_image_folder(self.root)
        self.num_images = len(self.files)
        self.num_classes = len(self.identities)

    def read(self, index: int) -> tuple[bytes, float]:
        """``(encoded image bytes, label)`` of sample ``index``."""
        return self.files[index].read_bytes(), float(self.labels[index])

    def where(self, index: int) -> str:
        return str(self.files[index])

    def describe(self) -> str:
        return str(self.root)

    def close(self) -> None:
        pass
