"""Large test photos made at run time from a real photo (never committed): the documented upper end
of what users upload, for the upload tests and benchmarks/bench_uploads.py.

Torch-free (benchmark processes must not import torch: it would distort their memory figures).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from handlers.constants import MAX_REQUEST_BYTES as DOCUMENTED_MAX_BYTES  # the largest documented upload


def _noisy(source: Path, size: tuple[int, int], amplitude: int, seed: int = 0) -> Image.Image:
    """The photo upscaled to ``size`` plus uniform sensor-like noise of +-amplitude (what makes a
    phone's JPEG big: smooth upscaled pixels compress far too well)."""
    with Image.open(source) as image:
        base = np.asarray(image.convert("RGB").resize(size, Image.BILINEAR), dtype=np.int16)
    if amplitude:
        rng = np.random.default_rng(seed)
        base = base + rng.integers(-amplitude, amplitude + 1, size=base.shape, dtype=np.int16)
    return Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))


def _encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def large_jpeg(source: Path, max_bytes: int = DOCUMENTED_MAX_BYTES, size: tuple[int, int] = (5000, 4000)) -> bytes:
    """A 20-megapixel JPEG as close to ``max_bytes`` as a quality step allows (about 19 MB at the
    default: 5000x4000, noise +-40, quality 98)."""
    image = _noisy(source, size, amplitude=40)
    for quality in range(100, 80, -1):
        data = _encode(image, "JPEG", quality=quality)
        if len(data) <= max_bytes:
            return data
    raise ValueError(f"cannot encode a {size[0]}x{size[1]} JPEG under {max_bytes} bytes")


def large_png(source: Path, max_bytes: int = DOCUMENTED_MAX_BYTES, size: tuple[int, int] = (4000, 3000)) -> bytes:
    """A 12-megapixel PNG as close to ``max_bytes`` as the noise steps allow (about 18 MB at the
    default: 4000x3000, noise +-2). PNG has no reduced-scale decoding: every pixel is inflated."""
    for amplitude in (3, 2, 1, 0):
        data = _encode(_noisy(source, size, amplitude), "PNG", compress_level=1)
        if len(data) <= max_bytes:
            return data
    raise ValueError(f"cannot encode a {size[0]}x{size[1]} PNG under {max_bytes} bytes")
