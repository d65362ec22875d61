"""The TorchServe handler without a server: a real ts Context over an unpacked archive, handle()."""

import json
from pathlib import Path

import pytest
import ts
from ts.context import Context, RequestProcessor
from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl

import numpy as np
from ts.metrics.metric_type_enum import MetricTypes

from handlers.arrays import softmax
from handlers.imaging import ImagePreprocessor
from handlers.layout import extract_archive
from handlers.recognition_handler import RecognitionHandler
from handlers.recognizer import load_recognizer
from tests import images

METRICS_CONFIG = Path(ts.__file__).parent / "configs" / "metrics.yaml"


@pytest.fixture(scope="module")
def model_dir(efficientnet_archive, tmp_path_factory):
    return extract_archive(efficientnet_archive, tmp_path_factory.mktemp("unpacked"))


def load_handler(model_dir, handler_options: dict):
    """What TorchServe's worker does at load time: make a Context over the unpacked archive, initialize()."""
    manifest = json.loads((model_dir / "MAR-INF" / "MANIFEST.json").read_text())
    metrics = MetricsCacheYamlImpl(config_file_path=str(METRICS_CONFIG))
    metrics.initialize_cache()
    context = Context(
        "efficientnet_lite0", str(model_dir), manifest, batch_size=8, gpu=None,
        mms_version=ts.__version__, metrics=metrics, model_yaml_config={"minWorkers": 1, "handler": handler_options},
    )
    handler = RecognitionHandler()
    handler.initialize(context)
    return handler, context


@pytest.fixture(scope="module")
def handler_and_context(model_dir):
    return load_handler(model_dir, {})


def handle(handler, context, rows):
    context.request_processor = [RequestProcessor({}) for _ in rows]
    return handler.handle(rows, context)


def test_a_batch_answers_each_request_and_refuses_only_the_bad_one(handler_and_context, samples_dir):
    handler, context = handler_and_context
    rows = [
        {"body": (samples_dir / "coffee.png").read_bytes()},
        {"body": b""},
        {"data": bytearray((samples_dir / "chelsea.png").read_bytes())},  # multipart upload
        {"body": images.truncated_jpeg()},
    ]
    answers = handle(handler, context, rows)
    assert len(answers) == 4
    assert answers[0][0]["label"] == "espresso"
    assert any("cat" in entry["label"] for entry in answers[2])
    assert "empty" in answers[1]["error"] and "truncated" in answers[3]["error"]
    assert [context.get_response_status(i)[0] for i in range(4)] == [200, 400, 200, 400]
    assert context.get_response_headers(0)["X-Model-Version"] == "1.0"


def test_answers_are_top3_sorted_with_indices_matching_labels(handler_and_context, model_dir, samples_dir):
    handler, context = handler_and_context
    [answer] = handle(handler, context, [{"body": (samples_dir / "grace_hopper.jpg").read_bytes()}])
    assert len(answer) == 3
    probabilities = [entry["probability"] for entry in answer]
    assert probabilities == sorted(probabilities, reverse=True)
    assert all(handler.labels[entry["index"]] == entry["label"] for entry in answer)
    # The same three classes and probabilities as the eager network on the same photo, computed
    # independently of the handler's batching, threading and compiled backbone.
    reference = load_recognizer(model_dir, engine="eager")
    photo = ImagePreprocessor(reference.backbone.preprocessing)((samples_dir / "grace_hopper.jpg").read_bytes())
    reference_probabilities = softmax(reference.recognizer(photo[None]))[0]
    top_i = np.argsort(-reference_probabilities)[:3]
    assert [entry["index"] for entry in answer] == top_i.tolist()
    assert probabilities == pytest.approx(reference_probabilities[top_i].tolist(), abs=1e-4)


def test_profile_true_times_each_step(model_dir, samples_dir):
    """``handler: profile: true`` (TorchServe's own switch) records how long each step took."""
    handler, context = load_handler(model_dir, {"profile": True})
    handle(handler, context, [{"body": (samples_dir / "coffee.png").read_bytes()}])
    for step in ("preprocess", "inference", "postprocess"):
        context.metrics.get_metric(f"ts_handler_{step}", MetricTypes.GAUGE)  # raises if never recorded


def test_text_instead_of_bytes_is_refused(handler_and_context):
    handler, context = handler_and_context
    [answer] = handle(handler, context, [{"body": {"image": "not bytes"}}])
    assert context.get_response_status(0)[0] == 415
    assert "expected image bytes" in answer["error"]
