"""Decoding untrusted bytes: every accepted format and mode, and every kind of bad input."""

import numpy as np
import pytest

from handlers.imaging import decode_image
from tests import images


@pytest.mark.parametrize("name", sorted(images.variants()))
def test_every_format_and_mode_becomes_upright_rgb(name):
    image = decode_image(images.variants()[name])
    assert image.mode == "RGB"
    assert image.size == (600, 400), "EXIF orientation must be applied; sizes must be the original"
    reference = np.asarray(images.sample(), dtype=np.int16)
    if "grey" in name or "16bit" in name:
        reference = np.asarray(images.sample().convert("L").convert("RGB"), dtype=np.int16)
    difference = np.abs(np.asarray(image, dtype=np.int16) - reference).mean()
    # Lossy formats and palettes change pixels a little; a wrong rotation, a clipped 16-bit image or
    # a black alpha background would change them a lot.
    limit = 40 if name == "rgba-png" else 12
    assert difference < limit, f"{name}: mean abs difference {difference:.1f}"


def test_gif_gives_its_first_frame():
    assert decode_image(images.two_frame_gif()).getpixel((10, 10)) == (255, 0, 0)


def test_large_jpeg_is_decoded_at_reduced_scale_but_never_below_the_model_size():
    photo = images.phone_photo()
    full = decode_image(photo)
    reduced = decode_image(photo, min_side=256)
    assert full.size == (4000, 3000)
    assert min(reduced.size) >= 256 and reduced.size[0] < full.size[0]


def test_eval_preprocessing_matches_torchvision(datasets_dir, samples_dir):
    """Our Pillow-only resize + crop gives torchvision's pixels (one resize of the crop's box: float
    rounding may move a value by one 8-bit level, rarely), and our normalisation its numbers."""
    import torch
    from torchvision.transforms import v2 as T

    from handlers.backbones import backbone_names, get_backbone
    from handlers.imaging import Normalise, resize_and_crop, to_uint8_array

    photos = sorted(datasets_dir.glob("*/val/*/*"))[::25] + sorted(samples_dir.glob("*.*g"))
    for name in backbone_names():
        p = get_backbone(name).preprocessing
        geometry = T.Compose([
            T.Resize(p.resize_size, interpolation=T.InterpolationMode.BILINEAR, antialias=True),
            T.CenterCrop(p.crop_size), T.PILToTensor(),
        ])
        scale = T.Compose([T.ToDtype(torch.float32, scale=True), T.Normalize(p.mean, p.std)])
        normalise = Normalise(p)
        differing = total = 0
        for photo in photos:
            image = decode_image(photo.read_bytes(), min_side=p.resize_size)
            ours, reference = torch.from_numpy(to_uint8_array(resize_and_crop(image, p))), geometry(image)
            assert ours.shape == reference.shape == (3, p.crop_size, p.crop_size), (name, photo)
            difference = (ours.int() - reference.int()).abs()
            assert difference.max() <= 1, (name, photo)
            differing, total = differing + int((difference > 0).sum()), total + difference.numel()
            assert torch.allclose(torch.from_numpy(normalise(ours.numpy())), scale(ours), atol=1e-5), (name, photo)
        assert differing / total < 0.01, (name, differing / total)
