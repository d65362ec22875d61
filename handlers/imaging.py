"""Turning untrusted bytes into model input: decoding, validation and eval-time preprocessing.

Used by the TorchServe handler and by training, so a photo becomes the same array on both paths.
Pillow and numpy only: the arrays become torch tensors only where a torch model runs (the eager
backbone), and a warm train_head never imports torch (1.7 s of its 2 s budget).
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from handlers.backbones import Preprocessing
from handlers.constants import ACCEPTED_FORMATS, MAX_ASPECT_RATIO, MAX_IMAGE_PIXELS, RESIZE_SIZE

# Never hand the model a silently half-grey picture: a truncated file is an error.
ImageFile.LOAD_TRUNCATED_IMAGES = False


class ImageError(ValueError):
    """The bytes cannot become an image the model may see. ``status`` is the HTTP code to answer."""

    def __init__(self, message: str, status: int = 400, kind: str = "corrupt"):
        super().__init__(message)
        self.status = status
        self.kind = kind  # a short, fixed name for metrics (handlers/handler_metrics.py)


def decode_image(data: bytes, min_side: int | None = None) -> Image.Image:
    """Decode image bytes into an upright RGB PIL image.

    ``min_side``: when given, a JPEG much larger than that is decoded at a reduced scale (1/2, 1/4,
    1/8, done by libjpeg in the DCT domain, so several times cheaper) while keeping both sides at
    least ``min_side`` pixels: the later resize to ``min_side`` sees nearly the same picture.

    Raises ImageError for empty input, non-images (415), unsupported formats (415), truncated or
    corrupt files (400), decompression bombs (413) and images thinner than MAX_ASPECT_RATIO (413:
    tiny files that resizing would blow up), all from the header, before any pixel is decoded.
    """
    if not data:
        raise ImageError("empty request body: send the image bytes (curl -T photo.jpg URL)", kind="empty")
    try:
        # Pillow's own bomb check warns above Image.MAX_IMAGE_PIXELS and raises above twice that;
        # ours below is stricter and is what callers see.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ImageError(
            f"body is not an image ({len(data)} bytes, starts with {data[:8]!r}); "
            f"send one of {', '.join(ACCEPTED_FORMATS)}",
            status=415,
            kind="not_an_image",
        ) from None
    except Image.DecompressionBombError as exc:
        raise ImageError(f"image refused as a decompression bomb: {exc}", status=413, kind="too_large") from None
    except Exception as exc:  # Pillow raises many types on malformed headers
        raise ImageError(f"cannot read image header: {exc}") from None

    if image.format not in ACCEPTED_FORMATS:
        raise ImageError(
            f"unsupported image format {image.format}; send one of {', '.join(ACCEPTED_FORMATS)}",
            status=415,
            kind="unsupported_format",
        )
    width, height = image.size
    if width * height > MAX_IMAGE_PIXELS:
        raise ImageError(
            f"image of {width}x{height} = {width * height / 1e6:.0f} megapixels exceeds the limit "
            f"of {MAX_IMAGE_PIXELS / 1e6:.0f} megapixels (decompression bomb?)",
            status=413,
            kind="too_large",
        )
    if width < 1 or height < 1:
        raise ImageError(f"image has no pixels ({width}x{height})")
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        # Few pixels, but resizing the short side to the model's size would make it enormous.
        raise ImageError(
            f"image of {width}x{height} exceeds the aspect ratio limit of {MAX_ASPECT_RATIO}:1 "
            f"(resizing its short side to the model input would make it "
            f"{max(width, height) / min(width, height) * RESIZE_SIZE / 1e3:.0f}k pixels long)",
            status=413, kind="too_thin",
        )

    if min_side and image.format == "JPEG":
        # Orientation may swap the sides, but draft() keeps *both* sides >= min_side, so it is safe.
        image.draft("RGB", (min_side, min_side))
    try:
        image.load()  # GIF, WebP: the first frame
    except Exception as exc:  # OSError "image file is truncated", SyntaxError, ValueError...
        raise ImageError(f"image data is truncated or corrupt ({image.format}): {exc}") from None
    try:
        image = ImageOps.exif_transpose(image)
    except Exception:  # a malformed EXIF block must not cost the user the answer
        pass
    return to_rgb(image)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB: greyscale, palette, alpha (on white), CMYK, 16-bit, float."""
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        # 16-bit and 32-bit greyscale: scale to 8 bits instead of clipping everything to white.
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        image = Image.fromarray(np.clip(array * (255.0 / top), 0, 255).astype(np.uint8), "L")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB") if image.mode != "RGB" else image


# Names the eval-time arithmetic below; training's feature cache keys on it (training/features.py),
# so a change here recomputes cached features instead of mixing two preprocessings.
GEOMETRY_VERSION = "resize-box-v2"


def resize_and_crop(image: Image.Image, preprocessing: Preprocessing) -> Image.Image:
    """Shorter side to ``resize_size`` (bilinear), then the centred ``crop_size`` square.

    torchvision's Resize(int) + CenterCrop, done as one Pillow resize of the crop's source box:
    only the kept pixels are computed (0.7 against 1.2 ms for a 400x533 photo). The same filter at
    the same positions; float rounding of the box moves about 0.3% of values by one 8-bit level
    (tests/test_imaging.py bounds it). Pillow alone: importing torchvision costs every TorchServe
    worker about 150 MB (torchvision.ops pulls in torch._dynamo), and memory per worker is the budget.
    """
    width, height = image.size
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = preprocessing.resize_size, int(preprocessing.resize_size * long / short)
    size = (new_short, new_long) if width <= height else (new_long, new_short)
    crop = preprocessing.crop_size
    left = int(round((size[0] - crop) / 2.0))
    top = int(round((size[1] - crop) / 2.0))
    scale_x, scale_y = width / size[0], height / size[1]
    box = (left * scale_x, top * scale_y, min(width, (left + crop) * scale_x), min(height, (top + crop) * scale_y))
    return image.resize((crop, crop), Image.BILINEAR, box=box)


def to_uint8_array(image: Image.Image) -> np.ndarray:
    """RGB PIL image -> uint8 (3, H, W) (a view of the (H, W, 3) pixels)."""
    return np.array(image, dtype=np.uint8, copy=True).transpose(2, 0, 1)


class Normalise:
    """uint8 (..., 3, H, W) -> contiguous float32 (x / 255 - mean) / std; one image or a batch.

    Computed as ``x * scale + shift``: two passes instead of four, on the calling thread with the
    GIL released, where torch would hand even one image to its own thread pool (the handler
    normalises each image on its decode thread, in parallel).
    """

    def __init__(self, preprocessing: Preprocessing):
        mean = np.asarray(preprocessing.mean, dtype=np.float32).reshape(3, 1, 1)
        std = np.asarray(preprocessing.std, dtype=np.float32).reshape(3, 1, 1)
        self.scale = (1.0 / (255.0 * std)).astype(np.float32)
        self.shift = (-mean / std).astype(np.float32)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        normalised = np.multiply(images, self.scale, dtype=np.float32, order="C")
        normalised += self.shift
        return normalised


def eval_transform(preprocessing: Preprocessing):
    """RGB PIL image -> normalised float32 array (3, crop, crop)."""
    normalise = Normalise(preprocessing)
    return lambda image: normalise(to_uint8_array(resize_and_crop(image, preprocessing)))


class ImagePreprocessor:
    """Bytes -> model input (3, crop, crop), exactly as the served handler does it.

    ``geometry(bytes)`` decodes, resizes and crops; ``normalise`` scales. Both release the GIL
    (Pillow, numpy), so the handler prepares the images of a batch on parallel threads.
    Elementwise ops give the same numbers per image or per batch.
    """

    def __init__(self, preprocessing: Preprocessing):
        self.preprocessing = preprocessing
        self.normalise = Normalise(preprocessing)

    def geometry(self, data: bytes) -> np.ndarray:
        """Bytes -> uint8 (3, crop, crop). Raises ImageError like ``decode_image``."""
        image = decode_image(data, min_side=self.preprocessing.resize_size)
        return to_uint8_array(resize_and_crop(image, self.preprocessing))

    def __call__(self, data: bytes) -> np.ndarray:
        """Bytes -> float32 (3, crop, crop). Raises ImageError like ``decode_image``."""
        return self.normalise(self.geometry(data))
