"""Few-shot training: heads on features, data checks before any work, the feature cache, the CLI.

Real photos (a small hymenoptera subset), real EfficientNet-Lite0 features, a temporary feature
cache per test session; nothing here talks to a server (see test_fewshot_serving.py).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import zipfile

import pytest
import torch
from PIL import Image

from handlers.manifest import read_archive_info
from handlers.heads import HEADS, build_head
from training import train_head
from training.data import DataError, load_dataset, normalised_class_name
from training.evaluation import draw_confusion, evaluate, mean_ci95



def make_subset(datasets_dir, root, classes=("ants", "bees"), train=8, val=4, layout="folders", dataset="hymenoptera"):
    """A small ImageFolder of hard links to shared photos (symbolic links would leave the data folder,
    which load_dataset skips; copies only where the temp dir is on another file system): ``layout``
    "train/val" gives ``root/train/<class>`` and ``root/val/<class>``, "folders" gives ``root/<class>``
    with train+val photos."""
    for cls in classes:
        source = sorted((datasets_dir / dataset / "train" / cls).iterdir())
        held = sorted((datasets_dir / dataset / "val" / cls).iterdir())[:val]
        splits = {"train": source[:train], "val": held} if layout == "train/val" else {"": source[:train] + held}
        for split, photos in splits.items():
            folder = root / split / cls if split else root / cls
            folder.mkdir(parents=True, exist_ok=True)
            for photo in photos:
                try:
                    os.link(photo, folder / photo.name)
                except OSError:  # another file system (a tmpfs /tmp)
                    shutil.copyfile(photo, folder / photo.name)
    return root


# ---------------------------------------------------------------- heads on synthetic features

def _blobs(num_classes=3, per_class=12, dim=32, seed=0):
    """Separable clusters around random centres plus a large shared offset (like ImageNet features)."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_classes, dim, generator=generator) * 2
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    features = centres[labels] + torch.randn(len(labels), dim, generator=generator) + 10.0
    return features, labels


@pytest.mark.parametrize("kind", sorted(HEADS))
def test_head_fits_predicts_and_round_trips(kind):
    features, labels = _blobs()
    head = build_head(kind, features.shape[1], 3)
    summary = head.fit(features, labels)
    assert isinstance(summary, dict)
    logits = head(features)
    assert logits.shape == (len(labels), 3)
    assert (logits.argmax(1) == labels).float().mean() >= 0.95
    test_features, test_labels = _blobs(seed=0)  # same centres: a fresh draw of the same classes
    copy = build_head(kind, features.shape[1], 3)
    copy.load_state_dict(head.state_dict())
    assert torch.allclose(copy(test_features), head(test_features))
    probabilities = head(test_features).softmax(1)
    assert torch.allclose(probabilities.sum(1), torch.ones(len(test_labels)))


def test_linear_head_keeps_augmented_views_of_one_image_together():
    """Held-out rows are whole images: views of a held-out image never leak into its training."""
    from handlers.heads import _holdout_mask

    labels = torch.arange(4).repeat_interleave(10)
    groups = torch.arange(40).repeat_interleave(3)
    held = _holdout_mask(labels.repeat_interleave(3), groups, 0.25, seed=1)
    for group in groups.unique():
        assert held[groups == group].all() or not held[groups == group].any()
    assert 0 < held.float().mean() < 0.5


def test_linear_head_with_one_image_per_class_still_fits():
    features, labels = _blobs(per_class=1)
    head = build_head("linear", features.shape[1], 3)
    summary = head.fit(features, labels)
    assert summary["weight_decay"] > 0
    assert (head(features).argmax(1) == labels).all()


def test_evaluation_metrics_and_confusion_png(tmp_path):
    probabilities = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]])
    labels = torch.tensor([0, 1, 1, 1])
    metrics = evaluate(probabilities, labels, ["ants", "bees"])
    assert metrics["accuracy"] == pytest.approx(0.75)
    assert metrics["confusion"] == [[1, 0], [1, 2]]
    assert metrics["per_class"]["ants"]["precision"] == pytest.approx(0.5)
    assert metrics["per_class"]["bees"]["recall"] == pytest.approx(2 / 3)
    png = draw_confusion(metrics["confusion"], ["ants", "bees"], tmp_path / "c.png")
    with Image.open(png) as image:
        assert image.format == "PNG" and image.width > 100
    mean, half = mean_ci95([0.8, 0.9, 1.0])
    assert mean == pytest.approx(0.9) and 0.2 < half < 0.3


# ---------------------------------------------------------------- data checks

def test_class_name_normalisation():
    assert normalised_class_name("T-Shirt") == normalised_class_name("t_shirt") == normalised_class_name(" t shirt")
    assert normalised_class_name("shirt") != normalised_class_name("t-shirt")


def _assert_refused_before_any_work(data, tmp_path, caplog, *phrases):
    """train_head in-process on ``data`` exits EXIT_BAD_INPUT, logs every phrase, computes nothing."""
    cache = tmp_path / "cache"
    code = train_head.run([str(data), "--name", "x", "--backbone", "efficientnet_lite0", "--cache-dir", str(cache),
                           "--out", str(tmp_path / "out"), "--no-progress", "--views", "1"])
    assert code == train_head.EXIT_BAD_INPUT
    for phrase in phrases:
        assert phrase in caplog.text
    assert not cache.exists(), "features were computed before the data was checked"
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_missing_folder_is_refused(tmp_path, caplog):
    _assert_refused_before_any_work(tmp_path / "nowhere", tmp_path, caplog, "does not exist")


def test_fewer_than_two_classes_is_refused(datasets_dir, tmp_path, caplog):
    data = make_subset(datasets_dir, tmp_path / "data", classes=("ants",), train=3, val=0)
    _assert_refused_before_any_work(data, tmp_path, caplog, "at least 2")


def test_class_without_readable_image_is_refused(datasets_dir, tmp_path, caplog):
    data = make_subset(datasets_dir, tmp_path / "data", classes=("ants", "bees"), train=3, val=0)
    wasps = data / "wasps"
    wasps.mkdir()
    (wasps / "notes.jpg").write_text("not a photo")
    (wasps / "empty.png").write_bytes(b"")
    _assert_refused_before_any_work(data, tmp_path, caplog, "'wasps'", "no readable image")


@pytest.mark.parametrize("clash", [("ants", "Ants"), ("t-shirt", "T_Shirt"), ("bees", "bees ")])
def test_clashing_class_names_are_refused(datasets_dir, tmp_path, caplog, clash):
    data = make_subset(datasets_dir, tmp_path / "data", classes=("ants", "bees"), train=2, val=0)
    for name in clash:
        if not (data / name).exists():
            (data / name).mkdir()
            for source in sorted((data / "ants").iterdir())[:1]:
                (data / name / source.name).symlink_to(source.resolve())
    _assert_refused_before_any_work(data, tmp_path, caplog, "clash")


def test_class_folders_only_get_a_seeded_stratified_split(datasets_dir, tmp_path, caplog):
    data = make_subset(datasets_dir, tmp_path / "data", classes=("ants", "bees"), train=10, val=0)
    with caplog.at_level(logging.INFO):
        first = load_dataset(data, val_fraction=0.2, seed=3)
    again = load_dataset(data, val_fraction=0.2, seed=3)
    other = load_dataset(data, val_fraction=0.2, seed=4)
    assert first.counts("val") == {"ants": 2, "bees": 2}
    assert first.counts("train") == {"ants": 8, "bees": 8}
    assert [s.path for s in first.val] == [s.path for s in again.val]
    assert [s.path for s in first.val] != [s.path for s in other.val]
    assert not {s.path for s in first.val} & {s.path for s in first.train}
    assert "held out" in caplog.text


def test_val_class_unknown_to_train_is_refused(datasets_dir, tmp_path):
    data = make_subset(datasets_dir, tmp_path / "data", classes=("ants", "bees"), train=2, val=1, layout="train/val")
    (data / "val" / "wasps").mkdir()
    with pytest.raises(DataError, match="wasps"):
        load_dataset(data)


# ---------------------------------------------------------------- the CLI end to end (no server)

def test_train_head_writes_archive_report_and_reuses_cache(datasets_dir, tmp_path, caplog):
    data = make_subset(datasets_dir, tmp_path / "data", classes=("ants", "bees"), train=8, val=4, layout="train/val")
    # Unreadable files are listed and skipped, never silently.
    (data / "train" / "bees" / "broken.jpg").write_bytes((datasets_dir / "hymenoptera" / "train" / "bees").iterdir().__next__().read_bytes()[:600])
    (data / "train" / "ants" / "README.txt").write_text("photos from the garden")
    out = tmp_path / "out"
    common = ["--backbone", "efficientnet_lite0", "--cache-dir", str(tmp_path / "cache"), "--out", str(out),
              "--no-progress", "--views", "2", "--name", "bees_ants"]
    with caplog.at_level(logging.INFO):
        assert train_head.run([str(data), *common, "--version", "1"]) == 0
    assert "broken.jpg" in caplog.text and "README.txt" in caplog.text

    archive = out / "bees_ants_v1.mar"
    info = read_archive_info(archive)
    assert info["classes"] == ["ants", "bees"] and info["head"]["type"] == "linear"
    assert info["backbone"] == "efficientnet_lite0" and len(info["weights_sha256"]) == 64
    assert len(info["data"]["fingerprint"]) == 64
    assert info["data"]["train_images"] == {"ants": 8, "bees": 8}
    assert {u["file"].rsplit("/", 1)[-1] for u in info["data"]["unreadable"]} == {"broken.jpg", "README.txt"}
    assert info["training"]["views"] == 2 and info["training"]["head"] == "linear"
    assert 0.0 <= info["validation"]["accuracy"] <= 1.0 and info["validation"]["images"] == 8
    assert [c["label"] for c in info["check_images"]] == ["ants", "ants", "bees", "bees"]
    with zipfile.ZipFile(archive) as zf:
        names = set(zf.namelist())
    assert {"head.pt", "weights.pt", "index_to_name.json", "model_info.json"} <= names
    assert {c["file"] for c in info["check_images"]} <= names

    report = json.loads((out / "bees_ants_v1.report.json").read_text())
    assert report["features"]["extracted"] == 16 + 16 + 8  # plain train, augmented train, val
    assert report["metrics"]["confusion"] and sum(map(sum, report["metrics"]["confusion"])) == 8
    assert (out / "bees_ants_v1.confusion.png").stat().st_size > 0

    # Other head settings on the same data: every feature comes from the cache.
    assert train_head.run([str(data), *common, "--version", "2", "--weight-decay", "0.01"]) == 0
    second = json.loads((out / "bees_ants_v2.report.json").read_text())
    assert second["features"]["extracted"] == 0
    assert second["features"]["cached"] == report["features"]["extracted"]
    assert second["data"]["fingerprint"] == report["data"]["fingerprint"]
    assert second["fit"]["weight_decay"] == 0.01

    # Same version again without --force: refused before any work.
    assert train_head.run([str(data), *common, "--version", "2"]) == train_head.EXIT_BAD_INPUT


# ---------------------------------------------------------------- data folders with surprises (issue 9)

def test_a_class_with_a_single_photo_trains_with_a_warning(datasets_dir, tmp_path, caplog):
    data = make_subset(datasets_dir, tmp_path / "data", classes=("ants", "bees"), train=6, val=0)
    for extra in sorted((data / "bees").iterdir())[1:]:
        extra.unlink()
    with caplog.at_level(logging.WARNING):
        dataset = load_dataset(data)
    assert dataset.counts("val")["bees"] == 0
    assert any("bees" in r.getMessage() and "no validation photo" in r.getMessage() for r in caplog.records)


def test_links_that_leave_the_data_folder_are_skipped_and_named(datasets_dir, tmp_path, caplog):
    data = make_subset(datasets_dir, tmp_path / "data", classes=("ants", "bees"), train=4, val=0)
    secret = tmp_path / "secret.txt"
    secret.write_text("root:x:0:0:the first bytes of a private file")
    outside_photo = sorted((datasets_dir / "hymenoptera" / "val" / "ants").iterdir())[-1]
    (data / "ants" / "passwd.jpg").symlink_to(secret)
    (data / "ants" / "elsewhere.jpg").symlink_to(outside_photo)
    (data / "bees" / "inside.jpg").symlink_to(sorted((data / "bees").iterdir())[0])  # stays inside: kept
    with caplog.at_level(logging.WARNING):
        dataset = load_dataset(data)
    used = {sample.path.name for sample in dataset.train + dataset.val}
    assert "elsewhere.jpg" not in used and "passwd.jpg" not in used and "inside.jpg" in used
    assert "root:x" not in caplog.text
    for name in ("passwd.jpg", "elsewhere.jpg"):
        assert any(name in r.getMessage() and "outside the data folder" in r.getMessage() for r in caplog.records)
    followed = load_dataset(data, follow_links=True)
    assert "elsewhere.jpg" in {sample.path.name for sample in followed.train + followed.val}
