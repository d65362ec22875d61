"""ImageNet Top-3 through a real TorchServe: real archives, real HTTP, token authorization on."""

import concurrent.futures
import shutil
import subprocess

import pytest
import numpy as np
import requests

from handlers.arrays import softmax
from handlers.layout import extract_archive
from imagerec.archive import BatchingConfig, build_archive
from handlers.backbones import get_backbone, imagenet_categories
from handlers.imaging import ImagePreprocessor
from handlers.recognizer import load_recognizer
from imagerec.torchserve import auth_header
from tests import images

CAT_LABELS = {"tabby", "tiger cat", "Egyptian cat", "Persian cat", "Siamese cat"}
UNIFORM_LABELS = {"military uniform", "mortarboard", "academic gown"}


def top3(server, model, data, **kwargs):
    response = server.predict(model, data, **kwargs)
    assert response.status_code == 200, response.text
    return response.json()


def assert_well_formed(answer, trained: bool = True):
    """Top-3 sorted, indices naming their labels; ``trained``: a genuinely trained model is sure of
    something (the self-made resnet18 weights of the tests are not trained)."""
    assert len(answer) == 3
    probabilities = [entry["probability"] for entry in answer]
    assert probabilities == sorted(probabilities, reverse=True)
    if trained:
        assert probabilities[0] > 10 / len(imagenet_categories())  # well above a uniform answer
    categories = imagenet_categories()
    assert all(categories[entry["index"]] == entry["label"] for entry in answer)


def test_real_photos_get_sensible_labels(imagenet_server, samples_dir):
    coffee = top3(imagenet_server, "efficientnet_lite0", (samples_dir / "coffee.png").read_bytes())
    cat = top3(imagenet_server, "efficientnet_lite0", (samples_dir / "chelsea.png").read_bytes())
    hopper = top3(imagenet_server, "efficientnet_lite0", (samples_dir / "grace_hopper.jpg").read_bytes())
    for answer in (coffee, cat, hopper):
        assert_well_formed(answer)
    assert coffee[0]["label"] == "espresso" and coffee[0]["index"] == 967
    assert CAT_LABELS & {entry["label"] for entry in cat}
    assert UNIFORM_LABELS & {entry["label"] for entry in hopper}


def test_resnet18_served_equals_in_process(imagenet_server, resnet18_archive, samples_dir, tmp_path):
    data = (samples_dir / "grace_hopper.jpg").read_bytes()
    served = top3(imagenet_server, "resnet18", data)
    loaded = load_recognizer(extract_archive(resnet18_archive, tmp_path))
    probabilities = softmax(loaded.recognizer(ImagePreprocessor(loaded.backbone.preprocessing)(data)[None]))[0]
    third_best = float(np.sort(probabilities)[-3])
    for entry in served:
        assert abs(entry["probability"] - float(probabilities[entry["index"]])) < 1e-4
        assert entry["probability"] >= third_best - 1e-4  # the served three are the top three
    assert_well_formed(served, trained=False)


@pytest.mark.parametrize("name", sorted(images.variants()))
def test_every_format_and_mode_is_answered(imagenet_server, name):
    answer = top3(imagenet_server, "efficientnet_lite0", images.variants()[name])
    assert_well_formed(answer)
    if "grey" not in name and "16bit" not in name:
        assert answer[0]["label"] == "espresso", f"{name}: {answer}"


def test_three_ways_of_sending_an_image(imagenet_server, samples_dir):
    data = (samples_dir / "coffee.png").read_bytes()
    url = imagenet_server.inference_url + "/predictions/efficientnet_lite0"
    key = auth_header(imagenet_server.keys["inference"])
    answers = [
        requests.put(url, data=data, headers={**key, "Content-Type": "application/octet-stream"}, timeout=30),
        requests.post(url, data=data, headers={**key, "Content-Type": "image/png"}, timeout=30),
        requests.post(url, files={"data": ("coffee.png", data, "image/png")}, headers=key, timeout=30),
    ]
    for response in answers:
        assert response.status_code == 200, response.text
        assert response.json()[0]["label"] == "espresso"
        assert response.headers["X-Model-Version"] == "1.0"


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_the_readme_curl_command(imagenet_server, samples_dir):
    key = imagenet_server.keys["inference"]
    result = subprocess.run(
        ["curl", "-sS", "--fail-with-body", "-H", f"Authorization: Bearer {key}",
         "-T", str(samples_dir / "coffee.png"), imagenet_server.inference_url + "/predictions/efficientnet_lite0"],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr + result.stdout
    assert '"label": "espresso"' in result.stdout


BAD_INPUTS = {
    "empty": (b"", 400, "empty"),
    "not-an-image": (b"GET / HTTP/1.1 certainly not an image", 415, "not an image"),
    "truncated": (images.truncated_jpeg(), 400, "truncated"),
    "decompression-bomb": (images.png_claiming_size(100_000, 100_000), 413, "decompression bomb"),
    "unsupported-format": (images.tiff(), 415, "TIFF"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_refused_and_the_worker_keeps_serving(imagenet_server, samples_dir, case):
    data, status, words = BAD_INPUTS[case]
    response = imagenet_server.predict("efficientnet_lite0", data)
    assert response.status_code == status, response.text
    assert words in response.json()["error"]
    assert top3(imagenet_server, "efficientnet_lite0", (samples_dir / "coffee.png").read_bytes())[0]["label"] == "espresso"


def test_a_12_megapixel_20mb_phone_photo_is_accepted(imagenet_server):
    photo = images.phone_photo()
    assert 15e6 < len(photo) <= 20 * 1024 * 1024
    assert_well_formed(top3(imagenet_server, "efficientnet_lite0", photo, timeout=60))


@pytest.mark.parametrize("api", ["inference", "management"])
@pytest.mark.parametrize("key", [None, "wrong-key"])
def test_requests_without_the_right_key_are_refused(imagenet_server, samples_dir, api, key):
    headers = auth_header(key) if key else {}
    if api == "inference":
        response = requests.put(
            imagenet_server.inference_url + "/predictions/efficientnet_lite0",
            data=(samples_dir / "coffee.png").read_bytes(),
            headers={**headers, "Content-Type": "image/png"}, timeout=30,
        )
    else:
        response = requests.get(imagenet_server.management_url + "/models", headers=headers, timeout=30)
    assert response.status_code == 400
    assert "Token Authorization failed" in response.json()["message"]


def test_in_a_batch_one_bad_image_fails_alone(torchserve_factory, archive_dir, samples_dir, tmp_path):
    """Requests arriving together are batched; each still gets its own answer."""
    backbone = get_backbone("efficientnet_lite0")
    archive = build_archive(
        name="batched", version="1.0", backbone_name=backbone.name, weights_path=backbone.resolve_weights(),
        labels=imagenet_categories(), out_dir=tmp_path,
        batching=BatchingConfig(batch_size=4, max_batch_delay_ms=2000),  # wait long enough to batch all four
    )
    server = torchserve_factory([archive], models=f"batched={archive.name}")
    bodies = [(samples_dir / "coffee.png").read_bytes(), b"", (samples_dir / "chelsea.png").read_bytes(), b"junk"]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        responses = list(pool.map(lambda body: server.predict("batched", body), bodies))
    assert [r.status_code for r in responses] == [200, 400, 200, 415]
    assert responses[0].json()[0]["label"] == "espresso"
    assert CAT_LABELS & {entry["label"] for entry in responses[2].json()}
    model_log = (server.log_dir / "model_log.log").read_text()
    assert "of a batch of 4" in model_log, "the four requests were expected to arrive as one batch"
