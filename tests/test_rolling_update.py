"""Rolling a head from v1 to v2 across 3 local replicas behind HAProxy, with real parts and 8 clients.

Each replica is what a pod runs: scripts/serve.py (TorchServe, its own ports and working directory)
and scripts/gateway.py (client token, /ready after the model set is loaded and checked). The three
share one model store. HAProxy (Debian's package) balances over the gateways and health-checks /ready.
One replica at a time: drain the gateway (SIGTERM: unready, then closes), stop serve.py, start both
on the v2 model set, wait until ready. Then kill -9 one replica and bring it back. Slow (minutes):
bounded by timeouts everywhere.
"""

from __future__ import annotations

import logging
import signal
import time
from pathlib import Path

import psutil
import pytest

from imagerec.archive import build_archive
from handlers.backbones import get_backbone, imagenet_categories
from imagerec.management import Client
from imagerec.torchserve import free_ports, install_archive
from benchmarks.lifecycle_heads import NAME, head_archives, val_photos
from benchmarks.load import LoadClients, summarise
from tests.replicas import (
    GatewayProcess, HAProxy, ServeProcess, write_model_set,
)

logger = logging.getLogger(__name__)

BACKBONE, BACKBONE_VERSION = "efficientnet_lite0", "1.0"
TOKEN = "rolling-update-client-token-0123456789"
REPLICAS = 3
CLIENTS = 8
READY_TIMEOUT_S = 600.0  # a replica loads two workers on a shared 2-core machine


@pytest.fixture(scope="module")
def model_store(tmp_path_factory, datasets_dir) -> Path:
    """One store for every replica: the backbone serve.py serves (eager: quick to build) and the head v1, v2."""
    store = tmp_path_factory.mktemp("shared-model-store")
    backbone = get_backbone(BACKBONE)
    build_archive(name=BACKBONE, version=BACKBONE_VERSION, backbone_name=BACKBONE,
                  weights_path=backbone.resolve_weights(), labels=imagenet_categories(), out_dir=store)
    for archive in head_archives(datasets_dir, tmp_path_factory.mktemp("rolling-heads")).values():
        install_archive(archive, store)
    return store


def model_set(path: Path, head_version: str, samples_dir: Path) -> Path:
    return write_model_set(path, f"heads-v{head_version}", [
        {"name": BACKBONE, "version": BACKBONE_VERSION, "archive": f"{BACKBONE}_v{BACKBONE_VERSION}.mar",
         "checks": [{"file": str(samples_dir / "coffee.png"), "label": "espresso"}]},
        {"name": NAME, "version": head_version, "archive": f"{NAME}_v{head_version}.mar"},
    ])


class Replica:
    """serve.py + gateway on fixed ports (a restarted replica keeps its address, as a pod's IP in HAProxy)."""

    def __init__(self, root: Path, index: int, store: Path, token_file: Path):
        self.root, self.index, self.store, self.token_file = root, index, store, token_file
        ports = free_ports(4)
        self.ports, self.gateway_port = tuple(ports[:3]), ports[3]
        self.serve: ServeProcess | None = None
        self.gateway: GatewayProcess | None = None
        self.starts = 0

    def start(self, model_set_path: Path) -> "Replica":
        self.starts += 1
        run = self.root / f"replica{self.index}"
        serve_args = ("--drain-timeout", "60")
        self.serve = ServeProcess(run / "work", self.store, BACKBONE, BACKBONE_VERSION, self.ports, serve_args).start()
        self.gateway = GatewayProcess(run / f"gateway-{self.starts}", inference_url=self.serve.inference_url,
                                      management_url=self.serve.management_url, metrics_url=self.serve.metrics_url,
                                      key_file=self.serve.key_file, model_store=self.store, model_set=model_set_path,
                                      token_file=self.token_file, shutdown_delay=2.0, port=self.gateway_port).start()
        return self

    def drain_and_stop(self) -> None:
        """As Kubernetes stops a pod: the gateway drains first (unready, then closed), then serve.py stops."""
        self.gateway.signal(signal.SIGTERM)
        assert self.gateway.wait(90) == 0, self.gateway.tail()
        tree = self.serve.tree()
        self.serve.popen.send_signal(signal.SIGTERM)  # serve.py only, as the kubelet signals PID 1
        assert self.serve.wait(120) is not None, self.serve.tail()
        gone, alive = psutil.wait_procs(tree, timeout=30)
        assert not alive, f"left running after serve.py exited: {alive}"

    def kill(self) -> list[psutil.Process]:
        """kill -9 every process of the replica at once (gateway, serve.py, TorchServe, its workers)."""
        victims = self.gateway.tree() + self.serve.tree()
        self.serve.kill_tree(victims)
        psutil.wait_procs(victims, timeout=30)
        self.gateway.wait(10)
        self.serve.wait(10)
        return victims

    def default_version(self, name: str) -> str:
        return Client(self.serve.management_url, self.serve.key_file, self.store).default_version(name)


def test_rolling_update_v1_to_v2_then_kill_one(model_store, samples_dir, datasets_dir, tmp_path):
    sets = {version: model_set(tmp_path / f"model-set-v{version}.json", version, samples_dir) for version in "12"}
    token_file = tmp_path / "client-token"
    token_file.write_text(TOKEN + "\n")
    replicas = [Replica(tmp_path, i, model_store, token_file) for i in range(REPLICAS)]
    proxy = HAProxy(tmp_path, [f"127.0.0.1:{r.gateway_port}" for r in replicas])
    try:
        for replica in replicas:
            replica.start(sets["1"])
        for replica in replicas:
            replica.gateway.wait_ready(READY_TIMEOUT_S)
        proxy.start().wait_serving()
        with LoadClients(proxy.url, f"/predictions/{NAME}", val_photos(datasets_dir), clients=CLIENTS,
                         headers={"Authorization": f"Bearer {TOKEN}"}, max_seconds=1800, timeout=120) as clients:
            time.sleep(5)
            for replica in replicas:  # one at a time: drain, stop, start on v2, ready
                replica.drain_and_stop()
                replica.start(sets["2"])
                replica.gateway.wait_ready(READY_TIMEOUT_S)
                logger.info("replica %d on v2: %s", replica.index, summarise(clients.snapshot()))
            all_on_v2 = time.monotonic()
            time.sleep(5)
            killed = replicas[0]
            killed_at = time.monotonic()
            victims = killed.kill()
            assert len(victims) >= 5, victims  # gateway, serve.py, TorchServe's launcher and Java, workers
            assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in victims)
            time.sleep(5)  # HAProxy notices within its check interval; new requests go to the others
            killed.start(sets["2"])  # as the Deployment replaces a dead pod
            killed.gateway.wait_ready(READY_TIMEOUT_S)
            time.sleep(3)
        records = clients.snapshot()
        summary = summarise(records)
        logger.info("rolling update: %s", summary)

        # Zero failed requests apart from those in flight on the killed replica.
        in_flight = [r for r in records if r[0] <= killed_at + 0.2 and r[0] + r[1] >= killed_at]
        failed = [r for r in records if r[2] != 200]
        unexplained = [r for r in failed if r not in in_flight]
        logger.info("kill -9: %d requests in flight on all replicas, %d of them failed",
                    len(in_flight), len(failed) - len(unexplained))
        assert not unexplained, f"{len(unexplained)} failures outside the kill: {unexplained[:5]}"
        assert len(failed) <= len(in_flight)
        assert summary["requests"] > 100
        # Answers name their version: v1 before, both during the roll, only v2 once every replica is on v2.
        answered = [r for r in records if r[2] == 200]
        assert {r[3] for r in answered} == {"1", "2"}
        assert {r[3] for r in answered if r[0] > all_on_v2} == {"2"}
        # Every replica ends on v2, ready, with the v2 model set.
        for replica in replicas:
            status, body = replica.gateway.readiness()
            assert (status, body.get("revision")) == (200, "heads-v2"), body
            assert replica.default_version(NAME) == "2"
    finally:
        proxy.stop(10)
        for replica in replicas:
            if replica.gateway is not None:
                replica.gateway.stop(30)
            if replica.serve is not None:
                replica.serve.stop(60)
