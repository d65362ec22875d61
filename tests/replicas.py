"""Real processes of one serving replica for tests: the gateway (scripts/gateway.py) and serve.py.

Each process runs in its own session (so a test can signal it and everything it started), logs to
a file in its working directory, and is stopped by ``stop()`` (SIGTERM, then SIGKILL after a bound).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import requests

from imagerec.paths import PROJECT_ROOT
from imagerec.torchserve import free_port, free_ports



def write_model_set(path: Path, revision: str, models: list[dict]) -> Path:
    path.write_text(json.dumps({"revision": revision, "models": models}, indent=1))
    return path


class Process:
    """A child process in its own session with its output in ``log``."""

    def __init__(self, command: list[str], log: Path, env: dict | None = None):
        self.command, self.log = command, log
        self.env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT), **(env or {})}
        self.popen: subprocess.Popen | None = None

    def start(self) -> "Process":
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as out:
            self.popen = subprocess.Popen(self.command, cwd=PROJECT_ROOT, env=self.env, stdout=out,
                                          stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def signal(self, sig: int) -> None:
        try:
            os.killpg(self.popen.pid, sig)
        except ProcessLookupError:
            pass

    def wait(self, timeout: float) -> int | None:
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def tree(self) -> list[psutil.Process]:
        """The process and all its descendants (TorchServe runs in a session of its own under serve.py)."""
        try:
            root = psutil.Process(self.popen.pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def kill_tree(self, processes: list[psutil.Process] | None = None) -> None:
        """SIGKILL the whole tree at once, as a container's death takes every process in it."""
        for process in processes if processes is not None else self.tree():
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass

    def stop(self, timeout: float = 60.0) -> int | None:
        """SIGTERM the session; SIGKILL what is left of the tree after ``timeout``. Returns the exit code."""
        if self.popen is None:
            return None
        tree = self.tree()  # before the signal: an orphaned grandchild has no parent to be found by
        self.signal(signal.SIGTERM)
        code = self.wait(timeout)
        self.signal(signal.SIGKILL)
        self.kill_tree([p for p in tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE])
        if code is None:
            code = self.wait(10)
        return code

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


class GatewayProcess(Process):
    """scripts/gateway.py in front of one TorchServe (an imagerec.torchserve.TorchServe or its URLs)."""

    def __init__(self, workdir: Path, *, inference_url: str, management_url: str, metrics_url: str, key_file: Path,
                 model_store: Path, model_set: Path, token_file: Path, shutdown_delay: float = 1.0,
                 port: int | None = None):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, str(PROJECT_ROOT / "scripts" / "gateway.py"), "--port", str(self.port),
                   "--model-set", str(model_set), "--token-file", str(token_file),
                   "--inference", inference_url, "--management", management_url, "--metrics", metrics_url,
                   "--key-file", str(key_file), "--model-store", str(model_store),
                   "--shutdown-delay", str(shutdown_delay), "--prepare-timeout", "180"]
        super().__init__(command, workdir / "gateway.log")

    @classmethod
    def for_server(cls, server, workdir: Path, **kwargs) -> "GatewayProcess":
        return cls(workdir, inference_url=server.inference_url, management_url=server.management_url,
                   metrics_url=server.metrics_url, key_file=server.key_file, model_store=server.model_store, **kwargs)

    def readiness(self) -> tuple[int, dict]:
        try:
            response = requests.get(self.url + "/ready", timeout=5)
            return response.status_code, response.json()
        except (requests.RequestException, ValueError) as exc:
            return -1, {"reason": exc.__class__.__name__}

    def wait_for(self, predicate, timeout: float = 240.0) -> tuple[int, dict]:
        """Poll /ready until predicate(status, body) holds; the last (status, body) either way."""
        deadline = time.monotonic() + timeout
        while True:
            status, body = self.readiness()
            if predicate(status, body) or time.monotonic() > deadline:
                return status, body
            if self.popen.poll() is not None:
                raise RuntimeError(f"gateway exited with {self.popen.returncode}:\n{self.tail()}")
            time.sleep(0.5)

    def wait_ready(self, timeout: float = 240.0) -> None:
        status, body = self.wait_for(lambda s, b: s == 200, timeout)
        assert status == 200, f"gateway not ready after {timeout:.0f}s: {body}\n{self.tail()}"


class ServeProcess(Process):
    """scripts/serve.py (TorchServe in the foreground) on its own ports and working directory."""

    def __init__(self, workdir: Path, model_store: Path, backbone: str, version: str,
                 ports: tuple[int, int, int] | None = None, extra_args: tuple[str, ...] = ()):
        self.ports = ports or tuple(free_ports(3))
        self.workdir = workdir
        self.inference_url, self.management_url, self.metrics_url = (f"http://127.0.0.1:{p}" for p in self.ports)
        self.key_file = workdir / "key_file.json"
        self.model_store = model_store
        command = [sys.executable, str(PROJECT_ROOT / "scripts" / "serve.py"), "--backbone", backbone,
                   "--version", version, "--model-store", str(model_store), "--workdir", str(workdir),
                   "--no-restore", "--no-web", "--ports", *map(str, self.ports), *extra_args]
        super().__init__(command, workdir.parent / f"{workdir.name}-serve.log")


class HAProxy(Process):
    """Debian's haproxy in the foreground, round-robin over servers, health-checking their /ready."""

    def __init__(self, workdir: Path, servers: list[str], check_interval_ms: int = 300):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        lines = [
            "global", "    maxconn 512",
            "defaults", "    mode http", "    timeout connect 2s", "    timeout client 150s",
            "    timeout server 150s", "    timeout queue 30s",
            # A connection refused (a replica that just closed its port) is retried on another replica;
            # a request already sent is never replayed (it may be running on the killed replica).
            "    retries 3", "    option redispatch 1", "    retry-on conn-failure",
            # One backend connection per request: no stale keep-alive connection to a draining replica.
            "    option http-server-close", "    http-reuse never",
            "frontend clients", f"    bind 127.0.0.1:{self.port}", "    default_backend replicas",
            "backend replicas", "    balance roundrobin", "    option httpchk GET /ready",
            "    http-check expect status 200",
            f"    default-server inter {check_interval_ms} fall 1 rise 1",
        ] + [f"    server r{i} {address} check" for i, address in enumerate(servers)]
        config = workdir / "haproxy.cfg"
        config.write_text("\n".join(lines) + "\n")
        haproxy = shutil.which("haproxy") or "/usr/sbin/haproxy"
        super().__init__([haproxy, "-db", "-f", str(config)], workdir / "haproxy.log")

    def wait_serving(self, timeout: float = 30.0) -> None:
        """Until HAProxy listens and routes /ready to a ready replica (clients must not race its start)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                if requests.get(self.url + "/ready", timeout=5).status_code == 200:
                    return
            except requests.RequestException:
                pass
            assert time.monotonic() < deadline and self.popen.poll() is None, f"HAProxy not serving:\n{self.tail()}"
            time.sleep(0.2)
