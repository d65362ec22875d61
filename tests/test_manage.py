"""scripts/manage.py against a real TorchServe: register, deploy checks, refusals, rollback, restart.

One server for the module, started with snapshots on so that the restart test can restore it.
The CLI runs as a subprocess (as operators run it) so exit codes and messages are the real ones.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from benchmarks.lifecycle_heads import CLASSES, NAME, head_archives
from imagerec import management as manage
from imagerec.paths import PROJECT_ROOT
from imagerec.torchserve import TorchServe, free_port

MANAGE = PROJECT_ROOT / "scripts" / "manage.py"


@pytest.fixture(scope="module")
def heads(datasets_dir, archive_dir):
    return head_archives(datasets_dir, archive_dir)


@pytest.fixture(scope="module")
def server(tmp_path_factory, heads):
    root = tmp_path_factory.mktemp("manage")
    server = TorchServe(model_store=root / "model-store", workdir=root / "work")
    server.start(snapshots=True)
    try:
        # The contract train_head.py --register relies on: an archive from outside the store.
        manage.register_archive(heads["1"], management_url=server.management_url, key_file=server.key_file,
                                model_store=server.model_store, workers=1)
        yield server
    finally:
        server.stop()


@pytest.fixture
def client(server):
    return manage.Client(server.management_url, server.key_file, server.model_store, server.inference_url)


def cli(server, *args, timeout: float = 300) -> subprocess.CompletedProcess:
    command = [sys.executable, str(MANAGE), "--management", server.management_url, "--inference",
               server.inference_url, "--key-file", str(server.key_file), "--model-store", str(server.model_store),
               "--drain-seconds", "1", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout)


def answered_by(server, photo: bytes) -> str:
    response = server.predict(NAME, photo)
    assert response.status_code == 200, response.text
    assert response.json()[0]["label"] in CLASSES
    return response.headers["X-Model-Version"]


@pytest.fixture(scope="module")
def photo(datasets_dir) -> bytes:
    return sorted((datasets_dir / "hymenoptera" / "val" / "bees").iterdir())[0].read_bytes()


def test_register_archive_copies_into_the_store_and_waits_for_ready_workers(server, client, photo):
    assert (server.model_store / "bees_vs_ants_v1.mar").is_file()
    entry = client.describe(NAME, "1")
    assert [w["status"] for w in entry["workers"]] == ["READY"]
    assert client.default_version(NAME) == "1"
    assert answered_by(server, photo) == "1"


def test_list_and_describe(server):
    listed = cli(server, "list")
    assert listed.returncode == 0, listed.stderr
    [model] = json.loads(listed.stdout)
    assert model["name"] == NAME and model["default"] == "1"
    assert model["versions"][0]["workers"][0]["status"] == "READY"
    described = cli(server, "describe", NAME)
    assert described.returncode == 0, described.stderr
    assert json.loads(described.stdout)["versions"][0]["archive"] == "bees_vs_ants_v1.mar"


def test_duplicate_version_is_refused_and_serving_is_untouched(server, client, heads, photo):
    for command in ("register", "deploy"):
        result = cli(server, command, heads["1"])
        assert result.returncode == manage.EXIT_REFUSED, result.stderr
        assert "v1 is already registered" in result.stderr
    # TorchServe refuses it on its own as well.
    response = server.management("POST", "/models", params={"url": "bees_vs_ants_v1.mar"})
    assert response.status_code == 409, response.text
    assert [e["modelVersion"] for e in client.versions(NAME)] == ["1"]
    assert answered_by(server, photo) == "1"


def test_truncated_or_corrupt_archive_is_refused_and_serving_is_untouched(server, client, heads, photo, tmp_path):
    data = heads["2"].read_bytes()
    truncated = tmp_path / "truncated" / "bees_vs_ants_v2.mar"
    truncated.parent.mkdir()
    truncated.write_bytes(data[: len(data) // 2])
    corrupt = tmp_path / "corrupt" / "bees_vs_ants_v2.mar"
    corrupt.parent.mkdir()
    flipped = bytearray(data)
    for offset in range(len(data) // 3, len(data) // 3 + 64):  # inside the backbone weights, the first member
        flipped[offset] ^= 0xFF
    corrupt.write_bytes(bytes(flipped))
    for archive, reason in ((truncated, "truncated or corrupt"), (corrupt, "fails its checksum")):
        result = cli(server, "deploy", archive)
        assert result.returncode == manage.EXIT_BAD_ARGUMENTS, result.stderr
        assert reason in result.stderr
    assert not (server.model_store / "bees_vs_ants_v2.mar").exists()
    # Put in the store behind manage.py's back: TorchServe refuses it too, and v1 keeps serving.
    (server.model_store / "broken.mar").write_bytes(truncated.read_bytes())
    response = server.management("POST", "/models", params={"url": "broken.mar", "synchronous": "true"}, timeout=120)
    assert response.status_code >= 400, response.text
    (server.model_store / "broken.mar").unlink()
    assert [e["modelVersion"] for e in client.versions(NAME)] == ["1"]
    assert client.default_version(NAME) == "1"
    assert answered_by(server, photo) == "1"


def test_failed_check_leaves_the_default_and_removes_the_new_version(server, client, heads, datasets_dir, photo):
    val = datasets_dir / "hymenoptera" / "val"
    ants = sorted((val / "ants").iterdir())[0]
    bees = sorted((val / "bees").iterdir())[0]
    # Expected labels swapped: a model that answers correctly fails this check.
    result = cli(server, "deploy", heads["2"], "--check-image", f"{ants}=bees", "--check-image", f"{bees}=ants")
    assert result.returncode == manage.EXIT_CHECK_FAILED, result.stderr
    assert "check of bees_vs_ants v2 failed" in result.stderr and "default stays 1" in result.stderr
    assert [e["modelVersion"] for e in client.versions(NAME)] == ["1"]
    assert not (server.model_store / "bees_vs_ants_v2.mar").exists()
    assert answered_by(server, photo) == "1"
    # An expected label the archive cannot answer is a mistake of the operator: refused up front.
    unknown = cli(server, "deploy", heads["2"], "--check-image", f"{bees}=wasp")
    assert unknown.returncode == manage.EXIT_BAD_ARGUMENTS and "['wasp'] are not classes" in unknown.stderr


def test_deploy_rollback_and_retire_rules(server, client, heads, photo):
    deployed = cli(server, "deploy", heads["2"])  # the archive's own packed check images
    assert deployed.returncode == 0, deployed.stderr
    outcome = json.loads(deployed.stdout)
    assert outcome["version"] == "2" and outcome["previous"] == "1" and outcome["retired"] == []
    assert outcome["check"]["checked"] == outcome["check"]["with_label"] > 0
    assert client.default_version(NAME) == "2" and answered_by(server, photo) == "2"

    assert cli(server, "rollback", NAME).returncode == 0
    assert client.default_version(NAME) == "1" and answered_by(server, photo) == "1"
    nothing_older = cli(server, "rollback", NAME)
    assert nothing_older.returncode == manage.EXIT_REFUSED and "no version older" in nothing_older.stderr
    retire_default = cli(server, "retire", NAME, "1")
    assert retire_default.returncode == manage.EXIT_REFUSED and "is the default" in retire_default.stderr

    assert cli(server, "rollback", NAME, "--to", "2").returncode == 0
    assert client.default_version(NAME) == "2"
    assert sorted(e["modelVersion"] for e in client.versions(NAME)) == ["1", "2"]


def test_restart_restores_versions_workers_and_default(tmp_path_factory, heads, photo):
    """A server of its own: v1 registered, v2 deployed as the default, the non-default v1 scaled to
    two workers; after a restart every version, worker count and the default are back."""
    root = tmp_path_factory.mktemp("restart")
    own = TorchServe(model_store=root / "model-store", workdir=root / "work").start(snapshots=True)
    try:
        client = manage.Client(own.management_url, own.key_file, own.model_store, own.inference_url)
        manage.register_archive(heads["1"], management_url=own.management_url, key_file=own.key_file,
                                model_store=own.model_store, workers=1)
        assert cli(own, "deploy", heads["2"]).returncode == 0
        assert cli(own, "scale", NAME, "1", "--workers", "2").returncode == 0  # non-default version
        before = {e["modelVersion"]: len(e["workers"]) for e in client.versions(NAME)}
        assert before == {"1": 2, "2": 1}
        own.restart()
        after = {e["modelVersion"]: len(e["workers"]) for e in client.versions(NAME)}
        assert after == before
        assert client.default_version(NAME) == "2"
        assert answered_by(own, photo) == "2"
        assert all(w["status"] == "READY" for e in client.versions(NAME) for w in e["workers"])
    finally:
        own.stop()


def test_exit_codes_for_bad_arguments_and_unreachable_server(server, tmp_path):
    assert cli(server, "retire", "../../etc", "1").returncode == manage.EXIT_BAD_ARGUMENTS
    assert cli(server, "retire", NAME, "../1").returncode == manage.EXIT_BAD_ARGUMENTS
    assert cli(server, "scale", NAME, "--workers", "0").returncode == manage.EXIT_BAD_ARGUMENTS
    assert cli(server, "deploy", tmp_path / "missing.mar").returncode == manage.EXIT_BAD_ARGUMENTS
    nobody = subprocess.run(
        [sys.executable, str(MANAGE), "--management", f"http://127.0.0.1:{free_port()}", "--key-file",
         str(server.key_file), "list"], capture_output=True, text=True, timeout=60)
    assert nobody.returncode == manage.EXIT_UNREACHABLE and "not reachable" in nobody.stderr
    no_key = subprocess.run(
        [sys.executable, str(MANAGE), "--management", server.management_url, "--key-file",
         str(tmp_path / "key_file.json"), "list"], capture_output=True, text=True, timeout=60)
    assert no_key.returncode == manage.EXIT_UNREACHABLE and "key file" in no_key.stderr


def test_scaled_registrations_rollback_non_default_scaling_and_keep(tmp_path_factory, heads, photo):
    """The paths between the others: rolling back from a scaled "-rN" registration, scaling a version
    that is not the default (up, then losslessly down), and ``deploy --keep 1`` retiring the rest."""
    root = tmp_path_factory.mktemp("paths")
    own = TorchServe(model_store=root / "model-store", workdir=root / "work").start()
    try:
        client = manage.Client(own.management_url, own.key_file, own.model_store, own.inference_url)
        manage.register_archive(heads["1"], management_url=own.management_url, key_file=own.key_file,
                                model_store=own.model_store, workers=1)
        assert cli(own, "deploy", heads["2"], "--workers", "2").returncode == 0
        scaled = cli(own, "scale", NAME, "--workers", "1")  # the default v2: re-registered as 2-r1
        assert scaled.returncode == 0, scaled.stderr
        assert json.loads(scaled.stdout)["version"] == "2-r1" and client.default_version(NAME) == "2-r1"

        back = cli(own, "rollback", NAME)  # 2-r1 is archive version 2: the version before it is 1
        assert back.returncode == 0, back.stderr
        assert client.default_version(NAME) == "1" and answered_by(own, photo) == "1"

        for workers in (2, 1):  # 2-r1 is no longer the default: scaled in place, after it drained
            assert cli(own, "scale", NAME, "2-r1", "--workers", workers).returncode == 0
            assert len(client.describe(NAME, "2-r1")["workers"]) == workers
        assert sorted(e["modelVersion"] for e in client.versions(NAME)) == ["1", "2-r1"]

        kept = cli(own, "deploy", heads["2"], "--keep", "1")
        assert kept.returncode == 0, kept.stderr
        assert sorted(json.loads(kept.stdout)["retired"]) == ["1", "2-r1"]
        assert [e["modelVersion"] for e in client.versions(NAME)] == ["2"]
        assert not (own.model_store / "bees_vs_ants_v2-r1.mar").exists()  # scale's copy went with it
        assert answered_by(own, photo) == "2"
    finally:
        own.stop()
