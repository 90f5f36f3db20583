"""Training augmentations, described once and run by either backend (DALI graph or numpy/Pillow).

The random decisions are NOT drawn by DALI's random operators: they are drawn here, in numpy, from a
generator seeded by ``(seed, epoch, batch position, rank)`` and fed to the pipeline as per-sample arguments.
That buys three things: a resumed job gets exactly the same augmented batches as an uninterrupted one; the
DALI pipeline and the torch fallback apply the same flips/colour changes to the same images (so their
outputs can be compared); and the thread count never changes the data.

Known names (the ``engine.data.augment`` list), with arcface_torch's DALI settings (``dali_data_iter`` with
``dali_aug=True``) as probabilities and ranges, applied in this order:

====== ===== ==================================================================================
name   p     what
====== ===== ==================================================================================
resize 0.1   down-up resize: to ``s x s`` with ``s`` uniform in [56, 89], then back to 112 (bilinear)
blur   0.2   Gaussian blur, 3x3 window, sigma 0.8 (DALI's default sigma for window 3)
hsv    0.2   hue rotation uniform in [0, 20) degrees and saturation scale uniform in [1, 1.2) (YIQ space)
gray   0.1   saturation 0 (gray, still 3 channels)
flip   0.5   horizontal flip (the default augmentation)
====== ===== ==================================================================================

``"arcface"`` is shorthand for all five. ``hsv`` and ``gray`` are one colour matrix (DALI's ``fn.hsv``
arithmetic, reproduced exactly by ``hsv_matrix``).
"""
from __future__ import annotations

import io
from typing import Iterable, Sequence

import numpy as np

__all__ = [
    "KNOWN_AUGMENTATIONS",
    "IMAGE_SIZE",
    "parse_augment",
    "sample_params",
    "hsv_matrix",
    "apply_numpy",
    "params_row",
    "decode_rgb",
    "payload_problem",
    "RESIZE_MODES",
    "ImageSizeError",
    "fit_image",
    "dali_payload",
    "image_size",
]

IMAGE_SIZE = 112
# engine.data.resize: what happens to an image that is not IMAGE_SIZE x IMAGE_SIZE (see fit_image)
RESIZE_MODES = ("none", "pad", "center_crop", "stretch")
KNOWN_AUGMENTATIONS = ("resize", "blur", "hsv", "gray", "flip")
_ALIASES = {"arcface": KNOWN_AUGMENTATIONS}

P_RESIZE, RESIZE_RANGE = 0.1, (56, 89)  # inclusive integer side range (arcface_torch: 112*0.5 .. 112*0.8)
P_BLUR, BLUR_WINDOW, BLUR_SIGMA = 0.2, 3, 0.8
P_HSV, HUE_RANGE, SAT_RANGE = 0.2, (0.0, 20.0), (1.0, 1.2)
P_GRAY = 0.1
P_FLIP = 0.5

# DALI's fn.hsv: RGB -> YIQ (these coefficients), rotate the chroma plane by -hue, scale it by saturation,
# scale Y by value, back with the exact inverse. Checked against DALI 2.4 to 1e-7.
_MAGICS = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"BM", b"GIF87a", b"GIF89a")
_DALI_MAGICS = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"BM")  # (and WebP) handed to DALI's decoder as they are

_RGB2YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.321], [0.211, -0.523, 0.311]])
_YIQ2RGB = np.linalg.inv(_RGB2YIQ)


def parse_augment(names: Iterable[str] | None) -> tuple[str, ...]:
    """Validate augmentation names and return them de-duplicated in application order.

    Raises:
        ValueError: an unknown name, listing the known ones.
    """
    if names is None:
        return ()
    if isinstance(names, str):
        names = [names]
    chosen: set[str] = set()
    for name in names:
        key = str(name).strip().lower()
        if key in ("", "none"):
            continue
        if key in _ALIASES:
            chosen.update(_ALIASES[key])
        elif key in KNOWN_AUGMENTATIONS:
            chosen.add(key)
        else:
            known = ", ".join(KNOWN_AUGMENTATIONS + tuple(_ALIASES))
            raise ValueError(f"engine.data.augment: unknown augmentation {name!r}; known: {known}")
    return tuple(n for n in KNOWN_AUGMENTATIONS if n in chosen)


def sample_params(names: Sequence[str], rng: np.random.Generator, batch_size: int) -> dict[str, np.ndarray]:
    """Draw one batch of per-sample augmentation parameters.

    Every array has ``batch_size`` rows and the dtype DALI wants for the argument it feeds. Draws happen in a
    fixed order whatever ``names`` holds, so adding one augmentation does not change the others' decisions.

    Returns:
        dict with ``flip`` (int32 0/1), ``resize`` (bool), ``resize_size`` (float32 [B, 2] = (h, w)),
        ``blur`` (bool), ``color`` (bool: apply the colour matrix), ``hue`` (float32 degrees),
        ``saturation`` (float32).
    """
    b = batch_size
    u = rng.random((6, b))
    size = rng.integers(RESIZE_RANGE[0], RESIZE_RANGE[1] + 1, size=b)
    resize = ("resize" in names) & (u[0] < P_RESIZE)
    blur = ("blur" in names) & (u[1] < P_BLUR)
    hsv = ("hsv" in names) & (u[2] < P_HSV)
    gray = ("gray" in names) & (u[3] < P_GRAY)
    flip = ("flip" in names) & (u[4] < P_FLIP)
    hue = np.where(hsv, HUE_RANGE[0] + (HUE_RANGE[1] - HUE_RANGE[0]) * u[5], 0.0)
    sat_draw = rng.uniform(*SAT_RANGE, size=b)
    saturation = np.where(hsv, sat_draw, 1.0) * np.where(gray, 0.0, 1.0)
    return dict(
        flip=flip.astype(np.int32),
        resize=np.asarray(resize, dtype=bool),
        resize_size=np.repeat(size.astype(np.float32)[:, None], 2, axis=1),
        blur=np.asarray(blur, dtype=bool),
        color=np.asarray(hsv | gray, dtype=bool),
        hue=hue.astype(np.float32),
        saturation=saturation.astype(np.float32),
    )


def params_row(params: dict[str, np.ndarray], i: int) -> dict[str, np.ndarray]:
    """The parameters of sample ``i`` of a batch drawn by ``sample_params``."""
    return {k: v[i] for k, v in params.items()}


def hsv_matrix(hue: float, saturation: float, value: float = 1.0) -> np.ndarray:
    """The 3x3 RGB -> RGB matrix DALI's ``fn.hsv`` applies (hue in degrees)."""
    t = np.deg2rad(-float(hue))
    c, s = np.cos(t) * saturation, np.sin(t) * saturation
    rot = np.array([[value, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])
    return _YIQ2RGB @ rot @ _RGB2YIQ


def _gaussian_kernel(window: int, sigma: float) -> np.ndarray:
    r = window // 2
    x = np.arange(-r, r + 1, dtype=np.float64)
    k = np.exp(-(x * x) / (2 * sigma * sigma))
    return k / k.sum()


def _blur(img: np.ndarray) -> np.ndarray:
    """Separable Gaussian blur with reflect-101 borders (DALI's border handling), rounded to uint8."""
    k = _gaussian_kernel(BLUR_WINDOW, BLUR_SIGMA)
    r = BLUR_WINDOW // 2
    x = img.astype(np.float32)
    p = np.pad(x, ((r, r), (0, 0), (0, 0)), mode="reflect")
    x = sum(k[i] * p[i : i + x.shape[0]] for i in range(BLUR_WINDOW))
    p = np.pad(x, ((0, 0), (r, r), (0, 0)), mode="reflect")
    x = sum(k[i] * p[:, i : i + x.shape[1]] for i in range(BLUR_WINDOW))
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def _resize(img: np.ndarray, height: int, width: int) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(img).resize((width, height), Image.BILINEAR))


def apply_numpy(img: np.ndarray, p: dict[str, np.ndarray]) -> np.ndarray:
    """Apply one sample's parameters to a uint8 HWC RGB image (the torch fallback's path).

    Same order and arithmetic as the DALI graph: down-up resize, blur, colour matrix, flip. Colour and flip
    are bit-exact with DALI; resize and blur agree up to resampling/rounding details.
    """
    h, w = img.shape[:2]
    if p["resize"]:
        s_h, s_w = (int(v) for v in p["resize_size"])
        img = _resize(_resize(img, s_h, s_w), h, w)
    if p["blur"]:
        img = _blur(img)
    if p["color"]:
        m = hsv_matrix(float(p["hue"]), float(p["saturation"])).astype(np.float32)
        out = img.reshape(-1, 3).astype(np.float32) @ m.T
        img = np.clip(np.rint(out), 0, 255).astype(np.uint8).reshape(img.shape)
    if p["flip"]:
        img = img[:, ::-1]
    return np.ascontiguousarray(img)


class ImageSizeError(ValueError):
    """An image is not IMAGE_SIZE x IMAGE_SIZE and engine.data.resize is "none" (a setting, not corruption)."""


def size_error(width: int, height: int, size: int | tuple[int, int] = IMAGE_SIZE) -> ImageSizeError:
    th, tw = (size, size) if isinstance(size, int) else size
    why = " (faces aligned to arcface's 112x112 template)" if (th, tw) == (IMAGE_SIZE, IMAGE_SIZE) else ""
    return ImageSizeError(f"image is {width}x{height}, expected {tw}x{th}{why}; set engine.data.resize to pad, "
                          "center_crop or stretch to use other sizes")


def fit_image(im, size: int | tuple[int, int] = IMAGE_SIZE, mode: str = "none"):
    """A Pillow image brought to `size` (an int: square; or (height, width)) as `mode` says; never resized
    silently.

    * ``none``: returned as it is when already of that size, else ImageSizeError.
    * ``stretch``: resized to the size (bilinear), aspect ratio not kept.
    * ``center_crop``: scaled (bilinear, aspect kept) until it covers the size, then the centre cut out.
    * ``pad``: scaled (bilinear, aspect kept) until it fits inside the size, then centred on a black canvas.

    The DALI pipeline does the same with ``fn.resize`` and ``fn.crop`` (dali_pipes.dali_pipe); the two agree up
    to resampling and rounding (a pixel of offset at most).
    """
    from PIL import Image

    th, tw = (size, size) if isinstance(size, int) else size
    w, h = im.size
    if (w, h) == (tw, th):
        return im
    if mode not in RESIZE_MODES:
        raise ValueError(f"engine.data.resize: expected one of {list(RESIZE_MODES)}, got {mode!r}")
    if mode == "none":
        raise size_error(w, h, (th, tw))
    if mode == "stretch":
        return im.resize((tw, th), Image.BILINEAR)
    scale = (max if mode == "center_crop" else min)(tw / w, th / h)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    if (nw, nh) != (w, h):
        im = im.resize((nw, nh), Image.BILINEAR)
    if mode == "center_crop":
        left, top = (nw - tw) // 2, (nh - th) // 2
        return im.crop((left, top, left + tw, top + th))
    canvas = Image.new(im.mode, (tw, th))
    canvas.paste(im, ((tw - nw) // 2, (th - nh) // 2))
    return canvas


def decode_rgb(payload: bytes, size: int = IMAGE_SIZE, resize: str = "none") -> np.ndarray:
    """Decode an encoded image (any format Pillow reads) to uint8 HWC RGB ``size x size`` (see `fit_image`).

    Raises ImageSizeError for another size under ``resize="none"``, and whatever Pillow raises on a corrupt
    image (the caller names the file and key).
    """
    from PIL import Image

    with Image.open(io.BytesIO(payload)) as im:
        return np.asarray(fit_image(im.convert("RGB"), size, resize))


def image_size(payload: bytes) -> tuple[int, int]:
    """(width, height) from the image's header (Pillow reads no pixel data)."""
    from PIL import Image

    with Image.open(io.BytesIO(payload)) as im:
        return im.size


def dali_payload(payload: bytes) -> bytes:
    """`payload` in a format DALI's decoder reads: JPEG, PNG, BMP and WebP as they are; any other format Pillow
    reads (PGM/PPM, TIFF, GIF, ...) decoded by Pillow and re-encoded as lossless PNG (same pixels, RGB)."""
    if payload.startswith(_DALI_MAGICS) or (payload[:4] == b"RIFF" and payload[8:12] == b"WEBP"):
        return payload
    from PIL import Image

    out = io.BytesIO()
    with Image.open(io.BytesIO(payload)) as im:
        im.convert("RGB").save(out, format="PNG", compress_level=1)
    return out.getvalue()


def payload_problem(payload: bytes) -> str | None:
    """A cheap check that a payload looks like an encoded image: the reason it does not, or None.

    Catches empty records and non-image bytes before a decoder sees them; damaged data is left to the decoder
    (both backends treat a decode failure as a corrupt image). The common formats are recognised by their first
    bytes; anything else is accepted when Pillow identifies its header (PGM, PPM, TIFF, ICO, TGA, ...).
    """
    if len(payload) == 0:
        return "empty image payload"
    if payload.startswith(_MAGICS) or (payload[:4] == b"RIFF" and payload[8:12] == b"WEBP"):
        return None
    try:
        image_size(payload)
    except Exception:  # UnidentifiedImageError, or a truncated header
        return f"not an image Pillow can read (starts with {bytes(payload[:8])!r})"
    return None
