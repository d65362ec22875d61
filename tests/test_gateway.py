"""The authenticating gateway with a real TorchServe: one client token, readiness only after checks.

The gateway (scripts/gateway.py) prepares the model set on the TorchServe behind it: registers each
version, sends it its check images, makes it the default; only then does /ready answer 200.
"""

from __future__ import annotations

import signal

import pytest
import requests

from imagerec.torchserve import install_archive
from benchmarks.lifecycle_heads import CLASSES, NAME, head_archives, val_photos
from tests.replicas import GatewayProcess, write_model_set

CLIENT_TOKEN = "client-token-for-tests-0123456789"


@pytest.fixture(scope="module")
def heads(datasets_dir, tmp_path_factory):
    return head_archives(datasets_dir, tmp_path_factory.mktemp("gateway-heads"))


@pytest.fixture(scope="module")
def server(empty_server_factory, heads):
    server = empty_server_factory()
    for archive in heads.values():
        install_archive(archive, server.model_store)
    return server


def test_failed_check_keeps_the_replica_unready(server, heads, datasets_dir, tmp_path):
    """Check images whose expected labels are wrong: the version is never made ready nor left registered."""
    bees = sorted((datasets_dir / "hymenoptera" / "val" / "bees").iterdir())[:3]
    model_set = write_model_set(tmp_path / "model-set.json", "mislabelled", [{
        "name": NAME, "version": "1", "archive": heads["1"].name,
        "checks": [{"file": str(path), "label": "ants"} for path in bees],  # bees labelled ants
    }])
    (tmp_path / "token").write_text(CLIENT_TOKEN + "\n")
    gateway = GatewayProcess.for_server(server, tmp_path, model_set=model_set, token_file=tmp_path / "token").start()
    try:
        status, body = gateway.wait_for(lambda s, b: "check" in b.get("reason", ""), timeout=240)
        assert status == 503, body
        assert "failed" in body["reason"], body
        assert server.management("GET", f"/models/{NAME}").status_code == 404  # deploy removed it again
        status, body = gateway.readiness()  # and it stays unready (a failed check is not retried)
        assert status == 503
    finally:
        assert gateway.stop() == 0


def test_one_client_token_and_readiness_after_checks(server, heads, datasets_dir, tmp_path):
    model_set = write_model_set(tmp_path / "model-set.json", "heads-1",
                                [{"name": NAME, "version": "1", "archive": heads["1"].name}])
    token_file = tmp_path / "token"
    token_file.write_text(CLIENT_TOKEN + "\n")
    gateway = GatewayProcess.for_server(server, tmp_path, model_set=model_set, token_file=token_file).start()
    try:
        status, body = gateway.wait_for(lambda s, b: s != -1, timeout=60)  # listening
        assert status == 503 and body["ready"] is False, body  # not before the set is loaded and checked
        assert requests.get(gateway.url + "/live", timeout=5).status_code == 200
        gateway.wait_ready()
        assert gateway.readiness()[1] == {"ready": True, "revision": "heads-1"}
        described = server.management("GET", f"/models/{NAME}").json()[0]
        assert described["modelVersion"] == "1"

        photo = val_photos(datasets_dir, per_class=1)[0]
        url = f"{gateway.url}/predictions/{NAME}"

        def put(token: str | None, target: str = url) -> requests.Response:
            headers = {"Content-Type": "application/octet-stream"}
            if token is not None:
                headers["Authorization"] = f"Bearer {token}"
            return requests.put(target, data=photo, headers=headers, timeout=60)

        answer = put(CLIENT_TOKEN)
        assert answer.status_code == 200, answer.text
        assert answer.headers["X-Model-Version"] == "1"
        assert answer.json()[0]["label"] in CLASSES
        assert put(CLIENT_TOKEN, url + "/1").status_code == 200  # a version URL passes as well
        # Wrong, missing, and TorchServe's own keys: 401 from the gateway, never forwarded.
        for token in ("wrong-token", None, server.keys["inference"], server.keys["management"], CLIENT_TOKEN[:-1]):
            refused = put(token)
            assert refused.status_code == 401, (token, refused.status_code)
            assert "X-Model-Version" not in refused.headers
        # TorchServe's errors pass through unchanged (JSON error of the handler).
        bad = requests.put(url, data=b"not an image", timeout=30,
                           headers={"Authorization": f"Bearer {CLIENT_TOKEN}", "Content-Type": "image/jpeg"})
        assert bad.status_code == 415 and "not an image" in bad.json()["error"]
        # Rotation: a second token line in the Secret works at once, without a restart.
        token_file.write_text(f"{CLIENT_TOKEN}\nnext-client-token-9876543210\n")
        assert put("next-client-token-9876543210").status_code == 200
        assert put(CLIENT_TOKEN).status_code == 200
        # Metrics through the gateway (read-only, no token).
        metrics = requests.get(gateway.url + "/metrics", timeout=10)
        assert metrics.status_code == 200 and "PredictionsByLabel" in metrics.text

        # Drain: unready at once on SIGTERM, then it exits cleanly.
        gateway.signal(signal.SIGTERM)
        status, body = gateway.wait_for(lambda s, b: s != 200, timeout=10)
        assert (status, body.get("reason")) in ((503, "draining"), (-1, "ConnectionError")), body
        assert gateway.wait(30) == 0, gateway.tail()
    finally:
        gateway.stop()
