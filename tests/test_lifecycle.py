"""The model lifecycle under load, on a real TorchServe: no user request may fail.

8 client threads send real photos to /predictions/bees_vs_ants for the whole run while the
management steps of scripts/manage.py run: deploy v2, roll back, retire v2, deploy v2 again, scale
1 -> 2 -> 1. Then one worker process is killed under the same load. Figures are printed (run with
``-s`` to see them); docs/BENCHMARKS.md "Model lifecycle under load" quotes them.
"""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

from imagerec import management as manage
from benchmarks.lifecycle_heads import NAME, head_archives, val_photos
from benchmarks.load import LoadClients, summarise

CLIENTS = 8


@pytest.fixture(scope="module")
def heads(datasets_dir, archive_dir):
    return head_archives(datasets_dir, archive_dir)


@pytest.fixture(scope="module")
def server(empty_server_factory):
    return empty_server_factory()


@pytest.fixture(scope="module")
def client(server):
    return manage.Client(server.management_url, server.key_file, server.model_store, server.inference_url)


@pytest.fixture(scope="module")
def photos(datasets_dir):
    return val_photos(datasets_dir)


@pytest.fixture
def registered(server, client, heads):
    """The head is registered (v1 first) whichever test of this module runs first."""
    if not client.versions(NAME):
        manage.register_archive(heads["1"], management_url=server.management_url, key_file=server.key_file,
                                model_store=server.model_store, workers=1)
    return NAME


def _served_by_v1_or_v2(version: str | None) -> bool:
    # "2-r1" is archive version 2 registered again by a lossless scale-down (see scripts/manage.py).
    return version in ("1", "2") or (version or "").startswith("2-r")


def test_swaps_and_scaling_under_load_lose_no_request(server, client, heads, photos, registered):
    steps = []

    def step(label, action):
        start = time.monotonic()
        outcome = action()
        steps.append((label, start, time.monotonic()))
        return outcome

    with LoadClients.for_model(server, NAME, photos, clients=CLIENTS) as load:
        time.sleep(3)  # users first, then the operator
        step("deploy v2", lambda: manage.deploy(client, heads["2"]))
        assert client.default_version(NAME) == "2"
        step("rollback", lambda: manage.rollback(client, NAME))
        assert client.default_version(NAME) == "1"
        step("retire v2", lambda: manage.retire(client, NAME, "2"))
        assert [e["modelVersion"] for e in client.versions(NAME)] == ["1"]
        step("deploy v2 again", lambda: manage.deploy(client, heads["2"]))
        assert client.default_version(NAME) == "2"
        step("scale 1->2", lambda: manage.scale(client, NAME, None, 2))
        assert len(client.describe(NAME, "2")["workers"]) == 2
        scaled = step("scale 2->1", lambda: manage.scale(client, NAME, None, 1))
        time.sleep(3)  # traffic on the scaled-down registration
    default = client.default_version(NAME)
    assert default == scaled["version"] and default.startswith("2-r")
    assert [w["status"] for w in client.describe(NAME, default)["workers"]] == ["READY"]
    assert sorted(e["modelVersion"] for e in client.versions(NAME)) == ["1", default]

    records = load.records
    total = summarise(records)
    print(f"\nlifecycle under load, {CLIENTS} clients: " + json.dumps(total))
    for label, start, end in steps:
        failed = [(round(r[0] - start, 2), r[2], r[4]) for r in records if start <= r[0] < end and r[2] != 200]
        during = summarise([r for r in records if start <= r[0] < end])
        print(f"  {label:16s} {end - start:5.1f}s " + json.dumps(during) + (f" failed: {failed}" if failed else ""))
    assert total["requests"] > 50 * len(steps) / 6, "the load clients barely ran"
    assert total["failures"] == 0, [r for r in records if r[2] != 200][:5]
    assert all(_served_by_v1_or_v2(r[3]) for r in records), total["versions"]
    assert {"1", "2"} <= set(total["versions"])


def test_killed_worker_is_replaced_and_serving_recovers(server, client, photos, registered):
    version = client.default_version(NAME)
    [victim] = server.worker_pids(NAME, version)
    with LoadClients.for_model(server, NAME, photos, clients=CLIENTS) as load:
        time.sleep(2)
        killed_at = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        recovered_at = None
        for _ in range(240):  # TorchServe restarts a dead worker after a back-off; bounded wait
            workers = client.describe(NAME, version)["workers"]
            if workers and all(w["status"] == "READY" and w["pid"] not in (victim, -1) for w in workers):
                recovered_at = time.monotonic()
                break
            time.sleep(0.25)
        assert recovered_at is not None, f"no replacement worker after 60s: {workers}"
        time.sleep(5)  # requests after recovery
    records = load.records
    before = [r for r in records if r[0] + r[1] < killed_at]  # answered before the kill
    after = [r for r in records if r[0] >= recovered_at]  # sent once the replacement was READY
    between = [r for r in records if r not in before and r not in after]  # in flight at the kill, or sent meanwhile
    figures = {
        "recovery_s": round(recovered_at - killed_at, 1),
        "before": summarise(before),
        "between": summarise(between),
        "after": summarise(after),
    }
    print("\nworker kill under load: " + json.dumps(figures))
    assert after, "no request was sent after recovery"
    assert figures["after"]["failures"] == 0, [r for r in after if r[2] != 200][:5]
    assert figures["before"]["failures"] == 0
