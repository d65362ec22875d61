"""A trained head served by a real TorchServe: served answers equal in-process ones, and two
versions of one name coexist at /predictions/NAME/V, each answering with its own version header.

train_head runs as a file (python training/train_head.py), registers into the running server with
--register (scripts/manage.register_archive), and the test compares with ``load_recognizer`` on the
extracted archive, the same loader the handler uses.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np

from handlers.arrays import softmax
from handlers.constants import TOP_K, UNKNOWN_LABEL, VERSION_HEADER
from handlers.layout import extract_archive, read_archive_info
from handlers.imaging import ImagePreprocessor
from handlers.recognizer import load_recognizer
from imagerec.paths import PROJECT_ROOT

from tests.support import make_subset

NAME = "hymenoptera_mini"


def known(answer: list[dict]) -> list[dict]:
    """The class entries of an answer (without a leading "unknown")."""
    return [entry for entry in answer if entry["label"] != UNKNOWN_LABEL]


def _train(data, out, cache, version, server, *extra):
    command = [
        sys.executable, str(PROJECT_ROOT / "training" / "train_head.py"), str(data),
        "--name", NAME, "--version", version, "--backbone", "efficientnet_lite0", "--out", str(out),
        "--cache-dir", str(cache), "--views", "1", "--no-progress",
        "--register", server.management_url, "--key-file", str(server.key_file),
        "--model-store", str(server.model_store), *extra,
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    archive = out / f"{NAME}_v{version}.mar"
    assert result.stdout.strip().splitlines()[-1] == str(archive)
    return archive


def test_trained_head_served_equals_in_process_and_versions_coexist(datasets_dir, tmp_path, torchserve_factory):
    data = make_subset(datasets_dir, tmp_path / "data", classes=("ants", "bees"), train=8, val=4, layout="train/val")
    server = torchserve_factory()  # empty: train_head --register adds both versions
    out, cache = tmp_path / "out", tmp_path / "cache"
    v1 = _train(data, out, cache, "1", server)
    v2 = _train(data, out, cache, "2", server, "--head", "prototype")
    assert read_archive_info(v2)["head"]["type"] == "prototype"

    versions = {entry["modelVersion"] for entry in server.management("GET", f"/models/{NAME}/all").json()}
    assert versions == {"1", "2"}

    photos = sorted((datasets_dir / "hymenoptera" / "val" / "ants").iterdir())[10:13] + \
        sorted((datasets_dir / "hymenoptera" / "val" / "bees").iterdir())[10:13]
    for version, archive in (("1", v1), ("2", v2)):
        loaded = load_recognizer(extract_archive(archive, tmp_path / f"unpacked-{version}"))
        assert loaded.labels == ["ants", "bees"]
        preprocess = ImagePreprocessor(loaded.backbone.preprocessing)
        logits, scores = loaded.recognizer.predict(np.stack([preprocess(p.read_bytes()) for p in photos]))
        expected = softmax(logits)
        threshold = float(loaded.recognizer.rejection.threshold)
        for photo, probabilities, score in zip(photos, expected, scores.tolist()):
            response = server.predict(NAME, photo.read_bytes(), version=version)
            assert response.status_code == 200, response.text
            assert response.headers[VERSION_HEADER] == version
            answer = response.json()
            # The head's rejection rule (README "Unknown photos") declines the photo exactly as in process.
            assert (answer[0]["label"] == UNKNOWN_LABEL) == (score < threshold)
            answer = known(answer)
            assert len(answer) == min(TOP_K, 2)
            order = np.argsort(-probabilities)
            assert [entry["label"] for entry in answer] == [loaded.labels[i] for i in order.tolist()]
            for entry, p in zip(answer, probabilities[order].tolist()):
                assert abs(entry["probability"] - p) < 1e-4

    # The two heads are different models: somewhere their probabilities differ.
    first = [known(server.predict(NAME, p.read_bytes(), version="1").json())[0]["probability"] for p in photos]
    second = [known(server.predict(NAME, p.read_bytes(), version="2").json())[0]["probability"] for p in photos]
    assert any(abs(a - b) > 1e-3 for a, b in zip(first, second))
