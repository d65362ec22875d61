"""Image bytes for tests, made from real sample photos: every format, mode and kind of breakage."""

from __future__ import annotations

import io
import struct
import zlib
import numpy as np
from PIL import Image

from imagerec.paths import SAMPLES_DIR as SAMPLES


def sample(name: str = "coffee.png") -> Image.Image:
    with Image.open(SAMPLES / name) as image:
        return image.convert("RGB")


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def variants() -> dict[str, bytes]:
    """Name -> bytes of the coffee photo in every accepted format and awkward mode."""
    rgb = sample()
    grey16 = Image.fromarray(np.asarray(rgb.convert("L"), dtype=np.uint16) * 257)  # mode I;16
    rgba = rgb.convert("RGBA")
    rgba.putalpha(200)
    return {
        "jpeg": encode(rgb, "JPEG", quality=92),
        "png": encode(rgb, "PNG"),
        "webp": encode(rgb, "WEBP", quality=90),
        "bmp": encode(rgb, "BMP"),
        "gif": encode(rgb.convert("P", palette=Image.Palette.ADAPTIVE), "GIF"),
        "greyscale-jpeg": encode(rgb.convert("L"), "JPEG"),
        "palette-png": encode(rgb.convert("P", palette=Image.Palette.ADAPTIVE), "PNG"),
        "rgba-png": encode(rgba, "PNG"),
        "cmyk-jpeg": encode(rgb.convert("CMYK"), "JPEG"),
        "16bit-png": encode(grey16, "PNG"),
        "exif-rotated-jpeg": exif_rotated_jpeg(rgb),
    }


def exif_rotated_jpeg(image: Image.Image) -> bytes:
    """The photo stored rotated 90 degrees with EXIF orientation 6, which means "rotate back"."""
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: the viewer must rotate 90 degrees clockwise
    return encode(image.transpose(Image.Transpose.ROTATE_90), "JPEG", quality=92, exif=exif)


def two_frame_gif(first=(255, 0, 0), second=(0, 0, 255)) -> bytes:
    frames = [Image.new("RGB", (64, 48), first), Image.new("RGB", (64, 48), second)]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:], duration=100)
    return buffer.getvalue()


def png_claiming_size(width: int, height: int) -> bytes:
    """A tiny valid PNG whose header claims width x height: a decompression bomb's signature."""
    data = encode(Image.new("L", (1, 1)), "PNG")
    ihdr = struct.pack(">II", width, height) + data[24:29]
    chunk = b"IHDR" + ihdr
    return data[:8] + struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk)) + data[33:]


def truncated_jpeg() -> bytes:
    data = encode(sample("grace_hopper.jpg"), "JPEG", quality=90)
    return data[: len(data) // 3]


def tiff() -> bytes:
    return encode(sample(), "TIFF")


def phone_photo(max_bytes: int = 20 * 1024 * 1024) -> bytes:
    """A 4000x3000 (12 MP) JPEG as large as a phone's, but at most ``max_bytes``.

    A real photo upscaled, plus sensor-like noise so the JPEG is as big as a phone's.
    """
    rng = np.random.default_rng(0)
    base = np.asarray(sample("grace_hopper.jpg").resize((4000, 3000), Image.BILINEAR), dtype=np.int16)
    noisy = np.clip(base + rng.integers(-60, 61, size=base.shape), 0, 255).astype(np.uint8)
    image = Image.fromarray(noisy)
    for quality in (100, 98, 95, 90, 85):
        data = encode(image, "JPEG", quality=quality)
        if len(data) <= max_bytes:
            return data
    raise AssertionError("could not make a phone-sized JPEG under the limit")


def thin_png(width: int = 1, height: int = 20_000) -> bytes:
    """A real, tiny PNG (about 165 bytes) of a 1-pixel-wide strip: few pixels, extreme aspect ratio."""
    return encode(Image.new("RGB", (width, height), (128, 64, 32)), "PNG")
