"""Few-shot training: heads on features, data checks before any work, the feature cache, the CLI.

Real photos (a small hymenoptera subset), real EfficientNet-Lite0 features, a temporary feature
cache per test session; nothing here talks to a server (see test_fewshot_serving.py).
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from handlers.imaging import ImagePreprocessor
from handlers.layout import HEAD_FILE, LEGACY_HEAD_FILE, extract_archive, read_archive_info
from handlers.recognizer import load_recognizer
from imagerec.management import EXIT_UNREACHABLE
from imagerec.paths import PROJECT_ROOT
from imagerec.torchserve import free_port
from training.progress import read_progress
from training import train_head
from training.data import DataError, load_dataset

from tests.support import make_subset


# ---------------------------------------------------------------- data checks

def _assert_refused_before_any_work(data, tmp_path, caplog, *phrases):
    """train_head in-process on ``data`` exits EXIT_BAD_ARGUMENTS, logs every phrase, computes nothing."""
    cache = tmp_path / "cache"
    code = train_head.run([str(data), "--name", "x", "--backbone", "efficientnet_lite0", "--cache-dir", str(cache),
                           "--out", str(tmp_path / "out"), "--no-progress", "--views", "1"])
    assert code == train_head.EXIT_BAD_ARGUMENTS
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
        assert train_head.run([str(data), *common, "--version", "1", "--progress-file", str(tmp_path / "progress.jsonl")]) == 0
    assert "broken.jpg" in caplog.text and "README.txt" in caplog.text
    progress = read_progress(tmp_path / "progress.jsonl")
    stages = [p["stage"] for p in progress]
    assert stages[0] == "data" and stages[-1] == "done" and {"features", "fit", "evaluate", "archive"} <= set(stages)
    features = [p for p in progress if p["stage"] == "features"]
    assert features[-1]["done"] == features[-1]["total"] == 16 + 16 * 2 + 8  # plain + 2 views of train, val
    assert [p["done"] for p in features] == sorted(p["done"] for p in features)

    archive = out / "bees_ants_v1.mar"
    info = read_archive_info(archive)
    assert info["classes"] == ["ants", "bees"] and info["head"]["type"] in ("linear", "prototype", "ensemble")
    assert info["head_choice"]["requested"] == "auto" and info["head_choice"]["chosen"] == info["head"]["type"]
    assert info["backbone"] == "efficientnet_lite0" and len(info["weights_sha256"]) == 64
    assert len(info["data"]["fingerprint"]) == 64
    assert info["data"]["train_images"] == {"ants": 8, "bees": 8}
    assert {u["file"].rsplit("/", 1)[-1] for u in info["data"]["unreadable"]} == {"broken.jpg", "README.txt"}
    assert info["training"]["views"] == 2 and info["training"]["head"] == "auto"
    # ants and bees are ImageNet classes: a head on ImageNet features separates them (docs/BENCHMARKS.md).
    assert info["validation"]["accuracy"] >= 0.75 and info["validation"]["images"] == 8
    assert [c["label"] for c in info["check_images"]] == ["ants", "ants", "bees", "bees"]
    with zipfile.ZipFile(archive) as zf:
        names = set(zf.namelist())
    assert {HEAD_FILE, "features.onnx", "features.onnx.data", "index_to_name.json", "model_info.json"} <= names
    assert "weights.pt" not in names and "classifier.pt" not in names  # a head needs neither
    assert {c["file"] for c in info["check_images"]} <= names

    report = json.loads((out / "bees_ants_v1.report.json").read_text())
    assert report["features"]["extracted"] == 16 + 16 + 8  # plain train, augmented train, val
    confusion = report["metrics"]["confusion"]
    assert sum(map(sum, confusion)) == 8
    assert report["metrics"]["accuracy"] == pytest.approx(sum(confusion[i][i] for i in range(2)) / 8)
    assert (out / "bees_ants_v1.confusion.png").stat().st_size > 0
    wrong = report["wrong_validation"]
    assert len(wrong) == round(8 * (1 - report["metrics"]["accuracy"]))
    assert all(w["true"] != w["predicted"] and Path(w["file"]).is_file() for w in wrong)
    assert info["trained_at"].endswith("+00:00")

    # Other head settings on the same data: every feature comes from the cache.
    assert train_head.run([str(data), *common, "--version", "2", "--head", "linear", "--weight-decay", "0.01"]) == 0
    second = json.loads((out / "bees_ants_v2.report.json").read_text())
    assert second["features"]["extracted"] == 0
    assert second["features"]["cached"] == report["features"]["extracted"]
    assert second["data"]["fingerprint"] == report["data"]["fingerprint"]
    assert second["fit"]["weight_decay"] == 0.01

    # Same version again without --force: refused before any work.
    assert train_head.run([str(data), *common, "--version", "2"]) == train_head.EXIT_BAD_ARGUMENTS

    # --register to a server that is not there: the archive is written, the exit code says unreachable.
    closed = f"http://127.0.0.1:{free_port()}"
    code = train_head.run([str(data), *common, "--version", "3", "--register", closed,
                           "--key-file", str(tmp_path / "no-server" / "key_file.json")])
    assert code == EXIT_UNREACHABLE
    assert (out / "bees_ants_v3.mar").is_file()


# Runs train_head as a user does, then says whether torch was imported: train_head's __main__ ends in
# sys.exit, so the check runs once that SystemExit has been caught.
_RUN_AND_REPORT_TORCH = """
import runpy, sys
sys.argv = [{script!r}, *{arguments!r}]
try:
    runpy.run_path({script!r}, run_name="__main__")
except SystemExit as done:
    code = done.code
print("exit", code, "torch imported", "torch" in sys.modules)
"""


def test_a_warm_train_head_never_imports_torch(datasets_dir, tmp_path):
    """Features and the exported graph cached (the same photos trained once before): the second run
    fits, evaluates and writes the archive without importing torch (its import alone costs 1.7 s of
    the 2 s budget of such a run), for the default auto head and with the accuracy guard as it runs here."""
    data = make_subset(datasets_dir, tmp_path / "data", classes=("ants", "bees"), train=8, val=4, layout="train/val")
    script = str(PROJECT_ROOT / "training" / "train_head.py")
    common = [str(data), "--backbone", "efficientnet_lite0", "--cache-dir", str(tmp_path / "cache"),
              "--out", str(tmp_path / "out"), "--no-progress", "--name", "warm"]
    cold = subprocess.run([sys.executable, script, *common, "--version", "1"], capture_output=True, text=True,
                          timeout=600, cwd=PROJECT_ROOT)
    assert cold.returncode == 0, cold.stderr[-3000:]
    for version, options in (("2", []), ("3", ["--head", "linear", "--weight-decay", "0.01"])):
        code = _RUN_AND_REPORT_TORCH.format(script=script, arguments=[*common, "--version", version, *options])
        warm = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=PROJECT_ROOT)
        assert warm.returncode == 0, warm.stderr[-3000:]
        assert warm.stdout.strip().splitlines()[-1] == "exit 0 torch imported False", (warm.stdout, warm.stderr[-3000:])
        report = json.loads((tmp_path / "out" / f"warm_v{version}.report.json").read_text())
        assert report["features"]["extracted"] == 0 and report["features"]["cached"] > 0


def test_an_archive_made_before_the_numpy_heads_serves_as_it_did(datasets_dir, tmp_path):
    """An archive carrying head.pt (the head's torch state_dict, as archives made before head.npz
    carry it) loads through the worker's loader and answers exactly as the same head saved as head.npz."""
    data = make_subset(datasets_dir, tmp_path / "data", classes=("ants", "bees"), train=8, val=4, layout="train/val")
    assert train_head.run([str(data), "--backbone", "efficientnet_lite0", "--cache-dir", str(tmp_path / "cache"),
                           "--out", str(tmp_path / "out"), "--no-progress", "--name", "legacy", "--head", "ensemble"]) == 0
    current = extract_archive(tmp_path / "out" / "legacy_v1.0.mar", tmp_path / "current")
    older = extract_archive(tmp_path / "out" / "legacy_v1.0.mar", tmp_path / "older")
    import torch  # the test writes the older format the way the torch heads did

    with np.load(older / HEAD_FILE, allow_pickle=False) as saved:
        torch.save({name: torch.from_numpy(saved[name]) for name in saved.files}, older / LEGACY_HEAD_FILE)
    (older / HEAD_FILE).unlink()
    photos = sorted((datasets_dir / "hymenoptera" / "val" / "bees").iterdir())[-4:]
    now, before = load_recognizer(current), load_recognizer(older)
    images = np.stack([ImagePreprocessor(now.backbone.preprocessing)(p.read_bytes()) for p in photos])
    logits, scores = now.recognizer.predict(images)
    older_logits, older_scores = before.recognizer.predict(images)
    assert np.array_equal(logits, older_logits) and np.array_equal(scores, older_scores)
    assert float(before.recognizer.rejection.threshold) == float(now.recognizer.rejection.threshold)


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
