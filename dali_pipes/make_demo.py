"""The embedded demo dataset: synthetic identities as a real insightface rec plus a held-out ``.bin``.

    python -m dali_pipes.make_demo --out DIR [--identities N] [--images-per-identity K] [--seed S]
        [--layout rec|folder] [--eval-identities M] [--eval-pairs P]

Writes ``DIR/train.rec``, ``train.idx``, ``property`` (insightface layout, 112x112 JPEG), or with ``--layout
folder`` one sub-folder of JPEG files per identity (``DIR/id_00000/000.jpg``, the layout ``engine.data.source:
folder`` and ``dali_pipes.pack`` read: stand-ins for a user's own faces), ``DIR/val.bin`` (insightface
verification format: pickle of ``(list of JPEG bytes, list of bool)``, consecutive pairs) made of identities
that are NOT in the training set, and ``DIR/meta.json`` (the parameters; written last, it marks the directory
complete).

Every identity is a face drawn with Pillow from its own parameters: face outline and size, skin tone, hair
colour and style, eye spacing/size/colour, brows, nose, mouth, and sometimes glasses, a beard or a mole.
Every image re-draws that face under a new nuisance: head pose (rotation, shift, scale, yaw-like squash),
expression (mouth curve, eye opening), lighting (gain, colour cast, a shading gradient), a random cluttered
background, blur, sensor noise and JPEG quality. Backgrounds and lighting dominate raw pixel distances, so
raw pixels (and an untrained network) are poor at telling identities apart, while the identity factors are
consistent enough that a small network learns them in minutes and generalises to the held-out identities.

Measured with the defaults (held-out identities, 10-fold accuracy with flip TTA, 2 shared CPU cores): raw
pixels 0.61-0.69, untrained mbf 0.67-0.71 (3 seeds); mbf (embedding 128, CosFace s=32 m=0.2, SGD lr 0.1
poly, batch 32, flip) after 40 steps 0.875 and after 80 steps (2560 images, ~4 minutes at ~10 images/s) 0.93.
Generation of the default set takes ~7 s on 2 cores.

Output is a pure function of the arguments (per-identity and per-image generators seeded by
``(seed, identity, image)``), whatever the number of worker processes.
"""
from __future__ import annotations

import argparse
import io
import json
import math
import multiprocessing as mp
import os
import pickle
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from dali_pipes.augment import IMAGE_SIZE
from dali_pipes.pack import write_insightface_rec

__all__ = ["DEFAULTS", "VERSION", "make_demo", "is_complete", "render_face", "identity_params", "main"]

VERSION = 1
# Sized for the quickstart (mbf, 64-class head): on 2 CPU cores mbf trains at ~10 images/s, so ~4 minutes
# is ~2500 images (80 steps of 32); a few classes seen often learn faster than many seen rarely.
DEFAULTS = dict(identities=64, images_per_identity=32, eval_identities=60, eval_images_per_identity=6,
                eval_pairs=200, seed=0)
BIN_NAME = "val.bin"
_EVAL_OFFSET = 1_000_003  # identity ids of the held-out set start here (never a training id)
_S = 2 * IMAGE_SIZE  # drawing resolution (supersampled 2x)

_SKIN = np.array([[255, 224, 196], [234, 192, 160], [198, 134, 96], [141, 85, 56], [90, 56, 37]], float)
_HAIR = np.array([[20, 18, 18], [60, 40, 25], [110, 72, 40], [200, 165, 100], [160, 70, 35], [150, 150, 150],
                  [235, 225, 205], [40, 40, 70]], float)
# per-image nuisance strengths (log-normal sigmas, uniform ranges); identity factors must outweigh them
NUISANCE = dict(gain=0.08, cast=0.03, shading=0.25, rotate=6.0, scale=0.06, squash=0.07, shift=0.035,
                noise=(2.0, 6.0), blur_p=0.3, blur=(0.3, 1.2))
_IRIS = np.array([[60, 40, 20], [40, 90, 160], [60, 120, 60], [30, 30, 30], [120, 90, 50]], float)


def _col(c: Any) -> tuple[int, ...]:
    return tuple(int(v) for v in np.clip(np.rint(c), 0, 255))


def identity_params(rng: np.random.Generator) -> dict:
    """The fixed appearance of one identity (fractions of the image side for geometry)."""
    tone = rng.uniform(0, len(_SKIN) - 1)
    lo = int(tone)
    skin = _SKIN[lo] + (tone - lo) * (_SKIN[min(lo + 1, len(_SKIN) - 1)] - _SKIN[lo]) + rng.normal(0, 16, 3)
    hair = _HAIR[rng.integers(len(_HAIR))] + rng.normal(0, 12, 3)
    if rng.random() < 0.3:  # dyed
        hair = rng.uniform(0, 255, 3)
    return dict(
        skin=skin,
        face_w=rng.uniform(0.44, 0.62), face_h=rng.uniform(0.60, 0.78), chin=rng.uniform(0.0, 0.10),
        face_cy=rng.uniform(0.50, 0.56),
        hair=hair, hair_style=int(rng.integers(6)),
        hair_line=rng.uniform(0.02, 0.12), hair_len=rng.uniform(0.1, 0.35),
        eye_y=rng.uniform(0.40, 0.50), eye_dx=rng.uniform(0.12, 0.22), eye_r=rng.uniform(0.030, 0.055),
        eye_aspect=rng.uniform(0.45, 0.8), iris=_IRIS[rng.integers(len(_IRIS))] + rng.normal(0, 10, 3),
        brow_gap=rng.uniform(0.04, 0.09), brow_thick=rng.uniform(0.012, 0.035), brow_tilt=rng.uniform(-0.04, 0.04),
        brow_len=rng.uniform(0.7, 1.5),
        nose_len=rng.uniform(0.08, 0.18), nose_w=rng.uniform(0.03, 0.08), nose_style=int(rng.integers(3)),
        mouth_y=rng.uniform(0.68, 0.80), mouth_w=rng.uniform(0.10, 0.22), lip_thick=rng.uniform(0.012, 0.04),
        lip=np.array([rng.uniform(120, 220), rng.uniform(40, 110), rng.uniform(50, 120)]),
        smile=rng.uniform(-0.03, 0.05),
        ear=rng.uniform(0.05, 0.10),
        glasses=bool(rng.random() < 0.25), glasses_round=bool(rng.random() < 0.5),
        frame=np.array(_col(rng.uniform(0, 200, 3))),
        beard=bool(rng.random() < 0.25), beard_len=rng.uniform(0.04, 0.14),
        mole=bool(rng.random() < 0.35), mole_xy=(rng.uniform(-0.2, 0.2), rng.uniform(0.5, 0.75)),
    )


def _background(rng: np.random.Generator) -> Any:
    """A random two-colour gradient with a few random shapes on it (112x112 RGB)."""
    from PIL import Image, ImageDraw

    n = IMAGE_SIZE
    c0, c1 = rng.uniform(0, 255, 3).astype(np.float32), rng.uniform(0, 255, 3).astype(np.float32)
    t = np.linspace(0, 1, n, dtype=np.float32)
    angle = rng.uniform(0, 2 * math.pi)
    ramp = math.cos(angle) * t[None, :] + math.sin(angle) * t[:, None]
    ramp = (ramp - ramp.min()) / max(float(ramp.max() - ramp.min()), 1e-6)
    img = Image.fromarray((c0 + ramp[..., None] * (c1 - c0)).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(3, 10))):  # clutter
        x0, y0 = rng.uniform(-0.2, 1.0, 2) * n
        w, h = rng.uniform(0.1, 0.6, 2) * n
        fill = _col(rng.uniform(0, 255, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x0, y0, x0 + w, y0 + h], fill=fill)
    return img


def render_face(p: dict, rng: np.random.Generator, quality: int | None = None) -> bytes:
    """One JPEG of identity ``p`` under random pose, expression, lighting, background and noise."""
    from PIL import Image, ImageDraw, ImageFilter

    S = _S
    face = Image.new("RGBA", (S, S), (0, 0, 0, 0))
    d = ImageDraw.Draw(face)
    cx, cy = S / 2, p["face_cy"] * S
    fw, fh = p["face_w"] * S, p["face_h"] * S
    top, bottom = cy - fh / 2, cy + fh / 2
    skin, hair = _col(p["skin"]), _col(p["hair"])
    style = p["hair_style"]
    # shoulders in clothes of a random colour (a per-image nuisance, as in real crops), neck
    shirt_w = rng.uniform(0.75, 1.1) * S
    d.ellipse([cx - shirt_w / 2, bottom + 0.02 * S, cx + shirt_w / 2, bottom + 0.6 * S],
              fill=_col(rng.uniform(0, 255, 3)))
    d.rectangle([cx - fw * 0.2, cy, cx + fw * 0.2, bottom + 0.06 * S], fill=_col(p["skin"] * 0.9))
    # hair behind the head (long styles)
    if style in (2, 5):
        d.rounded_rectangle([cx - fw * 0.62, top - fh * 0.05, cx + fw * 0.62, cy + p["hair_len"] * S],
                            radius=int(fw * 0.3), fill=hair)
    # ears, face, chin
    ear = p["ear"] * S
    for sx in (-1, 1):
        ex = cx + sx * fw / 2
        d.ellipse([ex - ear * 0.6, cy - ear, ex + ear * 0.6, cy + ear], fill=_col(p["skin"] * 0.92))
    d.ellipse([cx - fw / 2, top, cx + fw / 2, bottom], fill=skin)
    if p["chin"] > 0.01:
        d.polygon([(cx - fw * 0.3, bottom - fh * 0.2), (cx + fw * 0.3, bottom - fh * 0.2),
                   (cx, bottom + p["chin"] * S)], fill=skin)
    # hair on top
    hl = top + p["hair_line"] * S
    if style != 0:
        d.chord([cx - fw * 0.55, top - fh * 0.12, cx + fw * 0.55, hl + fh * 0.35], 180, 360, fill=hair)
    if style == 3:  # fringe
        d.rectangle([cx - fw * 0.42, hl, cx + fw * 0.42, hl + fh * 0.12], fill=hair)
    if style == 4:  # side part / asymmetric sweep
        d.polygon([(cx - fw * 0.5, hl), (cx + fw * 0.1, hl - fh * 0.05), (cx - fw * 0.45, hl + fh * 0.2)], fill=hair)
    if style == 5:  # curls
        for k in range(7):
            a = math.pi * (k / 6.0)
            r = fw * 0.5
            x, y = cx - r * math.cos(a), top + fh * 0.15 - r * 0.5 * math.sin(a)
            d.ellipse([x - fw * 0.12, y - fw * 0.12, x + fw * 0.12, y + fw * 0.12], fill=hair)
    # eyes (openness varies per image) and brows
    open_ = rng.uniform(0.55, 1.0)
    ey = p["eye_y"] * S
    er = p["eye_r"] * S
    for sx in (-1, 1):
        ex = cx + sx * p["eye_dx"] * S
        eh = er * p["eye_aspect"] * open_
        d.ellipse([ex - er, ey - eh, ex + er, ey + eh], fill=(245, 245, 240))
        ir = min(er * 0.55, eh * 1.2)
        gaze = rng.normal(0, 0.15) * er
        d.ellipse([ex + gaze - ir, ey - ir, ex + gaze + ir, ey + ir], fill=_col(p["iris"]))
        d.ellipse([ex + gaze - ir * 0.4, ey - ir * 0.4, ex + gaze + ir * 0.4, ey + ir * 0.4], fill=(10, 10, 10))
        by = ey - er - p["brow_gap"] * S
        bl = er * p["brow_len"]
        d.line([(ex - bl, by + sx * p["brow_tilt"] * S), (ex + bl, by - sx * p["brow_tilt"] * S)],
               fill=_col(p["hair"] * 0.8), width=max(1, int(p["brow_thick"] * S)))
    # nose
    ny0, ny1 = ey + er * 0.5, ey + er * 0.5 + p["nose_len"] * S
    nw = p["nose_w"] * S
    shade = _col(p["skin"] * 0.75)
    if p["nose_style"] == 0:
        d.line([(cx, ny0), (cx - nw * 0.4, ny1), (cx + nw * 0.4, ny1)], fill=shade, width=3)
    elif p["nose_style"] == 1:
        d.polygon([(cx, ny0), (cx - nw / 2, ny1), (cx + nw / 2, ny1)], fill=_col(p["skin"] * 0.85))
    else:
        d.ellipse([cx - nw / 2, ny1 - nw * 0.4, cx + nw / 2, ny1 + nw * 0.2], fill=shade)
    # mouth (curvature varies per image: expression)
    my = p["mouth_y"] * S
    mw = p["mouth_w"] * S
    curve = (p["smile"] + rng.normal(0, 0.015)) * S
    pts = [(cx + mw * (t - 0.5) * 2, my - curve * (1 - (2 * t - 1) ** 2) + curve * 0.5) for t in np.linspace(0, 1, 9)]
    d.line(pts, fill=_col(p["lip"]), width=max(2, int(p["lip_thick"] * S)), joint="curve")
    if p["beard"]:
        d.chord([cx - fw * 0.48, my - fh * 0.08, cx + fw * 0.48, bottom + p["beard_len"] * S], 0, 180,
                fill=_col(p["hair"] * 0.9))
        d.line(pts, fill=_col(p["lip"]), width=max(2, int(p["lip_thick"] * S)), joint="curve")
    if p["mole"]:
        mx, myy = cx + p["mole_xy"][0] * fw, top + p["mole_xy"][1] * fh
        d.ellipse([mx - 3, myy - 3, mx + 3, myy + 3], fill=(60, 35, 25))
    if p["glasses"]:
        frame = _col(p["frame"])
        gr = er * 1.7
        for sx in (-1, 1):
            ex = cx + sx * p["eye_dx"] * S
            box = [ex - gr, ey - gr * 0.8, ex + gr, ey + gr * 0.8]
            (d.ellipse if p["glasses_round"] else d.rectangle)(box, outline=frame, width=4)
        d.line([(cx - p["eye_dx"] * S + gr, ey), (cx + p["eye_dx"] * S - gr, ey)], fill=frame, width=4)

    # pose: rotation, scale, yaw-like horizontal squash, shift (inverse map for Image.transform), applied
    # after the 2x supersampled drawing is reduced to the output size
    face = face.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR)
    n = IMAGE_SIZE
    nz = NUISANCE
    angle = math.radians(float(np.clip(rng.normal(0, nz["rotate"]), -2 * nz["rotate"], 2 * nz["rotate"])))
    scale = float(np.exp(rng.normal(0, nz["scale"])))
    squash = float(np.clip(1 + rng.normal(0, nz["squash"]), 0.8, 1.15))
    tx, ty = rng.normal(0, nz["shift"] * n, 2)
    ca, sa = math.cos(angle), math.sin(angle)
    a = np.array([[ca / (scale * squash), sa / (scale * squash)], [-sa / scale, ca / scale]])
    c = np.array([n / 2, n / 2])
    off = c - a @ (c + np.array([tx, ty]))
    coeffs = (a[0, 0], a[0, 1], off[0], a[1, 0], a[1, 1], off[1])
    face = face.transform((n, n), Image.AFFINE, coeffs, resample=Image.BILINEAR)
    img = _background(rng)
    img = Image.alpha_composite(img.convert("RGBA"), face).convert("RGB")
    if rng.random() < nz["blur_p"]:
        img = img.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(*nz["blur"]))))
    # lighting: gain, colour cast, shading gradient; then sensor noise
    x = np.asarray(img, dtype=np.float32)
    gain = float(np.exp(rng.normal(0, nz["gain"])))
    cast = np.exp(rng.normal(0, nz["cast"], 3)).astype(np.float32)
    g = np.linspace(-1, 1, IMAGE_SIZE, dtype=np.float32)
    theta = rng.uniform(0, 2 * math.pi)
    shading = 1 + rng.uniform(0, nz["shading"]) * (math.cos(theta) * g[None, :] + math.sin(theta) * g[:, None])
    sigma = np.float32(rng.uniform(*nz["noise"]))
    x = x * gain * cast * shading[..., None] + sigma * rng.standard_normal(x.shape, dtype=np.float32)
    img = Image.fromarray(np.clip(np.rint(x), 0, 255).astype(np.uint8), "RGB")
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=int(quality if quality is not None else rng.integers(70, 96)))
    return out.getvalue()


def _render_identity(args: tuple[int, int, int]) -> list[bytes]:
    seed, identity, count = args
    p = identity_params(np.random.default_rng([seed, identity, 0]))
    return [render_face(p, np.random.default_rng([seed, identity, 1, k])) for k in range(count)]


LAYOUTS = ("rec", "folder")


def is_complete(out: str | os.PathLike) -> bool:
    """Whether ``out`` holds a finished demo set (in the rec layout) of this generator version."""
    out = Path(out)
    try:
        meta = json.loads((out / "meta.json").read_text())
    except (OSError, ValueError):
        return False
    files = ("train.rec", "train.idx", "property", BIN_NAME)
    return meta.get("version") == VERSION and meta.get("layout", "rec") == "rec" and all(
        (out / f).is_file() for f in files)


def make_demo(out: str | os.PathLike, *, identities: int = DEFAULTS["identities"],
              images_per_identity: int = DEFAULTS["images_per_identity"],
              eval_identities: int = DEFAULTS["eval_identities"],
              eval_images_per_identity: int = DEFAULTS["eval_images_per_identity"],
              eval_pairs: int = DEFAULTS["eval_pairs"], seed: int = DEFAULTS["seed"],
              workers: int | None = None, progress: bool = False, layout: str = "rec") -> dict:
    """Generate the demo set into ``out`` (see module docstring); return its ``meta.json`` contents.

    ``layout``: ``"rec"`` (insightface RecordIO) or ``"folder"`` (a sub-folder of JPEG files per identity); the
    same images either way.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"--layout: expected one of {', '.join(LAYOUTS)}, got {layout!r}")
    if identities < 1 or images_per_identity < 1:
        raise ValueError(f"need identities >= 1 and images_per_identity >= 1, got {identities}, {images_per_identity}")
    if eval_identities < 2 or eval_images_per_identity < 2 or eval_pairs < 2:
        raise ValueError("the held-out .bin needs eval_identities >= 2, eval_images_per_identity >= 2, eval_pairs >= 2")
    start = time.monotonic()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    workers = workers or min(os.cpu_count() or 1, 8)
    jobs = [(seed, i, images_per_identity) for i in range(identities)]
    jobs += [(seed, _EVAL_OFFSET + j, eval_images_per_identity) for j in range(eval_identities)]
    try:
        if workers > 1:
            ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()
            with ctx.Pool(workers) as pool:
                rendered = pool.map(_render_identity, jobs, chunksize=4)
        else:
            rendered = [_render_identity(j) for j in jobs]
        train, held_out = rendered[:identities], rendered[identities:]
        if layout == "rec":
            labels = [i for i in range(identities) for _ in range(images_per_identity)]
            write_insightface_rec(tmp, (b for imgs in train for b in imgs), labels, identities)
        else:
            for i, imgs in enumerate(train):
                (tmp / f"id_{i:05d}").mkdir()
                for k, jpeg in enumerate(imgs):
                    (tmp / f"id_{i:05d}" / f"{k:03d}.jpg").write_bytes(jpeg)
        bins, issame = _pairs(held_out, eval_pairs, np.random.default_rng([seed, 2]))
        with open(tmp / BIN_NAME, "wb") as f:
            pickle.dump((bins, issame), f, protocol=4)
        meta = dict(version=VERSION, layout=layout, identities=identities, images_per_identity=images_per_identity,
                    num_images=identities * images_per_identity, eval_identities=eval_identities,
                    eval_images_per_identity=eval_images_per_identity, eval_pairs=eval_pairs, seed=seed,
                    bin=BIN_NAME, image_size=IMAGE_SIZE)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
        _publish(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if progress:
        print(f"wrote {out}: {meta['num_images']} images of {identities} identities, {eval_pairs} held-out pairs "
              f"in {time.monotonic() - start:.1f} s", file=sys.stderr)
    return meta


def _pairs(held_out: list[list[bytes]], num_pairs: int, rng: np.random.Generator) -> tuple[list[bytes], list[bool]]:
    """Half same-identity, half different-identity pairs of held-out images, in random order."""
    num_ids = len(held_out)
    bins: list[bytes] = []
    issame = [k < (num_pairs + 1) // 2 for k in range(num_pairs)]
    issame = [issame[k] for k in rng.permutation(num_pairs)]
    for same in issame:
        if same:
            i = int(rng.integers(num_ids))
            a, b = rng.choice(len(held_out[i]), 2, replace=False)
            bins += [held_out[i][a], held_out[i][b]]
        else:
            i, j = rng.choice(num_ids, 2, replace=False)
            bins += [held_out[i][int(rng.integers(len(held_out[i])))], held_out[j][int(rng.integers(len(held_out[j])))]]
    return bins, [bool(s) for s in issame]


def _publish(tmp: Path, out: Path) -> None:
    """Move the finished files into ``out``; meta.json last, so a crash never looks complete."""
    try:
        os.rename(tmp, out)  # out did not exist (or was empty): one atomic step
        return
    except OSError:
        pass
    out.mkdir(parents=True, exist_ok=True)
    (out / "meta.json").unlink(missing_ok=True)
    for path in sorted(tmp.iterdir(), key=lambda p: p.name == "meta.json"):
        if path.is_dir():
            shutil.rmtree(out / path.name, ignore_errors=True)  # an identity folder of an earlier set
        os.replace(path, out / path.name)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dali_pipes.make_demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--identities", type=int, default=DEFAULTS["identities"], help="training identities")
    parser.add_argument("--images-per-identity", type=int, default=DEFAULTS["images_per_identity"])
    parser.add_argument("--eval-identities", type=int, default=DEFAULTS["eval_identities"],
                        help="held-out identities in the .bin")
    parser.add_argument("--eval-pairs", type=int, default=DEFAULTS["eval_pairs"], help="pairs in the .bin")
    parser.add_argument("--seed", type=int, default=DEFAULTS["seed"])
    parser.add_argument("--workers", type=int, default=None, help="processes (default: CPU count, at most 8)")
    parser.add_argument("--layout", choices=LAYOUTS, default="rec",
                        help="rec: insightface train.rec/.idx/property (default); folder: a sub-folder of JPEG "
                             "files per identity")
    args = parser.parse_args(argv)
    try:
        make_demo(args.out, identities=args.identities, images_per_identity=args.images_per_identity,
                  eval_identities=args.eval_identities, eval_pairs=args.eval_pairs, seed=args.seed,
                  workers=args.workers, progress=True, layout=args.layout)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
