"""Each backbone that installs offline, as the registry builds it: genuine ImageNet weights and the
right preprocessing, checked by what it sees in the sample photos (../shared/samples/README.md);
the paired backbone is its members side by side, eager and exported alike."""

from pathlib import Path

import numpy as np
import pytest
import torch

from handlers.arrays import softmax
from handlers.backbones import get_backbone, imagenet_categories, torch_hub_checkpoints
from handlers.imaging import ImagePreprocessor
from handlers.layout import extract_archive
from handlers.recognizer import load_recognizer
from imagerec.archive import build_archive

PAIRED = "efficientnet_lite0_lite2"


@pytest.fixture(autouse=True)
def private_torch_hub(tmp_path, monkeypatch):
    """The paired backbone writes its weights into the torch hub cache: this test's, not the user's."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))

# What a genuinely ImageNet-trained classifier puts in its top 3 (../shared/samples/README.md).
EXPECTED_TOP3 = {
    "coffee.png": {"espresso", "cup", "coffee mug"},
    "chelsea.png": {"tabby", "tiger cat", "Egyptian cat"},
    "grace_hopper.jpg": {"military uniform", "mortarboard", "academic gown", "bow tie"},
    "rocket.jpg": {"missile", "projectile", "space shuttle"},
}


@pytest.mark.parametrize("name", ["efficientnet_lite0", "efficientnet_lite2", PAIRED])
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


def sample_images(samples_dir, backbone) -> np.ndarray:
    prepare = ImagePreprocessor(backbone.preprocessing)
    return np.stack([prepare((samples_dir / photo).read_bytes()) for photo in EXPECTED_TOP3])


def test_the_paired_backbone_is_its_members_side_by_side(samples_dir, tmp_path):
    """Features: the members' features on the same input, concatenated in order; ImageNet logits: the
    mean of the members' logits. Its weights file is written once and named after the members'."""
    paired = get_backbone(PAIRED)
    weights = paired.resolve_weights(allow_download=False)
    assert weights.parent == tmp_path / "torch-home" / "hub" / "checkpoints" and weights.name.startswith(PAIRED)
    written = weights.stat().st_mtime_ns
    assert paired.resolve_weights(allow_download=False) == weights and weights.stat().st_mtime_ns == written
    network = paired.load(weights)
    members = [get_backbone(name) for name in paired.members]
    member_networks = [member.load(member.resolve_weights(allow_download=False)) for member in members]
    images = torch.from_numpy(sample_images(samples_dir, paired))
    with torch.inference_mode():
        features = network.features(images)
        member_features = [member.features(images) for member in member_networks]
        assert [f.shape[1] for f in member_features] == [m.feature_dim for m in members]
        assert torch.equal(features, torch.cat(member_features, 1))
        mean_logits = sum(member(images) for member in member_networks) / len(member_networks)
        assert torch.allclose(network(images), mean_logits, atol=1e-4)


def test_the_paired_backbone_s_archive_runs_its_graph_as_eager_does(samples_dir, tmp_path):
    """Its archive: one exported graph of both bodies, whose weights file is also the eager
    fallback's; both answer the same and name what the photos show."""
    paired = get_backbone(PAIRED)
    archive = build_archive(name=PAIRED, version="1.0", backbone_name=PAIRED,
                            weights_path=paired.resolve_weights(allow_download=False),
                            labels=imagenet_categories(), out_dir=tmp_path / "archives")
    unpacked = extract_archive(archive, tmp_path / "unpacked")
    fast, eager = load_recognizer(unpacked), load_recognizer(unpacked, engine="eager")
    assert (fast.recognizer.runtime, eager.recognizer.runtime) == ("onnxruntime", "eager")
    images = sample_images(samples_dir, paired)
    probabilities = softmax(fast.recognizer(images))
    assert np.abs(probabilities - softmax(eager.recognizer(images))).max() < 1e-4
    categories = imagenet_categories()
    for photo, row in zip(EXPECTED_TOP3, probabilities):
        assert {categories[index] for index in np.argsort(row)[::-1][:3]} & EXPECTED_TOP3[photo], photo


@pytest.mark.parametrize("torch_home, xdg_cache", [("~/th", None), (None, "/tmp/xdg"), (None, None), ("/abs/th", "/x")])
def test_the_hub_folder_is_torch_s_own_without_importing_it(monkeypatch, torch_home, xdg_cache):
    for variable, value in (("TORCH_HOME", torch_home), ("XDG_CACHE_HOME", xdg_cache)):
        if value is None:
            monkeypatch.delenv(variable, raising=False)
        else:
            monkeypatch.setenv(variable, value)
    assert torch_hub_checkpoints() == Path(torch.hub.get_dir()) / "checkpoints"
