"""Heads that answer "unknown", through real archives and a real TorchServe.

train_head runs as a file on a few clothing10 classes and registers into the server; photos of the
other shared sets must be answered "unknown", the head's own validation photos kept at about the
chosen rate (exactly the rate train_head reported in-process); ``X-Keep`` changes the answer, bad
values get 400 for that request only; a ``--keep 1`` head rejects nothing; ``--head auto`` records
its choice in the manifest; the deploy check counts an "unknown" answer as a miss, not an error.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import requests

from handlers.backbones import get_backbone, imagenet_categories
from handlers.constants import KEEP_HEADER, UNKNOWN_LABEL
from handlers.layout import read_archive_info
from imagerec.archive import build_archive
from imagerec.management import Client, inspect_archive, run_check
from imagerec.paths import PROJECT_ROOT
from imagerec.torchserve import auth_header, install_archive

from tests.support import make_subset

NAME = "clothes_openset"
CLASSES = ("hat", "pants", "shoes")
VAL_PER_CLASS = 15
KEEP = 0.9


def _train(data, out, version, server, *extra) -> tuple:
    command = [
        sys.executable, str(PROJECT_ROOT / "training" / "train_head.py"), str(data),
        "--name", NAME, "--version", version, "--backbone", "efficientnet_lite0", "--out", str(out),
        "--views", "1", "--no-progress",
        "--register", server.management_url, "--key-file", str(server.key_file),
        "--model-store", str(server.model_store), *extra,
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    archive = out / f"{NAME}_v{version}.mar"
    report = json.loads((out / f"{NAME}_v{version}.report.json").read_text())
    return archive, report


def _ask(server, model, photo, version=None, keep=None):
    path = f"/predictions/{model}" + (f"/{version}" if version else "")
    headers = {"Content-Type": "application/octet-stream", **auth_header(server.keys["inference"])}
    if keep is not None:
        headers[KEEP_HEADER] = keep
    data = photo if isinstance(photo, bytes) else photo.read_bytes()
    return requests.put(server.inference_url + path, data=data, headers=headers, timeout=60)


def _rejected(server, photos, version, keep=None) -> list[bool]:
    answers = []
    for photo in photos:
        response = _ask(server, NAME, photo, version, keep)
        assert response.status_code == 200, response.text
        answers.append(response.json()[0]["label"] == UNKNOWN_LABEL)
    return answers


@pytest.fixture(scope="module")
def trained(datasets_dir, tmp_path_factory, empty_server_factory):
    """One server; v1: auto head with the rule at keep 0.9 (measured on hymenoptera photos), v2: an
    ensemble head at --keep 1."""
    root = tmp_path_factory.mktemp("openset")
    data = make_subset(datasets_dir, root / "data", classes=CLASSES, train=20, val=VAL_PER_CLASS,
                       layout="train/val", dataset="clothing10")
    server = empty_server_factory()
    unknown_dir = datasets_dir / "hymenoptera" / "val"
    v1, report1 = _train(data, root / "out", "1", server, "--keep", str(KEEP), "--unknown", str(unknown_dir))
    v2, report2 = _train(data, root / "out", "2", server, "--keep", "1", "--head", "ensemble")
    own = sorted(p for cls in CLASSES for p in sorted((data / "val" / cls).iterdir()))
    others = sorted((datasets_dir / "hymenoptera" / "val" / "bees").iterdir())[:8] + \
        sorted((datasets_dir / "signdigits10" / "val").rglob("*.*"))[:8]
    return {"server": server, "v1": v1, "v2": v2, "report1": report1, "report2": report2, "own": own, "others": others}


def test_auto_records_its_choice_and_the_rule_in_the_manifest(trained):
    info = read_archive_info(trained["v1"])
    choice = info["head_choice"]
    assert choice["requested"] == "auto" and choice["chosen"] == info["head"]["type"]
    assert choice["chosen"] in ("linear", "prototype", "ensemble") and choice["power"] in (1.0, 0.5)
    scores = choice["auto"]["cross_validated"]
    assert len(scores) >= 4 and choice["auto"]["folds"] >= 2
    assert choice["auto"]["chosen_score"]["accuracy"] >= max(s["accuracy"] for s in scores.values()) - 0.0051
    rule = info["rejection"]
    # 20 photos per class: the relative Mahalanobis rule (kNN below RelativeMahalanobisRejection.MIN_PHOTOS).
    assert rule["score"] == "rmd" and rule["keep"] == KEEP and rule["calibration_photos"] == 20 * len(CLASSES)
    assert isinstance(rule["threshold"], float)
    openset = trained["report1"]["metrics"]["openset"]
    assert openset["unknown_photos"] > 100 and openset["auroc"] > 0.9 and openset["unknown_rejected"] > 0.8
    assert len(openset["confusion"]) == len(CLASSES) + 1 and len(openset["confusion"][0]) == len(CLASSES) + 1


def test_photos_of_other_kinds_are_answered_unknown_first_then_the_closest_classes(trained):
    server = trained["server"]
    rejected = _rejected(server, trained["others"], "1")
    assert sum(rejected) >= 0.8 * len(rejected), rejected
    answer = _ask(server, NAME, trained["others"][rejected.index(True)], "1").json()
    first, *known = answer
    assert first["label"] == UNKNOWN_LABEL and first["index"] is None and first["probability"] is None
    assert first["score"] < first["threshold"]
    assert [entry["label"] for entry in known] and all(entry["label"] in CLASSES for entry in known)
    assert len(known) == len(CLASSES)  # Top-3 of 3 classes


def test_own_validation_photos_are_kept_at_the_rate_train_head_reported(trained):
    kept = [not r for r in _rejected(trained["server"], trained["own"], "1")]
    share = sum(kept) / len(kept)
    # The server computes what train_head computed in-process on the same photos...
    assert share == pytest.approx(trained["report1"]["metrics"]["openset"]["known_kept"], abs=1e-6)
    # ...and that is about the chosen rate (45 photos: the binomial spread alone is about 0.045).
    assert abs(share - KEEP) <= 0.15


def test_a_keep_header_changes_the_answer_and_bad_values_get_400_alone(trained):
    server = trained["server"]
    strict = _rejected(server, trained["own"], "1", keep="0.5")
    default = _rejected(server, trained["own"], "1")
    assert sum(strict) >= sum(default) + 0.25 * len(strict)  # about half rejected instead of a tenth
    assert not any(_rejected(server, trained["others"], "1", keep="1"))
    for bad in ("abc", "0", "1.5", "-0.2", "nan", ""):
        response = _ask(server, NAME, trained["own"][0], "1", keep=bad)
        assert response.status_code == 400, (bad, response.text)
        assert KEEP_HEADER in response.json()["error"]
    assert _ask(server, NAME, trained["own"][0], "1").status_code == 200  # the worker still serves


def test_keep_1_rejects_nothing_but_a_request_can_still_ask(trained):
    server = trained["server"]
    assert read_archive_info(trained["v2"])["rejection"]["keep"] == 1.0
    # v2 is also the served ensemble head (linear + prototype probabilities averaged).
    assert read_archive_info(trained["v2"])["head_choice"] == {"requested": "ensemble", "chosen": "ensemble",
                                                                "power": 1.0}
    answer = _ask(server, NAME, trained["own"][0], "2").json()
    assert answer[0]["label"] in CLASSES and sum(entry["probability"] for entry in answer) == pytest.approx(1.0, abs=1e-3)
    assert not any(_rejected(server, trained["others"] + trained["own"][:5], "2"))
    assert trained["report2"]["metrics"]["openset"]["known_kept"] == 1.0
    assert sum(_rejected(server, trained["others"], "2", keep="0.9")) >= 0.8 * len(trained["others"])


def test_deploy_check_judges_the_classes_where_the_rule_would_say_unknown(trained):
    """The check asks for the classes (X-Keep: 1): a photo the rule declines by default is judged by
    its top class, and nothing in the answers is taken for a label outside the archive."""
    server = trained["server"]
    client = Client(server.management_url, server.key_file, server.model_store, inference_url=server.inference_url)
    facts = inspect_archive(trained["v1"])
    photo = trained["others"][_rejected(server, trained["others"], "1").index(True)]
    top_class = _ask(server, NAME, photo, version="1", keep="1").json()[0]["label"]
    assert top_class in CLASSES
    own = trained["own"][::VAL_PER_CLASS]  # one photo of each class
    wrong = next(cls for cls in CLASSES if cls != top_class)
    checks = [(str(photo), photo.read_bytes(), wrong)] + [(str(p), p.read_bytes(), p.parent.name) for p in own]
    result = run_check(client, facts, checks, min_accuracy=0.5)
    assert result["checked"] == len(checks) and result["top1_correct"] <= len(checks) - 1


def test_imagenet_model_never_rejects_and_refuses_a_strictness_it_cannot_give(trained, archive_dir, tmp_path):
    server = trained["server"]
    backbone = get_backbone("efficientnet_lite0")
    archive = build_archive(name="imagenet_plain", version="1", backbone_name=backbone.name,
                            weights_path=backbone.resolve_weights(), labels=imagenet_categories(), out_dir=tmp_path)
    install_archive(archive, server.model_store)
    response = server.management("POST", f"/models?url={archive.name}&initial_workers=1&synchronous=true", timeout=300)
    assert response.status_code == 200, response.text
    photo = trained["others"][0]
    answer = _ask(server, "imagenet_plain", photo)
    assert answer.status_code == 200 and answer.json()[0]["label"] != UNKNOWN_LABEL
    assert _ask(server, "imagenet_plain", photo, keep="1").status_code == 200
    refused = _ask(server, "imagenet_plain", photo, keep="0.9")
    assert refused.status_code == 400 and "no rejection rule" in refused.json()["error"]
