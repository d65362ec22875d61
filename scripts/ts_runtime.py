"""Running TorchServe and talking to it: config files, keys, start/stop, authorised requests.

Used by ``scripts/serve.py`` (the shipped server), by ``scripts/manage.py``, by the tests and by the
benchmarks, so all of them start TorchServe the same way from the shipped ``config.properties``.

Each ``TorchServe`` instance gets its own working directory (key_file.json and logs land there)
and its own TMPDIR (TorchServe keeps its pid file in the temp directory), so several servers can
run side by side.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import requests

logger = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SHIPPED_CONFIG = PROJECT_ROOT / "config.properties"
KEY_FILE_NAME = "key_file.json"
FRONT_SCRIPT = PROJECT_ROOT / "scripts" / "front.py"
DEFAULT_TIMEOUT_S = 30.0
# TorchServe runs from its own environment, which scripts/setup.sh builds: its launcher hands its own
# interpreter to the frontend for the workers, and workers use the CPU build of torch
# (requirements-serve.txt says why). The variable points the tools at another such environment.
SERVE_VENV_VAR = "IMAGEREC_SERVE_VENV"
DEFAULT_SERVE_VENV = PROJECT_ROOT / ".venv-serve"


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
    """The serving environment's interpreter: it compiles backbones for the workers (handlers/compile_backbone.py)."""
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


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class TorchServe:
    """A TorchServe process started from the shipped config with per-instance overrides.

    ``models``: TorchServe's ``load_models`` value ("name=file.mar,..." or "ALL"), or None.
    ``overrides``: properties replacing the shipped ones (e.g. a test's job_queue_size).
    ``ports``: (inference, management, metrics); None picks free loopback ports (tests), while
    ``shipped_ports()`` keeps the addresses of config.properties (the real server).
    ``front``: put the admission front (imagerec/front.py, scripts/front.py) on the inference address
    and TorchServe's inference API on a private loopback port behind it (``upstream_url``);
    ``front_args``: more scripts/front.py options (e.g. ``("--inflight-mib", "29")``).
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
        inference, management, metrics = ports or (free_port(), free_port(), free_port())
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
        if ports is None:  # side-by-side servers: gRPC ports must not clash either
            self.properties.update(grpc_inference_port=str(free_port()), grpc_management_port=str(free_port()))
        if models:
            self.properties["load_models"] = models
        self.properties.update(overrides or {})
        self.upstream_url = self.inference_url
        if front:  # clients keep the inference address; TorchServe moves behind the front
            self.upstream_url = f"http://127.0.0.1:{free_port()}"
            self.properties["inference_address"] = self.upstream_url
        self.front = front
        self.front_args = tuple(front_args)
        self.extra_env = env or {}
        self.process: subprocess.Popen | None = None
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

    def start(self, timeout: float = 120.0, snapshots: bool = False, restore: bool = False) -> "TorchServe":
        """Start and wait until the server answers and every loaded model has a ready worker.

        snapshots: let TorchServe record every registration change in ``snapshot_dir``.
        restore: (implies snapshots) bring back the models, versions, workers and default versions of
        the latest snapshot; ``models`` not in it are registered as well.
        """
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
                [sys.executable, str(FRONT_SCRIPT), "--listen", self.inference_url.removeprefix("http://"),
                 "--upstream", self.upstream_url, "--max-body", properties["max_request_size"], *self.front_args],
                cwd=self.workdir, stdout=self._console, stderr=subprocess.STDOUT, start_new_session=True,
            )
        try:
            self.wait_ready(timeout)
            if snapshot is not None:
                self._register_missing(snapshot, timeout)
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
        response = self.management("GET", "/models")
        if response.status_code != 200:
            return False
        for model in response.json().get("models", []):
            for version in self.management("GET", f"/models/{model['modelName']}/all").json():
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

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the frontend and all workers, and wait until every one of them has exited."""
        self._stop_front(timeout)
        if self.process is None:
            return
        group = self.process.pid
        try:
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

    Versions whose archive is no longer in ``model_store`` are dropped (TorchServe would refuse to
    start on them); a model left without versions is dropped entirely.
    """
    files = sorted(Path(snapshot_dir).glob("*.cfg"), key=lambda p: (p.stat().st_mtime, p.name))
    for path in reversed(files):
        raw = read_properties(path).get("model_snapshot")
        if raw is None:
            continue
        snapshot = json.loads(raw)
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
                    max(versions.values(), key=lambda v: v["marName"])["defaultVersion"] = True
            snapshot["modelCount"] = len(snapshot["models"])
        return snapshot if snapshot.get("models") else None
    return None


def install_archive(archive: str | Path, model_store: str | Path, file_name: str | None = None) -> Path:
    """Copy an archive into a model store (TorchServe registers local archives by file name).

    The copy is written under a temporary name and renamed, so TorchServe never sees half a file.
    """
    target = Path(model_store) / (file_name or Path(archive).name)
    if Path(archive).resolve() == target.resolve():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=target.parent, prefix=".incoming-", suffix=".part", delete=False) as tmp:
        partial = Path(tmp.name)
    try:
        shutil.copyfile(archive, partial)
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    return target
