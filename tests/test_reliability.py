"""Reliability under misuse and at the edges (issue 9): archive builds that touch nothing outside their
output, thin-image bombs, bad names in a snapshot, stops that answer every accepted request, a port
already in use, compiled backbones a killed worker leaves behind."""

from __future__ import annotations

import http.client
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest
import requests

from handlers.backbones import get_backbone, imagenet_categories
from handlers.constants import MAX_ASPECT_RATIO
from handlers.imaging import ImageError, ImagePreprocessor, decode_image
from imagerec.archive import build_archive
from imagerec.paths import PROJECT_ROOT
from imagerec.torchserve import (
    TorchServe,
    auth_header,
    free_ports,
    install_archive,
    latest_snapshot,
    read_keys,
    read_properties,
    write_properties,
)
from tests import images
from tests.support import BUILD



# -- 1. archive builds touch nothing outside their output folder ------------------------------------
def test_a_build_leaves_a_folder_named_like_the_model_in_the_temp_dir_alone(resnet18_weights, tmp_path, monkeypatch):
    """torch-model-archiver empties and deletes $TMPDIR/<model name>: it must never see the user's TMPDIR."""
    temp = tmp_path / "tmp"
    precious = temp / "nc"
    precious.mkdir(parents=True)
    (precious / "thesis.txt").write_text("four years of work")
    monkeypatch.setenv("TMPDIR", str(temp))
    monkeypatch.setattr(tempfile, "tempdir", None)  # forget the cached temp dir: use $TMPDIR as a user would

    build_archive(name="nc", version="1", backbone_name="resnet18", weights_path=resnet18_weights,
                  labels=imagenet_categories(), out_dir=tmp_path / "out")

    assert (precious / "thesis.txt").read_text() == "four years of work"
    assert sorted(p.name for p in temp.iterdir()) == ["nc"], "the build left something in the temp dir"
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["nc_v1.mar"]


def test_two_concurrent_builds_with_the_same_name_both_succeed(resnet18_weights, tmp_path):
    """Two processes, one TMPDIR, the same model name and weights: neither deletes the other's files."""
    temp = tmp_path / "tmp"
    temp.mkdir()
    env = {**os.environ, "TMPDIR": str(temp)}
    builds = [
        subprocess.Popen(BUILD + ["--backbone", "resnet18", "--weights", str(resnet18_weights), "--name", "same",
                                  "--version", "1", "--out", str(tmp_path / f"out{i}")],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)
    ]
    outcomes = [build.communicate(timeout=300) for build in builds]
    for build, (stdout, stderr) in zip(builds, outcomes):
        assert build.returncode == 0, stderr
    for i in range(2):
        assert (tmp_path / f"out{i}" / "same_v1.mar").is_file()
    assert list(temp.iterdir()) == []


# -- 3. thin images: few pixels, but an enormous image once the short side is resized -------------------
@pytest.mark.parametrize("thin", [(1, 20_000), (20_000, 1), (3, 2_000)], ids=["1x20000", "20000x1", "3x2000"])
def test_a_thin_png_is_refused_before_its_resize(thin):
    """1x20000 passes the megapixel limit; resized to a 256 short side it would be 256x5,120,000 (5.5 GB)."""
    data = images.thin_png(*thin)
    preprocessor = ImagePreprocessor(get_backbone("efficientnet_lite0").preprocessing)
    for step in (decode_image, preprocessor.geometry):
        with pytest.raises(ImageError) as caught:
            step(data)
        assert caught.value.status == 413 and "aspect ratio" in str(caught.value)


def test_a_wide_panorama_within_the_aspect_limit_is_still_accepted():
    data = images.encode(images.sample().resize((MAX_ASPECT_RATIO * 64, 64)), "PNG")
    geometry = ImagePreprocessor(get_backbone("efficientnet_lite0").preprocessing).geometry(data)
    assert tuple(geometry.shape) == (3, 224, 224)


def test_a_served_model_answers_a_thin_png_with_413_at_once(imagenet_server):
    started = time.monotonic()
    response = imagenet_server.predict("efficientnet_lite0", images.thin_png(), content_type="image/png")
    elapsed = time.monotonic() - started
    assert response.status_code == 413, (response.status_code, response.text[:300], f"{elapsed:.1f}s")
    assert "aspect ratio" in response.json()["error"]
    logging.getLogger(__name__).info("thin PNG refused in %.3f s", elapsed)
    ok = imagenet_server.predict("efficientnet_lite0", images.encode(images.sample(), "JPEG"))
    assert ok.status_code == 200  # the worker is still serving


# -- 4. a bad model name in a snapshot must not stop every restart ----------------------------------
def test_latest_snapshot_defaults_to_the_highest_version_in_natural_order(tmp_path):
    store, snapshots = tmp_path / "store", tmp_path / "config"
    store.mkdir()
    snapshots.mkdir()
    versions = {}
    for version in ("9", "10", "2"):
        (store / f"m_v{version}.mar").write_bytes(b"")
        versions[version] = {"marName": f"m_v{version}.mar", "defaultVersion": False}
    write_properties(snapshots / "1-snapshot.cfg", {"model_snapshot": json.dumps({"models": {"m": versions}})})
    snapshot = latest_snapshot(snapshots, store)
    assert [v for v, entry in snapshot["models"]["m"].items() if entry["defaultVersion"]] == ["10"]


BAD_NAMES = ("../evil", "a;touch x")


def test_a_restart_with_bad_names_in_the_snapshot_comes_back_without_them(efficientnet_archive, tmp_path, caplog):
    store = tmp_path / "store"
    install_archive(efficientnet_archive, store)
    server = TorchServe(model_store=store, workdir=tmp_path / "work",
                        models=f"efficientnet_lite0={efficientnet_archive.name}")
    server.start(snapshots=True)
    try:
        server.stop()
        # What a registration through the raw management API leaves in TorchServe's snapshot.
        snapshot = latest_snapshot(server.snapshot_dir, store)
        good = snapshot["models"]["efficientnet_lite0"]
        for bad in BAD_NAMES:
            snapshot["models"][bad] = json.loads(json.dumps(good))
        snapshot["modelCount"] = len(snapshot["models"])
        write_properties(server.snapshot_dir / "99999999999999999-snapshot.cfg",
                         {"model_snapshot": json.dumps(snapshot)})

        with caplog.at_level(logging.WARNING, logger="imagerec.torchserve"):
            server.start(restore=True)
        names = [m["modelName"] for m in server.management("GET", "/models").json()["models"]]
        assert names == ["efficientnet_lite0"]
        for bad in BAD_NAMES:
            assert any(repr(bad) in record.getMessage() for record in caplog.records), bad
        ok = server.predict("efficientnet_lite0", images.encode(images.sample(), "JPEG"))
        assert ok.status_code == 200

        # Registered again through the raw API: `manage.py list` lists them, flagged, and exits 0.
        for bad in BAD_NAMES:
            response = server.management("POST", "/models", params={
                "url": efficientnet_archive.name, "model_name": bad, "initial_workers": "0"})
            assert response.status_code == 200, response.text
        listed = subprocess.run(
            [sys.executable, str(PROJECT_ROOT / "scripts" / "manage.py"), "--management", server.management_url,
             "--inference", server.inference_url, "--key-file", str(server.key_file), "--model-store", str(store),
             "list"], capture_output=True, text=True, timeout=60)
        assert listed.returncode == 0, listed.stderr
        rows = {row["name"]: row for row in json.loads(listed.stdout)}
        assert set(rows) == {"efficientnet_lite0", *BAD_NAMES}
        assert all("refused_name" in rows[bad] for bad in BAD_NAMES)
        assert rows["efficientnet_lite0"]["versions"][0]["workers"][0]["status"] == "READY"

        # And the next restart drops them again: the server always comes back.
        server.restart()
        names = [m["modelName"] for m in server.management("GET", "/models").json()["models"]]
        assert names == ["efficientnet_lite0"]
    finally:
        server.stop()


# -- 5. a stop answers every request it accepted ------------------------------------------------------
def _wait_serving(workdir, process, deadline: float) -> tuple[str, str]:
    """(inference URL, inference key) once the serve.py in ``workdir`` answers a prediction."""
    photo = images.encode(images.sample(), "JPEG")
    while time.monotonic() < deadline:
        assert process.poll() is None, f"serve.py exited with {process.returncode}"
        try:
            url = read_properties(workdir / "config.properties")["inference_address"]
            key = read_keys(workdir / "key_file.json")["inference"]
            response = requests.put(f"{url}/predictions/efficientnet_lite0", data=photo,
                                    headers=auth_header(key), timeout=10)
            if response.status_code == 200:
                return url, key
        except (OSError, KeyError, ValueError, requests.RequestException):
            pass
        time.sleep(1)
    raise TimeoutError("serve.py did not serve in time")


def test_sigterm_to_serve_py_under_load_answers_every_request_sent_before_it(efficientnet_archive, tmp_path):
    store, workdir = tmp_path / "store", tmp_path / "work"
    install_archive(efficientnet_archive, store)
    log = open(tmp_path / "serve.log", "wb")
    serve = subprocess.Popen(
        [sys.executable, str(PROJECT_ROOT / "scripts" / "serve.py"), "--backbone", "efficientnet_lite0",
         "--version", "1.0", "--model-store", str(store), "--workdir", str(workdir), "--free-ports",
         "--no-restore", "--drain-timeout", "60"],
        stdout=log, stderr=subprocess.STDOUT)
    try:
        url, key = _wait_serving(workdir, serve, time.monotonic() + 300)
        group = [serve.pid] + [p.pid for p in psutil.Process(serve.pid).children(recursive=True)]
        host, port = url.removeprefix("http://").split(":")
        photo = images.encode(images.sample("grace_hopper.jpg"), "JPEG")
        # A request counts as sent before the signal once its bytes are written: the lock keeps the
        # signal from falling between the start of a request and the end of its writing.
        writing, signalled = threading.Lock(), threading.Event()
        outcomes: list = []  # HTTP status or exception of every request sent before the signal
        in_flight = [0]  # requests written and not yet answered

        def client():
            for _ in range(500):  # bounded; stops at the signal anyway
                connection = http.client.HTTPConnection(host, int(port), timeout=90)
                try:
                    with writing:
                        if signalled.is_set():
                            return
                        connection.request("PUT", "/predictions/efficientnet_lite0", body=photo,
                                           headers={**auth_header(key), "Content-Type": "image/jpeg"})
                        in_flight[0] += 1
                    try:
                        outcomes.append(connection.getresponse().status)
                    finally:
                        with writing:
                            in_flight[0] -= 1
                except (OSError, http.client.HTTPException) as error:
                    outcomes.append(error)
                finally:
                    connection.close()

        threads = [threading.Thread(target=client) for _ in range(4)]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 120
        while len(outcomes) < 8 and time.monotonic() < deadline:  # steady load: queued and batched requests
            time.sleep(0.1)
        with writing:
            serve.send_signal(signal.SIGTERM)
            signalled.set()
            in_flight_at_signal = in_flight[0]
        for thread in threads:
            thread.join(timeout=120)
        assert serve.wait(timeout=120) == 0
        lost = [outcome for outcome in outcomes if outcome != 200]
        assert in_flight_at_signal >= 1, "no request was in flight at the signal: nothing was tested"
        logging.getLogger(__name__).info("%d requests in flight at SIGTERM, %d sent in all",
                                         in_flight_at_signal, len(outcomes))
        assert not lost, f"{len(lost)} of {len(outcomes)} requests sent before SIGTERM not answered 200: {lost}"
        left = [pid for pid in group if psutil.pid_exists(pid)
                and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
        assert not left, f"processes left after the stop: {left}"
    finally:
        if serve.poll() is None:
            serve.kill()
        log.close()


def test_a_stopping_server_answers_new_requests_503_with_retry_after_and_finishes_the_admitted(
        efficientnet_archive, tmp_path):
    """Behind the admission front, a stop refuses new requests with 503 + Retry-After (a client
    retries, or goes to another replica), not TorchServe's 400 of a replaced key, and every request
    the front had admitted is still answered 200."""
    store = tmp_path / "store"
    install_archive(efficientnet_archive, store)
    server = TorchServe(model_store=store, workdir=tmp_path / "work", models=f"efficientnet_lite0={efficientnet_archive.name}",
                        front=True)
    photo = images.encode(images.sample("grace_hopper.jpg"), "JPEG")
    with server:
        key = server.keys["inference"]
        with ThreadPoolExecutor(8) as pool:
            sent = [pool.submit(server.predict, "efficientnet_lite0", photo, timeout=60) for _ in range(8)]
            in_flight, deadline = 0, time.monotonic() + 30
            while in_flight == 0 and time.monotonic() < deadline:  # until the front holds some
                in_flight = requests.get(server.inference_url + "/front/status", timeout=5).json()["inflight_requests"]
            server.refuse_new_requests()
            late = server.predict("efficientnet_lite0", photo, timeout=60)
            statuses = [future.result().status_code for future in sent]
        assert late.status_code == 503, late.text
        assert late.headers.get("Retry-After", "").isdigit() and "shutting down" in late.json()["message"]
        assert late.headers.get("Connection", "").lower() == "close"
        # Sent before the refusal: answered, or refused like the late one if they reached the front
        # after it; never anything else (a replaced key answered admitted requests 400).
        assert set(statuses) <= {200, 503}, statuses
        assert in_flight >= 1 and statuses.count(200) >= in_flight, (in_flight, statuses)
        assert server.keys["inference"] == key  # the key was not replaced: nothing admitted can be refused
        assert server.drain(timeout=30)
        assert requests.get(server.inference_url + "/front/status", timeout=5).json() == {
            "inflight_requests": 0, "draining": True}


def test_a_port_in_use_is_named_before_torchserve_starts(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        inference, metrics = free_ports(2, avoid={port})
        server = TorchServe(model_store=tmp_path / "store", workdir=tmp_path / "work",
                            ports=(inference, port, metrics))
        with pytest.raises(RuntimeError, match=re.escape(f"127.0.0.1:{port} (management_address)")):
            server.start(timeout=60)
