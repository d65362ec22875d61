"""The portable backbone runtime (imagerec/export.py builds, handlers/runtime.py runs): served answers
equal eager torch, the fast path does not depend on the build machine, a damaged graph falls back
to eager with a warning, and the accuracy guard keeps a precision that costs accuracy off."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import textwrap

import numpy as np
import pytest

from handlers.arrays import softmax
from handlers.backbones import get_backbone
from handlers.imaging import ImagePreprocessor
from handlers.layout import extract_archive, read_archive_info
from handlers.machine import cpu_flags
from handlers.recognizer import load_recognizer
from handlers.runtime import FAST_BF16_FLAGS, HIDE_FLAGS_VAR, PRECISION_VAR, choose_precision, cpu_precisions
from imagerec.export import exported_graph_dir
from imagerec.paths import PROJECT_ROOT
from imagerec.precision_guard import guard_imagenet, graph_features
from imagerec.torchserve import serving_python


def val_photos(datasets_dir, count: int = 6) -> list:
    """Real photos of different sets, sizes and contents."""
    photos = []
    for folder in ("hymenoptera", "clothing10", "signdigits10"):
        photos += sorted((datasets_dir / folder / "val").glob("*/*"))[::29][: count // 3]
    return photos


def run_in_serving_environment(code: str, env: dict | None = None) -> tuple[dict, str]:
    """Run ``code`` in the workers' interpreter; (its last stdout line as JSON, its stderr)."""
    result = subprocess.run([str(serving_python()), "-c", textwrap.dedent(code)], capture_output=True, text=True,
                            timeout=300, cwd=PROJECT_ROOT, env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT), **(env or {})})
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1]), result.stderr


def test_served_answers_equal_eager_torch(imagenet_server, efficientnet_archive, resnet18_archive, datasets_dir,
                                          tmp_path):
    """Both backbones: the served worker runs the graph (its log says which runtime), and its Top-3
    probabilities equal eager torch's within 1e-4 on real photos."""
    log = (imagenet_server.log_dir / "model_log.log").read_text()
    for archive in (efficientnet_archive, resnet18_archive):
        name = read_archive_info(archive)["name"]
        assert f"backbone {name} (fp32, onnxruntime)" in log
        eager = load_recognizer(extract_archive(archive, tmp_path / name), engine="eager")
        assert eager.recognizer.runtime == "eager"
        preprocessor = ImagePreprocessor(eager.backbone.preprocessing)
        for photo in val_photos(datasets_dir):
            response = imagenet_server.predict(name, photo.read_bytes())
            assert response.status_code == 200, response.text
            expected = softmax(eager.recognizer(preprocessor(photo.read_bytes())[None]))[0]
            for row in response.json():
                assert row["probability"] == pytest.approx(expected[row["index"]].item(), abs=1e-4), (name, photo)


def test_the_fast_path_runs_on_another_cpu_and_thread_count(efficientnet_archive, datasets_dir, tmp_path):
    """Nothing in the archive is tied to the build machine: with bf16 hidden (a CPU without it) and
    one thread instead of the build machine's count, the worker still runs the graph, batched and
    single, and equals eager. The worker's imports hold no build code."""
    unpacked = extract_archive(efficientnet_archive, tmp_path / "unpacked")
    photos = [str(p) for p in val_photos(datasets_dir, 9)]
    result, _ = run_in_serving_environment(f"""
        import json, sys, torch
        import numpy as np
        torch.set_num_threads(1)
        import handlers.recognition_handler
        from handlers.arrays import softmax
        from handlers.imaging import ImagePreprocessor
        from handlers.recognizer import load_recognizer
        from handlers.runtime import cpu_precisions
        fast = load_recognizer({str(unpacked)!r})
        openvino = load_recognizer({str(unpacked)!r}, engine="openvino")
        eager = load_recognizer({str(unpacked)!r}, engine="eager")
        preprocess = ImagePreprocessor(eager.backbone.preprocessing)
        images = np.stack([preprocess(open(p, "rb").read()) for p in {photos!r}])
        reference = softmax(eager.recognizer(images))
        batched = softmax(fast.recognizer(images))
        single = softmax(np.concatenate([fast.recognizer(image[None]) for image in images]))
        other = softmax(openvino.recognizer(images))
        print(json.dumps({{"runtime": fast.recognizer.runtime, "threads": fast.recognizer.network.body.threads,
                          "other": openvino.recognizer.runtime, "precision": fast.recognizer.precision,
                          "precisions": sorted(cpu_precisions()), "rows": len(batched),
                          "build_modules": sorted(name for name, module in sys.modules.items() if module is not None
                                                  and (name.split(".")[0] in ("imagerec", "onnxscript", "onnx", "training", "scripts")
                                                       or name in ("openvino.torch", "torch.onnx"))),
                          "difference": float(max(np.abs(batched - reference).max(),
                                                  np.abs(single - reference).max(),
                                                  np.abs(other - reference).max()))}}))
    """, env={HIDE_FLAGS_VAR: "avx512_bf16,amx_bf16"})
    assert result["runtime"] == "onnxruntime" and result["other"] == "openvino" and result["threads"] == 1
    assert result["precisions"] == ["fp32"] and result["precision"] == "fp32"
    assert result["rows"] == len(photos) and result["difference"] < 1e-4, result
    # The worker imports the runtime only: no exporter, no build code, not OpenVINO's torch backend.
    assert result["build_modules"] == [], result["build_modules"]


@pytest.mark.parametrize("damage", ["garbage", "missing", "truncated_unrecorded"])
def test_a_damaged_graph_runs_eager_with_a_warning(efficientnet_archive, datasets_dir, tmp_path, caplog, damage):
    unpacked = extract_archive(efficientnet_archive, tmp_path / "unpacked")
    graph = unpacked / "features.onnx"
    if damage == "garbage":
        graph.write_bytes(b"not a graph")
    elif damage == "missing":
        graph.unlink()
    else:  # cut in half, and the manifest holds no hash to notice it by: the engine itself fails
        graph.write_bytes(graph.read_bytes()[: graph.stat().st_size // 2])
        info = json.loads((unpacked / "model_info.json").read_text())
        del info["features"]["graph_sha256"]
        (unpacked / "model_info.json").write_text(json.dumps(info))
    caplog.set_level(logging.WARNING, logger="handlers.runtime")
    loaded = load_recognizer(unpacked)
    assert loaded.recognizer.runtime == "eager"
    assert "backbone graph not used, running the eager backbone instead" in caplog.text
    reference = load_recognizer(extract_archive(efficientnet_archive, tmp_path / "intact"), engine="eager")
    preprocessor = ImagePreprocessor(loaded.backbone.preprocessing)
    images = np.stack([preprocessor(p.read_bytes()) for p in val_photos(datasets_dir, 3)])
    assert np.array_equal(loaded.recognizer(images), reference.recognizer(images))


def test_damaged_weights_are_refused_rather_than_answered(efficientnet_archive, tmp_path):
    unpacked = extract_archive(efficientnet_archive, tmp_path / "unpacked")
    data = bytearray((unpacked / "features.onnx.data").read_bytes())
    data[1000:1064] = bytes(64)
    (unpacked / "features.onnx.data").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="damaged"):
        load_recognizer(unpacked)


@pytest.fixture(scope="module")
def guard_photos(datasets_dir, tmp_path_factory):
    """A labelled ImageNet subset (every 5th photo of imagenet-sample500): the guard's mechanics, quickly."""
    source = datasets_dir / "imagenet-sample500"
    rows = (source / "labels.tsv").read_text().splitlines()
    folder = tmp_path_factory.mktemp("guard-photos")
    lines = [rows[0]]
    for row in rows[1::5]:
        file, index, synset = row.split("\t")
        lines.append(f"{source / file}\t{index}\t{synset}")  # absolute paths: the photos stay in shared/
    (folder / "labels.tsv").write_text("\n".join(lines) + "\n")
    return folder


def test_the_guard_refuses_a_precision_that_drops_accuracy(guard_photos):
    """A deliberately bad setting (features blurred by noise, as a broken quantisation would) loses
    far more than a point of Top-1 and is refused; fp32 itself is a sound reference."""
    backbone = get_backbone("efficientnet_lite0")
    weights = backbone.resolve_weights()
    graph_dir = exported_graph_dir(backbone.name, weights)
    fp32 = graph_features(graph_dir, "fp32")
    generator = np.random.default_rng(0)

    def bad(images):
        features = fp32(images)
        return features + 2.0 * features.std() * generator.standard_normal(features.shape, np.float32)

    verdicts = guard_imagenet(graph_dir, backbone.name, backbone.load(weights).classifier, guard_photos,
                              candidates={"bad": bad, "same": fp32})
    assert verdicts["bad"]["allowed"] is False and "more than 0.010 of fp32" in verdicts["bad"]["reason"]
    assert verdicts["bad"]["bad"] < verdicts["bad"]["fp32"] - 0.1
    assert verdicts["same"]["allowed"] is True and verdicts["same"]["same"] == verdicts["same"]["fp32"]
    assert verdicts["same"]["fp32"] > 0.7 and verdicts["same"]["images"] == 100


def test_the_worker_uses_a_precision_only_where_the_guard_allowed_it_and_the_cpu_has_it(monkeypatch):
    allowed = {"precision": "auto", "precision_guard": {"bf16": {"allowed": True, "reason": "within"}}}
    refused = {"precision": "auto", "precision_guard": {"bf16": {"allowed": False, "reason": "Top-1 fell 3 points"}}}
    native, fast = "bf16" in cpu_precisions(), bool(cpu_flags() & FAST_BF16_FLAGS)
    precision, why = choose_precision(allowed)
    assert precision == ("bf16" if fast else "fp32"), why
    if native and not fast:
        assert "no AMX" in why
    monkeypatch.setenv(PRECISION_VAR, "bf16")  # an operator who wants bf16 without AMX
    assert choose_precision(allowed)[0] == ("bf16" if native else "fp32")
    precision, why = choose_precision(refused)
    assert precision == "fp32" and "refused by the accuracy guard: Top-1 fell 3 points" in why
    assert choose_precision({**allowed, "precision": "fp32"})[0] == "fp32"
    monkeypatch.setenv(HIDE_FLAGS_VAR, "avx512_bf16,amx_bf16")  # a CPU without bf16
    assert choose_precision(allowed) == ("fp32", "this CPU has no native bf16")
    assert choose_precision({"precision": "auto"})[1].endswith("not judged when the archive was built")


def test_a_refused_precision_is_logged_by_the_served_worker(torchserve_factory, guard_photos, archive_dir, tmp_path):
    """The guard's real verdict for a deliberately bad tolerance (reduced precision must be 50 points
    better than fp32) goes into the manifest; the worker serves fp32 and its log says why."""
    result = subprocess.run(
        [str(PROJECT_ROOT / ".venv" / "bin" / "python"), str(PROJECT_ROOT / "scripts" / "build_archive.py"),
         "--backbone", "efficientnet_lite0", "--name", "strict_guard", "--out", str(tmp_path),
         "--guard-photos", str(guard_photos), "--guard-tolerance", "-0.5"],
        capture_output=True, text=True, timeout=600, cwd=PROJECT_ROOT, env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    archive = tmp_path / "strict_guard_v1.0.mar"
    verdict = read_archive_info(archive)["precision_guard"]["bf16"]
    assert verdict["allowed"] is False
    server = torchserve_factory([archive], models=f"strict_guard={archive.name}")
    log = (server.log_dir / "model_log.log").read_text()
    assert "backbone precision fp32: bf16 refused by the accuracy guard" in log
    assert "backbone efficientnet_lite0 (fp32, onnxruntime)" in log


def test_an_archive_without_the_guard_s_verdict_never_reduces(efficientnet_archive):
    info = read_archive_info(efficientnet_archive)
    assert info["precision"] == "auto" and info["precision_guard"] == {}
    assert choose_precision(info)[0] == "fp32"
