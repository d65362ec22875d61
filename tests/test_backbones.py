"""Each backbone that installs offline, as the registry builds it: genuine ImageNet weights and the
right preprocessing, checked by what it sees in the sample photos (../shared/samples/README.md)."""

import numpy as np
import pytest
import torch

from handlers.arrays import softmax
from handlers.backbones import get_backbone, imagenet_categories
from handlers.imaging import ImagePreprocessor

# What a genuinely ImageNet-trained classifier puts in its top 3 (../shared/samples/README.md).
EXPECTED_TOP3 = {
    "coffee.png": {"espresso", "cup", "coffee mug"},
    "chelsea.png": {"tabby", "tiger cat", "Egyptian cat"},
    "grace_hopper.jpg": {"military uniform", "mortarboard", "academic gown", "bow tie"},
    "rocket.jpg": {"missile", "projectile", "space shuttle"},
}


@pytest.mark.parametrize("name", ["efficientnet_lite0", "efficientnet_lite2"])
def test_an_offline_backbone_names_what_the_sample_photos_show(name, samples_dir):
    backbone = get_backbone(name)
    network = backbone.load(backbone.resolve_weights(allow_download=False))
    prepare = ImagePreprocessor(backbone.preprocessing)
    images = np.stack([prepare((samples_dir / photo).read_bytes()) for photo in EXPECTED_TOP3])
    assert images.shape[-2:] == (backbone.preprocessing.crop_size,) * 2
    with torch.inference_mode():
        features = network.features(torch.from_numpy(images))
        logits = network.classifier(features).numpy()
    assert features.shape == (len(EXPECTED_TOP3), backbone.feature_dim)
    categories = imagenet_categories()
    for photo, probabilities in zip(EXPECTED_TOP3, softmax(logits)):
        top3 = {categories[index] for index in np.argsort(probabilities)[::-1][:3]}
        assert top3 & EXPECTED_TOP3[photo], f"{name} on {photo}: {top3}"
