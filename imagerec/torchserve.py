"""Running TorchServe and talking to it: config files, keys, start/stop, authorised requests.

Used by ``scripts/serve.py`` (the shipped server), by ``imagerec.management``, by the tests and by
the benchmarks, so all of them start TorchServe the same way from the shipped ``config.properties``.

Each ``TorchServe`` instance gets its own working directory (key_file.json and logs land there)
and its own TMPDIR (TorchServe keeps its pid file in the temp directory), so several servers can
run side by side.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path

import psutil
import requests

from imagerec.files import atomic_copy
from imagerec.naming import validate_name, version_key
from imagerec.paths import PROJECT_ROOT, SHIPPED_CONFIG, SHIPPED_LOG_CONFIG

logger = logging.getLogger(__name__)

KEY_FILE_NAME = "key_file.json"
# The admission front runs as this module (``python -m``; imagerec/front.py).
FRONT_MODULE = "imagerec.front"
DEFAULT_TIMEOUT_S = 30.0
# TorchServe runs from its own environment, which scripts/setup.sh builds: its launcher hands its own
# interpreter to the frontend for the workers, and workers use the CPU build of torch
# (requirements-serve.txt says why). The variable points the tools at another such environment.
SERVE_VENV_VAR = "IMAGEREC_SERVE_VENV"
DEFAULT_SERVE_VENV = PROJECT_ROOT / ".venv-serve"
# A stop first answers the requests already accepted (TorchServe.drain), for at most this long.
DEFAULT_DRAIN_TIMEOUT_S = 60.0
# Draining a version: after its queue is empty, one sentinel per worker goes through the same queue
# (FIFO) and is answered with a 4xx by the handler at once; with one worker its answer means every
# batch before it is answered. TorchServe does not report busy workers, so with more workers the
# grace below covers a batch another worker may still run: a bound, not an observation (under 8
# clients on 2 busy cores batches took up to ~4 s; a version's responseTimeout is the strict bound).
SENTINEL = b"drain-check: not an image"
DRAIN_GRACE_S = 10.0


def torchserve_executable() -> Path:
    """The ``torchserve`` launcher of the serving environment."""
    venv = Path(os.environ.get(SERVE_VENV_VAR) or DEFAULT_SERVE_VENV)
    launcher = venv / "bin" / "torchserve"
    if not launcher.is_file():
        raise RuntimeError(
            f"no TorchServe runtime at {venv}: run scripts/setup.sh, or set {SERVE_VENV_VAR} to a virtual "
            "environment with requirements-serve.txt installed"
        )
    return launcher


def serving_python() -> Path:
    """The serving environment's interpreter (what workers run): benchmarks and tests measure with it."""
    return torchserve_executable().with_name("python")


_PROPERTY_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "f": "\f"}


def _unescape_property(value: str) -> str:
    """Undo java.util.Properties.store escaping (\\: \\= \\n \\uXXXX ...)."""
    def replace(match: re.Match) -> str:
        escaped = match.group(1)
        if len(escaped) == 5:
            return chr(int(escaped[1:], 16))
        return _PROPERTY_ESCAPES.get(escaped, escaped)
    return re.sub(r"\\(u[0-9a-fA-F]{4}|.)", replace, value)


def read_properties(path: str | Path) -> dict[str, str]:
    """A Java .properties file as a dict (the subset TorchServe uses: key=value, # comments,
    and the escapes java.util.Properties.store writes into TorchServe's snapshots)."""
    properties = {}
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            properties[key.strip()] = _unescape_property(value.strip())
    return properties


def write_properties(path: str | Path, properties: dict[str, str]) -> Path:
    Path(path).write_text("".join(f"{key}={value}\n" for key, value in properties.items()))
    return Path(path)


def shipped_ports() -> tuple[int, int, int]:
    properties = read_properties(SHIPPED_CONFIG)
    return tuple(
        int(properties[f"{api}_address"].rsplit(":", 1)[1]) for api in ("inference", "management", "metrics")
    )


def read_keys(key_file: str | Path) -> dict[str, str]:
    """{"inference": key, "management": key, "API": key} from TorchServe's key_file.json."""
    try:
        raw = json.loads(Path(key_file).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(
            f"no TorchServe key file at {key_file}: TorchServe writes it into the directory it was started in"
        ) from None
    return {role: entry["key"] for role, entry in raw.items()}


def auth_header(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def port_taken(address: str) -> bool:
    """True if something already listens on ``host:port`` (a socket lingering after a stop does not count)."""
    host, _, port = address.removeprefix("http://").removeprefix("https://").rpartition(":")
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, int(port)))
        except OSError:
            return True
    return False


def free_ports(count: int, avoid: Iterable[int] = ()) -> list[int]:
    """``count`` distinct free loopback ports, none in ``avoid``. Every socket stays bound until all
    are chosen: two free_port() calls in a row can return the same port (it is free both times), and
    a TorchServe given it twice fails to bind (seen in CI: the admission front and TorchServe's
    inference API on one port)."""
    avoid = set(avoid)
    sockets, ports = [], []
    try:
        while len(ports) < count:
            sock = socket.socket()
            sockets.append(sock)
            sock.bind(("127.0.0.1", 0))
            if sock.getsockname()[1] not in avoid:
                ports.append(sock.getsockname()[1])
    finally:
        for sock in sockets:
            sock.close()
    return ports


def free_port() -> int:
    return free_ports(1)[0]


class TorchServe:
    """A TorchServe process started from the shipped config with per-instance overrides.

    ``models``: TorchServe's ``load_models`` value ("name=file.mar,..." or "ALL"), or None.
    ``overrides``: properties replacing the shipped ones (e.g. a test's job_queue_size).
    ``ports``: (inference, management, metrics); None picks free loopback ports (tests), while
    ``shipped_ports()`` keeps the addresses of config.properties (the real server).
    ``front``: put the admission front (imagerec/front.py) on the inference address
    and TorchServe's inference API on a private loopback port behind it (``upstream_url``);
    ``front_args``: more options of the front (e.g. ``("--inflight-mib", "29")``; ``python -m
    imagerec.front --help`` lists them).
    """

    def __init__(
        self,
        model_store: str | Path,
        workdir: str | Path,
        models: str | None = None,
        overrides: dict[str, str] | None = None,
        ports: tuple[int, int, int] | None = None,
        env: dict[str, str] | None = None,
        front: bool = False,
        front_args: tuple[str, ...] = (),
    ):
        self.model_store = Path(model_store).resolve()
        self.workdir = Path(workdir).resolve()
        # Every port this instance picks is picked in one go, distinct from each other and from the
        # ports it was given (explicitly or as overrides).
        given = set(ports or ()) | {int(value) for key, value in (overrides or {}).items()
                                    if key.endswith("_port") and str(value).isdigit()}
        spare = iter(free_ports((0 if ports else 5) + (1 if front else 0), avoid=given))
        inference, management, metrics = ports or (next(spare), next(spare), next(spare))
        self.inference_url = f"http://127.0.0.1:{inference}"
        self.management_url = f"http://127.0.0.1:{management}"
        self.metrics_url = f"http://127.0.0.1:{metrics}"
        self.properties = read_properties(SHIPPED_CONFIG)
        self.properties.update(
            inference_address=self.inference_url,
            management_address=self.management_url,
            metrics_address=self.metrics_url,
            model_store=str(self.model_store),
        )
        metrics_config = self.properties.get("metrics_config")
        if metrics_config and not Path(metrics_config).is_absolute():  # relative to config.properties
            self.properties["metrics_config"] = str(SHIPPED_CONFIG.parent / metrics_config)
        if ports is None:  # side-by-side servers: gRPC ports must not clash either
            self.properties.update(grpc_inference_port=str(next(spare)), grpc_management_port=str(next(spare)))
        if models:
            self.properties["load_models"] = models
        self.properties.update(overrides or {})
        self.upstream_url = self.inference_url
        if front:  # clients keep the inference address; TorchServe moves behind the front
            self.upstream_url = f"http://127.0.0.1:{next(spare)}"
            self.properties["inference_address"] = self.upstream_url
        self.front = front
        self.front_args = tuple(front_args)
        self.extra_env = env or {}
        self.process: subprocess.Popen | None = None
        self._unaddressable: set[str] = set()  # registered names outside our rules, warned about once
        self.front_process: subprocess.Popen | None = None

    @property
    def config_path(self) -> Path:
        return self.workdir / "config.properties"

    @property
    def key_file(self) -> Path:
        return self.workdir / KEY_FILE_NAME

    @property
    def log_dir(self) -> Path:
        return self.workdir / "logs"

    @property
    def snapshot_dir(self) -> Path:
        """Where TorchServe writes a snapshot after every registration change (when snapshots are on)."""
        return self.log_dir / "config"

    def addresses(self) -> dict[str, str]:
        """Every address TorchServe will listen on, by property name."""
        grpc_host = {api: self.properties.get(f"grpc_{api}_address", "127.0.0.1") for api in ("inference", "management")}
        return {
            "inference_address": self.inference_url,
            "management_address": self.management_url,
            "metrics_address": self.metrics_url,
            **{f"grpc_{api}_port": f"{grpc_host[api]}:{self.properties[f'grpc_{api}_port']}"
               for api in ("inference", "management") if f"grpc_{api}_port" in self.properties},
        }

    def start(self, timeout: float = 120.0, snapshots: bool = False, restore: bool = False) -> "TorchServe":
        """Start and wait until the server answers and every loaded model has a ready worker.

        snapshots: let TorchServe record every registration change in ``snapshot_dir``.
        restore: (implies snapshots) bring back the models, versions, workers and default versions of
        the latest snapshot; ``models`` not in it are registered as well.
        """
        # TorchServe that cannot bind a port stops with exit code 0 and no word about it: check first.
        taken = [f"{address} ({key})" for key, address in self.addresses().items() if port_taken(address)]
        if taken:
            raise RuntimeError(f"cannot start TorchServe: {', '.join(taken)} already in use (another TorchServe? "
                               "stop it, or choose other ports)")
        (self.workdir / "tmp").mkdir(parents=True, exist_ok=True)
        self.model_store.mkdir(parents=True, exist_ok=True)
        properties = dict(self.properties)
        snapshots = snapshots or restore
        snapshot = latest_snapshot(self.snapshot_dir, self.model_store) if restore else None
        if snapshot is not None:
            # TorchServe ignores its snapshots when started with --ts-config (ConfigManager reads the
            # last snapshot only without one), but it restores a model_snapshot property found in the
            # config file, and then skips load_models.
            properties["model_snapshot"] = json.dumps(snapshot)
            properties.pop("load_models", None)
        write_properties(self.config_path, properties)
        env = {
            **os.environ,
            "TMPDIR": str(self.workdir / "tmp"),
            "TEMP": str(self.workdir / "tmp"),
            "LOG_LOCATION": str(self.log_dir),
            "METRICS_LOCATION": str(self.log_dir),
            **self.extra_env,
        }
        command = [
            str(torchserve_executable()), "--start", "--foreground",
            "--ts-config", str(self.config_path), "--model-store", str(self.model_store),
            "--log-config", str(SHIPPED_LOG_CONFIG),
        ]
        if not snapshots:
            command.append("--ncs")
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._console = open(self.log_dir / "console.log", "ab")
        # Own process group: stop() must take the Java frontend and its Python workers down too.
        self.process = subprocess.Popen(
            command, cwd=self.workdir, env=env, stdout=self._console, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        if self.front:
            self.front_process = subprocess.Popen(
                [sys.executable, "-m", FRONT_MODULE, "--listen", self.inference_url.removeprefix("http://"),
                 "--upstream", self.upstream_url, "--max-body", properties["max_request_size"], *self.front_args],
                cwd=self.workdir, stdout=self._console, stderr=subprocess.STDOUT, start_new_session=True,
            )
        try:
            self.wait_ready(timeout)
            if snapshot is not None:
                self._register_missing(snapshot, timeout)
        except KeyboardInterrupt:
            raise  # Ctrl-C or SIGTERM: the caller stops it, draining what was accepted (scripts/serve.py)
        except BaseException:
            self.stop()  # never leave a half-started server (and its pid file) behind
            raise
        return self

    def restart(self, timeout: float = 120.0) -> "TorchServe":
        """Stop, then start again restoring the registrations of the latest snapshot (see start)."""
        self.stop()
        return self.start(timeout, restore=True)

    def _register_missing(self, snapshot: dict, timeout: float) -> None:
        """Register ``models`` ("name=file.mar,...") that the restored snapshot did not contain."""
        wanted = self.properties.get("load_models") or ""
        for item in filter(None, (part.strip() for part in wanted.split(","))):
            name, _, file_name = item.rpartition("=")
            if item != "ALL" and name not in snapshot.get("models", {}):
                response = self.management("POST", "/models", timeout=timeout,
                                           params={"url": file_name, "model_name": name, "synchronous": "true"})
                if response.status_code != 200:
                    raise RuntimeError(f"registering {item} after restore failed: {response.text.strip()}")
        self.wait_ready(timeout)

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"TorchServe exited with {self.process.returncode}; see {self.log_dir}")
            if self.front_process is not None and self.front_process.poll() is not None:
                raise RuntimeError(f"the admission front exited with {self.front_process.returncode}; "
                                   f"see {self.log_dir / 'console.log'}")
            try:
                if self.key_file.exists() and self._models_ready() and self._front_ready():
                    return
            except (requests.RequestException, ValueError, KeyError):
                pass  # not answering yet, or key_file.json still being written
            time.sleep(0.5)
        raise TimeoutError(f"TorchServe not ready after {timeout:.0f}s; see {self.log_dir}")

    def _models_ready(self) -> bool:
        """True once every registered version of every model we can address has a READY worker."""
        response = self.management("GET", "/models")
        if response.status_code != 200:
            return False
        for model in response.json().get("models", []):
            name = model["modelName"]
            try:
                validate_name(name)
            except ValueError:
                # Registered through the raw management API (it accepts '../evil'); a name with '/' cannot
                # even be addressed in a URL. It must not keep the server from starting.
                if name not in self._unaddressable:
                    self._unaddressable.add(name)
                    logger.warning("model %r: name outside our rules, readiness not checked", name)
                continue
            versions = self.management("GET", f"/models/{name}/all")
            if versions.status_code != 200:
                return False
            for version in versions.json():
                if not any(w.get("status") == "READY" for w in version.get("workers", [])):
                    return False
        return True

    def _front_ready(self) -> bool:
        if self.front_process is None:
            return True
        try:  # any HTTP answer means it listens and reaches TorchServe (401/400 without a key is fine)
            return requests.get(self.inference_url + "/ping", timeout=DEFAULT_TIMEOUT_S).status_code != 503
        except requests.ConnectionError:
            return False

    @property
    def keys(self) -> dict[str, str]:
        return read_keys(self.key_file)

    def management(self, method: str, path: str, timeout: float = DEFAULT_TIMEOUT_S, **kwargs) -> requests.Response:
        headers = {**auth_header(self.keys["management"]), **kwargs.pop("headers", {})}
        return requests.request(method, self.management_url + path, headers=headers, timeout=timeout, **kwargs)

    def predict(self, model: str, data: bytes, version: str | None = None,
                content_type: str = "application/octet-stream", timeout: float = DEFAULT_TIMEOUT_S,
                session: requests.Session | None = None) -> requests.Response:
        """PUT raw image bytes to /predictions/MODEL[/VERSION], as ``curl -T`` does."""
        path = f"/predictions/{model}" + (f"/{version}" if version else "")
        headers = {"Content-Type": content_type, **auth_header(self.keys["inference"])}
        return (session or requests).put(self.inference_url + path, data=data, headers=headers, timeout=timeout)

    def worker_pids(self, model: str, version: str | None = None) -> list[int]:
        path = f"/models/{model}" + (f"/{version}" if version else "")
        return [w["pid"] for entry in self.management("GET", path).json() for w in entry.get("workers", [])]

    def versions(self) -> list[dict]:
        """Describe entries of every registered version of every model whose name we can address."""
        entries = []
        for model in self.management("GET", "/models", params={"limit": 1000}).json().get("models", []):
            try:
                name = validate_name(model["modelName"])
            except ValueError:
                continue  # a name outside our rules (see _models_ready): nothing we can address
            response = self.management("GET", f"/models/{name}/all")
            if response.status_code == 200:
                entries += response.json()
        return entries

    def refuse_new_requests(self) -> None:
        """From now on every new inference request is answered at once instead of being queued; the
        requests already accepted are not affected.

        With the admission front: the front answers them 503 + Retry-After (``DRAIN_SIGNAL``).
        Without it, TorchServe 0.12 has no switch to stop taking requests without closing connections
        (its own SIGTERM handling closes every connection, queued and running requests included), so
        the inference key is replaced (POST /token?type=inference; key_file.json gets the new one):
        new requests get 400, token authorization failed. The front never needs the key replaced,
        which could refuse a request it had admitted but not yet finished passing on.
        """
        if self._front_running:
            from imagerec.front import DRAIN_SIGNAL  # aiohttp is imported only where a front runs

            self.front_process.send_signal(DRAIN_SIGNAL)
            return
        response = requests.post(self.management_url + "/token", params={"type": "inference"},
                                 headers=auth_header(self.keys["API"]), timeout=DEFAULT_TIMEOUT_S)
        if response.status_code != 200:
            raise RuntimeError(f"cannot stop taking requests: HTTP {response.status_code} {response.text.strip()}")

    def drain(self, timeout: float = DEFAULT_DRAIN_TIMEOUT_S, grace: float = DRAIN_GRACE_S) -> bool:
        """Take no new request and answer every accepted one; True if done within ``timeout``.

        New requests are refused at once (``refuse_new_requests``). With the admission front, every
        accepted request passed through it and is answered through it: done when it has none in
        flight. Without it, every version's queue (jobQueueStatus.pendingRequests) is waited empty,
        a SENTINEL per worker goes through it, and versions with more than one worker get ``grace``
        seconds more (see SENTINEL).
        """
        deadline = time.monotonic() + timeout
        self.refuse_new_requests()
        if self._front_running:
            return self._drain_front(deadline)
        inference_key = self.keys["inference"]
        busy = self.versions()
        while busy and time.monotonic() < deadline:
            idle = [e for e in busy if e.get("jobQueueStatus", {}).get("pendingRequests", 0) == 0]
            for entry in idle:
                path = f"/predictions/{entry['modelName']}/{entry['modelVersion']}"
                for _ in entry.get("workers", []):
                    try:
                        requests.put(self.upstream_url + path, data=SENTINEL, headers=auth_header(inference_key),
                                     timeout=max(1.0, deadline - time.monotonic()))
                    except requests.RequestException as error:
                        logger.warning("drain: sentinel to %s failed: %s", path, error)
            if any(len(e.get("workers", [])) > 1 for e in idle):
                time.sleep(max(0.0, min(grace, deadline - time.monotonic())))
            still_queued = {(e["modelName"], e["modelVersion"]) for e in busy if e not in idle}
            if still_queued:
                time.sleep(0.2)
                busy = [e for e in self.versions() if (e["modelName"], e["modelVersion"]) in still_queued]
            else:
                busy = []
        if busy:
            logger.warning("drain: requests still queued after %.0f s: %s", timeout,
                           ", ".join(f"{e['modelName']} v{e['modelVersion']}" for e in busy))
        return not busy

    @property
    def _front_running(self) -> bool:
        return self.front_process is not None and self.front_process.poll() is None

    def _drain_front(self, deadline: float) -> bool:
        """Wait until the draining front has answered every request it admitted."""
        from imagerec.front import STATUS_PATH

        in_flight = None
        while time.monotonic() < deadline:
            try:
                in_flight = requests.get(self.inference_url + STATUS_PATH, timeout=DEFAULT_TIMEOUT_S).json()["inflight_requests"]
            except (requests.RequestException, ValueError, KeyError) as error:
                logger.warning("drain: cannot read the front's state: %s", error)
                return False
            if in_flight == 0:
                return True
            time.sleep(0.1)
        logger.warning("drain: %s requests still in flight in the front at the deadline", in_flight)
        return False

    def stop(self, timeout: float = 30.0, drain_timeout: float = 0.0) -> None:
        """Stop the frontend and all workers, and wait until every one of them has exited.

        drain_timeout > 0: first answer every request already accepted, taking no new one (``drain``),
        for at most that long. Then the admission front (if any: its requests are answered by now) and
        the Java frontend stop (it closes its ports, writes its shutdown snapshot and stops its
        workers); whatever of the group is left is terminated after.
        """
        if self.process is None:
            self._stop_front(timeout)
            return
        group = self.process.pid
        try:
            if drain_timeout > 0 and self.process.poll() is None:
                started = time.monotonic()
                try:
                    drained = self.drain(drain_timeout)
                    logger.info("drained in %.1f s%s", time.monotonic() - started, "" if drained else " (incomplete)")
                except (requests.RequestException, RuntimeError, ValueError, KeyError) as error:
                    logger.warning("drain failed, stopping anyway: %s", error)
            self._stop_front(timeout)
            frontend = []
            for process in _group_members(group):
                try:
                    if process.name() == "java":
                        process.terminate()
                        frontend.append(process)
                except psutil.Error:
                    continue
            psutil.wait_procs(frontend, timeout=timeout)
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(group, sig)
                except ProcessLookupError:
                    break
                if _wait_group_gone(group, timeout):
                    break
            self.process.wait(timeout)
        finally:
            self.process = None
            self._console.close()

    def _stop_front(self, timeout: float) -> None:
        """The front goes first: no new request reaches a stopping TorchServe through it."""
        if self.front_process is None:
            return
        self.front_process.terminate()
        try:
            self.front_process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.front_process.kill()
            self.front_process.wait(timeout)
        self.front_process = None

    def __enter__(self) -> "TorchServe":
        return self.start() if self.process is None else self

    def __exit__(self, *exc) -> None:
        self.stop()


def _group_members(group: int) -> list[psutil.Process]:
    members = []
    for process in psutil.process_iter(["status"]):
        try:
            if os.getpgid(process.pid) == group and process.info["status"] != psutil.STATUS_ZOMBIE:
                members.append(process)
        except (ProcessLookupError, psutil.Error):
            continue
    return members


def _wait_group_gone(group: int, timeout: float) -> bool:
    """True once no live process of the group is left (the Java frontend exits last)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _group_members(group):
            return True
        time.sleep(0.2)
    return False


def latest_snapshot(snapshot_dir: str | Path, model_store: str | Path | None = None) -> dict | None:
    """The model_snapshot of TorchServe's newest snapshot file, or None if there is none.

    Models whose name our rules refuse (imagerec/naming.py; TorchServe's management API accepts names
    such as '../evil') are dropped with a warning naming them: restoring them would stop every start.
    Versions whose archive is no longer in ``model_store`` are dropped (TorchServe would refuse to
    start on them); a model left without versions is dropped entirely, and one left without a default
    gets its highest version (natural order, ``version_key``) as the default.
    """
    files = sorted(Path(snapshot_dir).glob("*.cfg"), key=lambda p: (p.stat().st_mtime, p.name))
    for path in reversed(files):
        raw = read_properties(path).get("model_snapshot")
        if raw is None:
            continue
        snapshot = json.loads(raw)
        for name in list(snapshot.get("models", {})):
            try:
                validate_name(name)
            except ValueError as refusal:
                logger.warning("snapshot %s: model %r not restored: %s", path.name, name, refusal)
                del snapshot["models"][name]
        if model_store is not None:
            for name, versions in list(snapshot.get("models", {}).items()):
                for version, entry in list(versions.items()):
                    if not (Path(model_store) / entry["marName"]).is_file():
                        logger.warning("snapshot %s: %s v%s dropped, %s is gone", path.name, name, version,
                                       entry["marName"])
                        del versions[version]
                if not versions:
                    del snapshot["models"][name]
                elif not any(v.get("defaultVersion") for v in versions.values()):
                    versions[max(versions, key=version_key)]["defaultVersion"] = True
        snapshot["modelCount"] = len(snapshot.get("models", {}))
        return snapshot if snapshot.get("models") else None
    return None


def install_archive(archive: str | Path, model_store: str | Path, file_name: str | None = None) -> Path:
    """Copy an archive into a model store (TorchServe registers local archives by file name),
    atomically: TorchServe never sees half a file."""
    target = Path(model_store) / (file_name or Path(archive).name)
    if Path(archive).resolve() == target.resolve():
        return target
    return atomic_copy(archive, target)
