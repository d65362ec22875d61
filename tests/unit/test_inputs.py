"""Untrusted bytes and damaged cache files, with synthetic pictures only (no ../shared)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from handlers.imaging import ImageError, decode_image
from training.features import FeatureExtractor
from tests import images


def synthetic(width: int = 320, height: int = 240, seed: int = 0) -> Image.Image:
    """A smooth colour gradient with some noise: compresses like a photo, decodes like one."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / width, y * 255 / height, (x + y) * 127 / (width + height)], axis=-1)
    return Image.fromarray(np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8))


@pytest.mark.parametrize(
    "data, status, words",
    [
        (b"", 400, "empty"),
        (b"this is not an image at all", 415, "not an image"),
        (images.encode(synthetic(), "JPEG")[:2000], 400, "truncated"),
        (images.encode(synthetic(), "TIFF"), 415, "unsupported image format TIFF"),
        (images.png_claiming_size(9000, 9000), 413, "megapixels"),
        (images.png_claiming_size(100_000, 100_000), 413, "decompression bomb"),
    ],
    ids=["empty", "not-an-image", "truncated", "tiff", "81-megapixels", "10-gigapixels"],
)
def test_bad_input_raises_a_clear_error(data, status, words):
    with pytest.raises(ImageError) as caught:
        decode_image(data)
    assert caught.value.status == status
    assert words in str(caught.value)


def test_a_torn_feature_cache_file_is_recomputed(tmp_path):
    """A run killed while writing leaves a torn cache file: the next run must recompute that image
    (not crash, not use garbage) and give the same features as a clean run."""
    paths = []
    for seed in range(3):
        paths.append(tmp_path / f"photo{seed}.jpg")
        paths[-1].write_bytes(images.encode(synthetic(seed=seed), "JPEG", quality=90))
    extractor = FeatureExtractor("efficientnet_lite0", cache_dir=tmp_path / "cache", progress=False, engine="eager")
    clean = extractor.extract(paths)
    cached = sorted((tmp_path / "cache").rglob("*.npy"))
    assert len(cached) == 3
    cached[0].write_bytes(cached[0].read_bytes()[:100])  # torn
    again = FeatureExtractor("efficientnet_lite0", cache_dir=tmp_path / "cache", progress=False, engine="eager")
    features = again.extract(paths)
    assert (again.stats.cached, again.stats.extracted) == (2, 1)
    assert np.allclose(features, clean, atol=1e-5)
