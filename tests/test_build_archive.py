"""Backbone registry, weights resolution and the build_archive.py command line."""

import zipfile

import pytest
import yaml

from handlers.backbones import WeightsNotFoundError, backbone_names, get_backbone
from handlers.layout import read_archive_info
from handlers.layout import file_sha256

from tests.support import run_build


def test_registry_knows_both_backbones_and_refuses_unknown_names():
    assert {"resnet18", "efficientnet_lite0"} <= set(backbone_names())
    with pytest.raises(ValueError, match="unknown backbone 'resnet50'; choose from"):
        get_backbone("resnet50")


def test_each_backbone_owns_its_preprocessing_and_feature_size():
    resnet, lite = get_backbone("resnet18"), get_backbone("efficientnet_lite0")
    assert (resnet.feature_dim, lite.feature_dim) == (512, 1280)
    assert resnet.preprocessing.mean == (0.485, 0.456, 0.406)
    assert lite.preprocessing.mean == (0.5, 0.5, 0.5)


def test_resnet18_is_torchvisions_architecture_without_torchvision(resnet18_weights):
    """Workers build ResNet-18 from handlers/resnet.py; torchvision's weights must load unchanged and
    give torchvision's outputs."""
    import torch
    import torchvision

    state_dict = torch.load(resnet18_weights, weights_only=True)
    reference = torchvision.models.resnet18(weights=None).eval()
    reference.load_state_dict(state_dict)
    ours = get_backbone("resnet18").load(resnet18_weights)
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected = reference(images)
        torch.testing.assert_close(ours(images), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours.features(images) @ reference.fc.weight.T + reference.fc.bias, expected,
                                   rtol=1e-5, atol=1e-5)
    assert expected.std() > 0  # a live network, not constant outputs


def test_resnet18_weights_come_from_a_path_then_the_environment(resnet18_weights, monkeypatch, tmp_path):
    backbone = get_backbone("resnet18")
    assert backbone.resolve_weights(resnet18_weights) == resnet18_weights
    monkeypatch.setenv("RESNET18_WEIGHTS", str(resnet18_weights))
    assert backbone.resolve_weights() == resnet18_weights
    with pytest.raises(WeightsNotFoundError, match="not found"):
        backbone.resolve_weights(tmp_path / "missing.pth")


def test_without_weights_resnet18_names_the_three_ways_out(monkeypatch, tmp_path):
    monkeypatch.delenv("RESNET18_WEIGHTS", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty hub cache
    with pytest.raises(WeightsNotFoundError) as caught:
        get_backbone("resnet18").resolve_weights(allow_download=False)
    message = str(caught.value)
    assert "--weights PATH" in message and "RESNET18_WEIGHTS" in message
    assert str(tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth") in message


def test_a_hub_cache_file_is_found(monkeypatch, tmp_path, resnet18_weights):
    monkeypatch.delenv("RESNET18_WEIGHTS", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    cached = tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(resnet18_weights.read_bytes())
    assert get_backbone("resnet18").resolve_weights(allow_download=False) == cached


def test_cli_writes_a_self_contained_archive(resnet18_weights, tmp_path):
    result = run_build("--backbone", "resnet18", "--weights", str(resnet18_weights), "--version", "2.1",
                       "--name", "imagenet", "--out", str(tmp_path), "--batch-size", "4", "--max-batch-delay", "3")
    assert result.returncode == 0, result.stderr
    archive = tmp_path / "imagenet_v2.1.mar"
    assert result.stdout.strip() == str(archive)
    with zipfile.ZipFile(archive) as zf:
        names = set(zf.namelist())
        config = yaml.safe_load(zf.read("model-config.yaml"))
        manifest = zf.read("MAR-INF/MANIFEST.json").decode()
    assert {"features.onnx", "features.onnx.data", "features.index.json", "classifier.pt", "index_to_name.json",
            "recognition_handler.py", "handlers/backbones.py", "handlers/runtime.py"} <= names
    assert "weights.pt" not in names  # the body's weights travel once, in the graph's raw file
    # An archive ships the runtime only: no archive writer, exporter or management code.
    assert not any(name.startswith(("imagerec/", "training/", "scripts/")) for name in names)
    assert config["batchSize"] == 4 and config["maxBatchDelay"] == 3
    assert '"modelVersion": "2.1"' in manifest and '"modelName": "imagenet"' in manifest
    info = read_archive_info(archive)
    assert info["backbone"] == "resnet18" and info["weights_sha256"] == file_sha256(resnet18_weights)
    assert info["num_classes"] == 1000 and info["precision"] == "auto"
    # No labelled photos were given: reduced precision was not judged, so it stays off.
    assert info["precision_guard"]["bf16"]["allowed"] is False and "not judged" in info["precision_guard"]["bf16"]["reason"]


def test_cli_refuses_to_overwrite_and_rejects_bad_names(resnet18_weights, tmp_path):
    first = run_build("--weights", str(resnet18_weights), "--out", str(tmp_path))
    assert first.returncode == 0, first.stderr
    again = run_build("--weights", str(resnet18_weights), "--out", str(tmp_path))
    assert again.returncode == 2 and "exists" in again.stderr
    for bad in (["--version", "../../etc"], ["--name", "a/b"], ["--backbone", "vgg"]):
        result = run_build("--weights", str(resnet18_weights), "--out", str(tmp_path), *bad)
        assert result.returncode == 2, (bad, result.stderr)


def test_cli_missing_weights_file_exits_3(tmp_path):
    result = run_build("--weights", str(tmp_path / "nowhere.pth"), "--out", str(tmp_path))
    assert result.returncode == 3 and "not found" in result.stderr
