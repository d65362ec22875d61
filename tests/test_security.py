"""Both APIs need their key, management listens on loopback only, registration only from the model store.

A TorchServe with no model is enough to prove the API rules (it starts in seconds); the archive
used for registration attempts is a real one, placed outside the model store.
"""

from __future__ import annotations

import http.server
import ipaddress
import json
import subprocess
import sys
import threading
import zipfile
from pathlib import Path
from urllib.parse import urlparse

import psutil
import pytest
import requests

from handlers.layout import MAR_MANIFEST_FILE
from imagerec import management as manage
from imagerec.paths import PROJECT_ROOT, SHIPPED_CONFIG
from imagerec.torchserve import auth_header, read_properties

MANAGE = PROJECT_ROOT / "scripts" / "manage.py"


@pytest.fixture(scope="module")
def server(empty_server_factory):
    return empty_server_factory()


class _Recorder(http.server.BaseHTTPRequestHandler):
    """Answers every request with a fixed body and remembers the paths it was asked for."""

    body = b""
    seen: list = []

    def do_GET(self):  # noqa: N802 (http.server's naming)
        self.seen.append((self.command, self.path))
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    do_POST = do_PUT = do_DELETE = do_GET

    def log_message(self, *args):
        pass


@pytest.fixture
def recorder(efficientnet_archive):
    """A loopback HTTP server offering a real .mar, recording every request it receives."""
    handler = type("Recorder", (_Recorder,), {"body": efficientnet_archive.read_bytes(), "seen": []})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_port}", handler.seen
    httpd.shutdown()
    httpd.server_close()


def refused_for_key(response: requests.Response) -> bool:
    # TorchServe 0.12 answers a missing or wrong token with 400 InvalidKeyException (not 401).
    return response.status_code == 400 and response.json().get("type") == "InvalidKeyException"


def test_management_api_refuses_missing_and_wrong_keys(server):
    url = server.management_url + "/models"
    assert refused_for_key(requests.get(url, timeout=10))
    assert refused_for_key(requests.get(url, headers=auth_header("wrong-key"), timeout=10))
    assert refused_for_key(requests.get(url, headers=auth_header(server.keys["inference"]), timeout=10))
    assert refused_for_key(requests.post(url, params={"url": "x.mar"}, timeout=10))
    assert requests.get(url, headers=auth_header(server.keys["management"]), timeout=10).status_code == 200


def test_inference_api_refuses_missing_and_wrong_keys(server):
    url = server.inference_url + "/predictions/efficientnet_lite0"
    assert refused_for_key(requests.put(url, data=b"x", timeout=10))
    assert refused_for_key(requests.put(url, data=b"x", headers=auth_header("wrong-key"), timeout=10))
    assert refused_for_key(requests.put(url, data=b"x", headers=auth_header(server.keys["management"]), timeout=10))
    # The right key gets past authorisation (to "no such model": nothing is registered here).
    assert requests.put(url, data=b"x", headers=auth_header(server.keys["inference"]), timeout=10).status_code == 404


def test_shipped_config_binds_every_api_to_loopback(server):
    shipped = read_properties(SHIPPED_CONFIG)
    for api in ("inference", "management", "metrics"):
        assert urlparse(shipped[f"{api}_address"]).hostname == "127.0.0.1", api
    assert shipped["enable_model_api"] == "true" and "allowed_urls" in shipped
    # The running server (shipped config, other ports) really listens on loopback only.
    launcher = psutil.Process(server.process.pid)
    listening = []
    for process in [launcher, *launcher.children(recursive=True)]:
        try:
            listening += [c.laddr for c in process.net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN]
        except psutil.NoSuchProcess:
            continue  # a short-lived helper of the launcher
    ports = {urlparse(getattr(server, f"{api}_url")).port for api in ("inference", "management", "metrics")}
    assert ports <= {addr.port for addr in listening}
    # Java reports IPv4 sockets as IPv4-mapped IPv6 (::ffff:127.0.0.1).
    bound = {ipaddress.ip_address(addr.ip) for addr in listening if addr.port in ports}
    assert {getattr(ip, "ipv4_mapped", None) or ip for ip in bound} == {ipaddress.ip_address("127.0.0.1")}


def test_registration_from_a_url_is_refused_before_anything_is_downloaded(server, recorder):
    base, seen = recorder
    for url in (f"{base}/efficientnet_lite0_v1.0.mar", f"https://127.0.0.1:{urlparse(base).port}/x.mar"):
        response = server.management("POST", "/models", params={"url": url, "synchronous": "true"}, timeout=60)
        assert response.status_code == 404 and "does not match any allowed URL" in response.text, url
    # 0.12 takes an s3:// URL for a file name in the store (none such): refused as well.
    response = server.management("POST", "/models", params={"url": "s3://bucket/x.mar"}, timeout=60)
    assert response.status_code == 404, response.text
    assert seen == []  # TorchServe never fetched it
    assert server.management("GET", "/models").json()["models"] == []


def test_registration_from_paths_outside_the_model_store_is_refused(server, efficientnet_archive):
    outside = efficientnet_archive.resolve()
    assert outside.parent != server.model_store
    relative = Path("..") / ".." / outside.relative_to(outside.anchor)
    for url in (str(outside), f"file://{outside}", f"../{outside.name}", str(relative)):
        response = server.management("POST", "/models", params={"url": url, "synchronous": "true"}, timeout=60)
        assert response.status_code == 404, (url, response.text)
    assert server.management("GET", "/models").json()["models"] == []


def test_manage_validates_names_and_versions_before_reaching_torchserve(server, recorder, efficientnet_archive,
                                                                        tmp_path):
    base, seen = recorder  # a management URL that records whatever reaches it
    key_file = tmp_path / "key_file.json"
    key_file.write_text(json.dumps({r: {"key": "k"} for r in ("management", "inference", "API")}))
    store = tmp_path / "store"
    evil = tmp_path / "evil.mar"
    with zipfile.ZipFile(efficientnet_archive) as source, zipfile.ZipFile(evil, "w") as copy:
        for item in source.infolist():
            data = source.read(item.filename)
            if item.filename == MAR_MANIFEST_FILE:
                manifest = json.loads(data)
                manifest["model"]["modelName"] = "../../evil"
                data = json.dumps(manifest).encode()
            copy.writestr(item, data)

    def run(*args):
        return subprocess.run([sys.executable, str(MANAGE), "--management", base, "--inference", base,
                               "--key-file", str(key_file), "--model-store", str(store), *map(str, args)],
                              capture_output=True, text=True, timeout=60)

    for args in (("describe", "../etc"), ("retire", "m", "1/../../2"), ("scale", "a b", "--workers", "1"),
                 ("rollback", "m", "--to", "..")):
        result = run(*args)
        assert result.returncode == manage.EXIT_BAD_ARGUMENTS, (args, result.stderr)
        assert "invalid" in result.stderr
    result = run("register", evil)
    assert result.returncode == manage.EXIT_BAD_ARGUMENTS and "invalid model name" in result.stderr
    assert seen == []
    assert not store.exists() or not any(store.iterdir())
