"""Model lifecycle through TorchServe's management API: register, deploy, roll back, scale, retire.

The one implementation of these operations: ``scripts/manage.py`` (the command line),
``training/train_head.py --register`` and the page's server call the functions below.

Order of a deploy: the new version is registered next to the serving one, its workers are waited
for, the archive's own check images (or given ones) are sent to that version directly
(/predictions/NAME/VERSION) and compared with the archive's classes; only then does it become the
default. Users calling /predictions/NAME never reach an unchecked version, and the old version
stays loaded for ``rollback``.

Scaling down: TorchServe stops surplus workers in the middle of their batch (their requests get
HTTP 500), so ``scale`` never shrinks a version that takes traffic in place. It registers the same
archive again as a new registration "VERSION-rN" with the new worker count, moves the default to it
and retires the old registration once its queue has drained (``in_place`` forces TorchServe's own,
lossy, scale-down). See docs/OPERATIONS.md.

An archive outside the model store is copied into it first: TorchServe only registers archives by
file name from its model store (``allowed_urls`` in config.properties refuses any URL).

Failures raise ``ManageError`` whose ``exit_code`` is one of the EXIT_* codes below.
"""

from __future__ import annotations

import filecmp
import json
import logging
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import requests

from handlers.constants import KEEP_HEADER, UNKNOWN_LABEL, VERSION_HEADER
from handlers.layout import MAR_MANIFEST_FILE, ArchiveContents
from imagerec.cli import EXIT_BAD_ARGUMENTS, EXIT_FAILED
from imagerec.files import atomic_write
from imagerec.naming import archive_file_name, validate_name, validate_version, version_key
from imagerec.paths import DEFAULT_RUNTIME_DIR, PROJECT_ROOT, SHIPPED_CONFIG
from imagerec.torchserve import (
    DRAIN_GRACE_S,
    KEY_FILE_NAME,
    SENTINEL,
    auth_header,
    install_archive,
    read_keys,
    read_properties,
)

logger = logging.getLogger(__name__)

_SHIPPED = read_properties(SHIPPED_CONFIG)
DEFAULT_MANAGEMENT_URL = _SHIPPED["management_address"]
DEFAULT_INFERENCE_URL = _SHIPPED["inference_address"]
DEFAULT_KEY_FILE = DEFAULT_RUNTIME_DIR / KEY_FILE_NAME
DEFAULT_MODEL_STORE = (PROJECT_ROOT / _SHIPPED["model_store"]).resolve()

# Exit codes of the lifecycle tools (0, 1 and 2 as every CLI: imagerec.cli).
EXIT_REFUSED = 3
EXIT_UNREACHABLE = 4
EXIT_CHECK_FAILED = 5

# The deploy check catches a broken or mislabelled archive (scrambled classes score near 0, a wrong
# model near chance), not a slightly weaker one: with 2 check images per class one miss must pass.
DEFAULT_MIN_ACCURACY = 0.6
REQUEST_TIMEOUT_S = 30.0  # any single management/inference call that does not wait for workers
POLL_INTERVAL_S = 0.25


class ManageError(Exception):
    """A lifecycle operation failed; ``exit_code`` is what the CLI exits with."""

    def __init__(self, message: str, exit_code: int = EXIT_FAILED):
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class ArchiveFacts:
    """What an archive says about itself (read from the zip, never unpacked)."""

    path: Path
    name: str
    version: str  # the version TorchServe registers it under (MAR-INF/MANIFEST.json)
    info: dict = field(repr=False)

    @property
    def base_version(self) -> str:
        """The archive's own version (model_info.json); differs from ``version`` for -rN registrations."""
        return str(self.info.get("version", self.version))

    def classes(self) -> set[str]:
        if self.info.get("classes"):
            return set(self.info["classes"])
        return set(ArchiveContents(self.path).labels())

    def check_images(self) -> list[tuple[str, bytes, str | None]]:
        contents = ArchiveContents(self.path)
        return [(entry["file"], contents.read_bytes(entry["file"]), entry.get("label"))
                for entry in self.info.get("check_images") or []]


def inspect_archive(path: str | Path) -> ArchiveFacts:
    """Validate an archive file before anything reaches TorchServe. Raises ManageError (bad arguments)."""
    path = Path(path)
    if not path.is_file():
        raise ManageError(f"no archive at {path}", EXIT_BAD_ARGUMENTS)
    contents = ArchiveContents(path)
    try:
        contents.verify()
        manifest = contents.mar_manifest()["model"]
        info = contents.info()
        name = validate_name(str(manifest["modelName"]))
        version = validate_version(str(manifest["modelVersion"]))
        validate_version(str(info.get("version", version)))
    except (ValueError, KeyError, TypeError) as exc:
        raise ManageError(f"refusing {path}: {exc}", EXIT_BAD_ARGUMENTS) from None
    if info.get("name") not in (None, name):
        raise ManageError(f"refusing {path}: manifest names {name!r} but model_info.json {info.get('name')!r}",
                          EXIT_BAD_ARGUMENTS)
    return ArchiveFacts(path=path, name=name, version=version, info=info)


class Client:
    """Authorised, time-limited calls to one TorchServe; failures become ManageError with exit codes."""

    def __init__(self, management_url: str = DEFAULT_MANAGEMENT_URL, key_file: str | Path = DEFAULT_KEY_FILE,
                 model_store: str | Path = DEFAULT_MODEL_STORE, inference_url: str = DEFAULT_INFERENCE_URL,
                 drain_seconds: float = DRAIN_GRACE_S):
        self.drain_seconds = drain_seconds
        self.management_url = management_url.rstrip("/")
        self.inference_url = inference_url.rstrip("/")
        self.key_file = Path(key_file)
        self.model_store = Path(model_store).resolve()
        self._keys: dict[str, str] | None = None
        self.session = requests.Session()

    def key(self, role: str) -> str:
        if self._keys is None:
            try:
                self._keys = read_keys(self.key_file)
            except FileNotFoundError as exc:
                raise ManageError(f"{exc} (is TorchServe running? pass --key-file)", EXIT_UNREACHABLE) from None
            except json.JSONDecodeError as exc:  # TorchServe writes it in place at start: not complete yet
                raise ManageError(f"key file {self.key_file} is not complete yet ({exc}): is TorchServe still "
                                  "starting?", EXIT_UNREACHABLE) from None
            except (ValueError, KeyError, TypeError) as exc:
                raise ManageError(f"unreadable key file {self.key_file}: {exc}", EXIT_BAD_ARGUMENTS) from None
        return self._keys[role]

    def call(self, method: str, path: str, *, expect=(200,), timeout: float = REQUEST_TIMEOUT_S,
             inference: bool = False, **kwargs) -> requests.Response:
        base, role = (self.inference_url, "inference") if inference else (self.management_url, "management")
        extra_headers = kwargs.pop("headers", {})
        for attempt in range(2):
            headers = {**auth_header(self.key(role)), **extra_headers}
            try:
                response = self.session.request(method, base + path, headers=headers, timeout=timeout, **kwargs)
            except requests.Timeout:
                raise ManageError(f"{method} {base}{path}: no answer within {timeout:.0f}s", EXIT_FAILED) from None
            except requests.ConnectionError as exc:
                raise ManageError(f"TorchServe not reachable at {base}: {exc.__class__.__name__}",
                                  EXIT_UNREACHABLE) from None
            if attempt == 0 and _is_key_refusal(response):
                self._keys = None  # TorchServe writes new keys at every start: read them again once
                continue
            break
        if response.status_code not in expect:
            raise ManageError(f"TorchServe refused {method} {path}: HTTP {response.status_code} {_message(response)}",
                              EXIT_REFUSED)
        return response

    # -- reading state -----------------------------------------------------------------------
    def model_names(self) -> list[str]:
        names, token = [], None
        for _ in range(1000):  # pages of 100; bounded
            params = {"limit": 100, **({"next_page_token": token} if token else {})}
            page = self.call("GET", "/models", params=params).json()
            names += [m["modelName"] for m in page.get("models", [])]
            token = page.get("nextPageToken")
            if not token:
                break
        return names

    def versions(self, name: str) -> list[dict]:
        """Describe entries of every registered version; [] if the model is not registered."""
        response = self.call("GET", f"/models/{validate_name(name)}/all", expect=(200, 404))
        return response.json() if response.status_code == 200 else []

    def describe(self, name: str, version: str) -> dict:
        return self.call("GET", f"/models/{name}/{validate_version(version)}").json()[0]

    def default_version(self, name: str) -> str | None:
        response = self.call("GET", f"/models/{validate_name(name)}", expect=(200, 404))
        return response.json()[0]["modelVersion"] if response.status_code == 200 else None

    def archive_of(self, entry: dict) -> ArchiveFacts | None:
        """The archive a registered version was loaded from, if it is a file in our model store."""
        path = self.model_store / entry.get("modelUrl", "")
        if path.parent != self.model_store or not path.is_file():
            return None
        try:
            return inspect_archive(path)
        except ManageError:
            return None

    def base_version(self, entry: dict) -> str:
        facts = self.archive_of(entry)
        return facts.base_version if facts else entry["modelVersion"]

    # -- waiting -----------------------------------------------------------------------------
    def wait_ready(self, name: str, version: str, workers: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        states: list = []
        while time.monotonic() < deadline:
            states = [w.get("status") for w in self.describe(name, version).get("workers", [])]
            if len(states) == workers and all(s == "READY" for s in states):
                return
            time.sleep(POLL_INTERVAL_S)
        raise ManageError(f"{name} v{version}: {workers} ready workers expected within {timeout:.0f}s, "
                          f"have {states}", EXIT_FAILED)

    def wait_idle(self, name: str, version: str, timeout: float) -> None:
        """Wait until a version no longer receives routed traffic has finished what it was given.

        TorchServe reports the jobs still queued (jobQueueStatus.pendingRequests) but not the batch a
        worker is running, so after the queue is empty one sentinel request per worker goes through the
        same queue (FIFO), and then ``drain_seconds`` cover a batch another worker may still run.
        Requests can still reach the version by its own URL (/predictions/NAME/VERSION): it is idle only
        if its queue is still empty after all that; otherwise the drain starts over, until ``timeout``
        (then ManageError: the caller must not unregister it).
        """
        deadline = time.monotonic() + timeout
        while True:
            entry = self.describe(name, version)
            if entry.get("jobQueueStatus", {}).get("pendingRequests", 0) == 0:
                for _ in entry.get("workers", []):
                    self.call("PUT", f"/predictions/{name}/{version}", inference=True, data=SENTINEL,
                              expect=range(200, 600), timeout=max(1.0, deadline - time.monotonic()))
                time.sleep(self.drain_seconds)
                if self.describe(name, version).get("jobQueueStatus", {}).get("pendingRequests", 0) == 0:
                    return
                logger.info("%s v%s received requests while draining: draining again", name, version)
            if time.monotonic() > deadline:
                raise ManageError(f"{name} v{version} still receives requests after {timeout:.0f}s: not "
                                  "unregistered (stop its clients, or the requests to /predictions/"
                                  f"{name}/{version})", EXIT_FAILED)
            time.sleep(POLL_INTERVAL_S)

    # -- changing state ----------------------------------------------------------------------
    def register(self, file_name: str, name: str, version: str, *, workers: int | None,
                 batch_size: int | None, max_batch_delay: int | None, timeout: float) -> None:
        params = {"url": file_name, "synchronous": "true"}
        if workers is not None:
            params["initial_workers"] = workers
        if batch_size is not None:
            params["batch_size"] = batch_size
        if max_batch_delay is not None:
            params["max_batch_delay"] = max_batch_delay
        try:
            self.call("POST", "/models", params=params, timeout=timeout)
            if workers is not None and self.describe(name, version).get("maxWorkers", workers) < workers:
                # The archive's model-config.yaml caps workers at its maxWorkers, whatever
                # initial_workers says: lift the cap to the number asked for.
                self.call("PUT", f"/models/{name}/{version}", timeout=timeout,
                          params={"min_worker": workers, "max_worker": workers, "synchronous": "true"})
        except ManageError:
            # A failed load can leave a registration without workers behind: remove it.
            if any(e["modelVersion"] == version for e in self.versions(name)):
                self.call("DELETE", f"/models/{name}/{version}", expect=(200, 404))
            raise

    def set_default(self, name: str, version: str) -> None:
        self.call("PUT", f"/models/{name}/{validate_version(version)}/set-default")

    def unregister(self, name: str, version: str, timeout: float) -> None:
        self.call("DELETE", f"/models/{name}/{validate_version(version)}", timeout=timeout)


def _is_key_refusal(response: requests.Response) -> bool:
    # TorchServe 0.12 answers a wrong or missing token with 400 InvalidKeyException.
    try:
        return response.status_code == 400 and response.json().get("type") == "InvalidKeyException"
    except ValueError:
        return False


def _message(response: requests.Response) -> str:
    try:
        return str(response.json().get("message", response.text)).strip()
    except ValueError:
        return response.text.strip()[:300]


# -- the model store ----------------------------------------------------------------------------
def install(facts: ArchiveFacts, model_store: Path) -> tuple[Path, bool]:
    """Put the archive into the model store under its per-version name. Returns (path, copied)."""
    model_store = Path(model_store).resolve()
    source = facts.path.resolve()
    if source.parent == model_store:
        return source, False
    target = model_store / archive_file_name(facts.name, facts.version)
    if target.exists():
        if filecmp.cmp(source, target, shallow=False):
            return target, False
        raise ManageError(f"{target} already exists with different contents; build a new version",
                          EXIT_REFUSED)
    install_archive(source, model_store, target.name)
    logger.info("copied %s into the model store as %s", source, target.name)
    return target, True


def write_registration_copy(facts: ArchiveFacts, new_version: str, model_store: Path) -> ArchiveFacts:
    """The same archive with TorchServe's version set to ``new_version`` (model_info.json untouched).

    TorchServe takes the version of a registration from MAR-INF/MANIFEST.json and has no parameter
    to override it, so a second registration of the same model needs its own copy.
    """
    target = Path(model_store) / archive_file_name(facts.name, new_version)

    def write(partial: Path) -> None:
        with zipfile.ZipFile(facts.path) as source, zipfile.ZipFile(partial, "w") as copy:
            for item in source.infolist():
                data = source.read(item.filename)
                if item.filename == MAR_MANIFEST_FILE:
                    manifest = json.loads(data)
                    manifest["model"]["modelVersion"] = new_version
                    data = json.dumps(manifest, indent=2).encode()
                copy.writestr(item, data)

    atomic_write(target, write)
    return inspect_archive(target)


def _is_registration_copy(facts: ArchiveFacts | None) -> bool:
    return facts is not None and facts.version != facts.base_version


# -- operations -----------------------------------------------------------------------------
def _refuse_registered(client: Client, facts: ArchiveFacts) -> None:
    if any(e["modelVersion"] == facts.version for e in client.versions(facts.name)):
        raise ManageError(f"{facts.name} v{facts.version} is already registered; build the archive with a new "
                          "version (versions are immutable)", EXIT_REFUSED)


def register_version(client: Client, facts: ArchiveFacts, *, workers: int | None,
                     batch_size: int | None = None,
                     max_batch_delay: int | None = None, timeout: float) -> tuple[Path, bool]:
    """Register and wait until ready. Returns (archive in the store, whether it was copied there)."""
    _refuse_registered(client, facts)
    path, copied = install(facts, client.model_store)
    try:
        logger.info("registering %s v%s from %s", facts.name, facts.version, path.name)
        client.register(path.name, facts.name, facts.version, workers=workers, batch_size=batch_size,
                        max_batch_delay=max_batch_delay, timeout=timeout)
        expected = workers if workers is not None else client.describe(facts.name, facts.version)["minWorkers"]
        client.wait_ready(facts.name, facts.version, expected, timeout)
    except ManageError:
        if copied:
            path.unlink(missing_ok=True)  # we put it there; do not leave a half-deployed file behind
        raise
    logger.info("%s v%s ready", facts.name, facts.version)
    return path, copied


def register_archive(archive: Path, *, management_url: str, key_file: Path, model_store: Path,
                     workers: int = 1, timeout: float = 120.0) -> None:
    """Copy ``archive`` into the model store (if outside it), register it and wait until its workers are READY.

    Raises ManageError (``.exit_code``) on a bad archive, a refused registration, an unreachable server
    or a timeout. The first version of a model becomes its default; later ones do not (see deploy).
    """
    if workers < 1:
        raise ManageError("workers must be at least 1", EXIT_BAD_ARGUMENTS)
    client = Client(management_url, key_file, model_store)
    register_version(client, inspect_archive(archive), workers=workers, timeout=timeout)


def run_check(client: Client, facts: ArchiveFacts, checks: list[tuple[str, bytes, str | None]],
              min_accuracy: float) -> dict:
    """Send check images to the new version directly; raise ManageError(EXIT_CHECK_FAILED) with reasons.

    The check catches a broken or mislabelled archive, so it asks for the classes (``X-Keep: 1``):
    a head's rejection rule may decline some of its own photos ("unknown"; train_head reports how
    many), which says how strict the rule is, not that the archive is broken. An "unknown" that
    comes back all the same counts as a miss, never as a label outside the archive.
    """
    classes = facts.classes()
    problems, answered, correct, expected_n = [], 0, 0, 0
    headers = {"Content-Type": "application/octet-stream", KEEP_HEADER: "1"}
    for label_source, data, expected in checks:
        response = client.call("PUT", f"/predictions/{facts.name}/{facts.version}", inference=True, data=data,
                               expect=range(100, 600), headers=headers)
        if response.status_code != 200:
            problems.append(f"{label_source}: HTTP {response.status_code} {_message(response)}")
            continue
        served_by = response.headers.get(VERSION_HEADER)
        if served_by != facts.version:
            problems.append(f"{label_source}: answered by version {served_by!r}, not {facts.version!r}")
            continue
        try:
            labels = [entry["label"] for entry in response.json()]
        except (ValueError, KeyError, TypeError):
            problems.append(f"{label_source}: unexpected answer {response.text[:200]!r}")
            continue
        # A head may answer "unknown" first (handlers/rejection.py): a miss for a labelled check image,
        # not an answer outside the archive's classes.
        strangers = [label for label in labels if label not in classes and label != UNKNOWN_LABEL]
        if strangers:
            problems.append(f"{label_source}: labels {strangers} are not classes of the archive")
            continue
        answered += 1
        if expected is not None:
            expected_n += 1
            if labels and labels[0] == expected:
                correct += 1
            else:
                logger.info("check %s: expected %r, top-1 %r", label_source, expected, labels[:1])
    accuracy = correct / expected_n if expected_n else None
    if accuracy is not None and accuracy < min_accuracy:
        problems.append(f"top-1 matched the expected label for {correct}/{expected_n} check images "
                        f"({accuracy:.0%} < {min_accuracy:.0%})")
    if problems:
        raise ManageError(f"check of {facts.name} v{facts.version} failed: " + "; ".join(problems), EXIT_CHECK_FAILED)
    return {"checked": answered, "with_label": expected_n, "top1_correct": correct}


def deploy(client: Client, archive: Path, *, checks: list[tuple[str, bytes, str | None]] | None = None,
           skip_check: bool = False, min_accuracy: float = DEFAULT_MIN_ACCURACY, keep: int = 2,
           workers: int | None = None, timeout: float = 120.0) -> dict:
    facts = inspect_archive(archive)
    if keep < 1:
        raise ManageError("--keep must be at least 1", EXIT_BAD_ARGUMENTS)
    _refuse_registered(client, facts)
    checks = checks if checks else facts.check_images()
    if not checks and not skip_check:
        raise ManageError(f"{archive} has no check images: pass --check-image FILE[=LABEL] (or --no-check)",
                          EXIT_BAD_ARGUMENTS)
    unknown = sorted({label for _, _, label in checks if label is not None} - facts.classes())
    if unknown:
        raise ManageError(f"check labels {unknown} are not classes of {archive} (see its classes or "
                          "index_to_name.json)", EXIT_BAD_ARGUMENTS)
    previous = client.default_version(facts.name)
    if workers is None and previous is not None:
        workers = len(client.describe(facts.name, previous).get("workers", [])) or None
    path, copied = register_version(client, facts, workers=workers, timeout=timeout)
    result = {"name": facts.name, "version": facts.version, "previous": previous}
    if not skip_check:
        try:
            result["check"] = run_check(client, facts, checks, min_accuracy)
        except ManageError as failure:
            logger.error("%s", failure)
            _retire_registration(client, facts.name, facts.version, timeout, idle_wait=False)
            if copied:
                path.unlink(missing_ok=True)  # leave the store as it was
            raise ManageError(f"{failure}; default stays {previous}", failure.exit_code) from None
        logger.info("check passed: %s", result["check"])
    if previous is not None:
        client.set_default(facts.name, facts.version)
        logger.info("%s default: v%s -> v%s", facts.name, previous, facts.version)
    result["retired"] = _prune(client, facts.name, keep={facts.version, previous}, limit=keep, timeout=timeout)
    return result


def _prune(client: Client, name: str, *, keep: set, limit: int, timeout: float) -> list[str]:
    """Retire the oldest non-default versions until at most ``limit`` remain (the ones in ``keep`` last)."""
    default = client.default_version(name)
    versions = [e["modelVersion"] for e in client.versions(name)]
    # Most wanted first: the default, the versions named in keep, then the newest.
    ranked = sorted(versions, key=version_key, reverse=True)
    ranked.sort(key=lambda v: (v != default, v not in keep))  # stable: newest first within each group
    retired = []
    for version in ranked[limit:]:
        retire(client, name, version, timeout=timeout)
        retired.append(version)
    return retired


def rollback(client: Client, name: str, to: str | None = None) -> dict:
    entries = client.versions(name)
    if not entries:
        raise ManageError(f"no model named {name!r} is registered", EXIT_REFUSED)
    current = client.default_version(name)
    by_version = {e["modelVersion"]: e for e in entries}
    if to is not None:
        validate_version(to)
        if to not in by_version:
            raise ManageError(f"{name} v{to} is not registered (have {sorted(by_version, key=version_key)})",
                              EXIT_REFUSED)
        target = to
    else:
        current_base = version_key(client.base_version(by_version[current]))
        older = [v for v, e in by_version.items() if version_key(client.base_version(e)) < current_base]
        if not older:
            raise ManageError(f"{name}: no version older than the default v{current} is registered", EXIT_REFUSED)
        target = max(older, key=version_key)
    client.set_default(name, target)
    logger.info("%s default: v%s -> v%s", name, current, target)
    return {"name": name, "version": target, "previous": current}


def retire(client: Client, name: str, version: str, *, timeout: float = 120.0) -> dict:
    validate_version(version)
    entries = {e["modelVersion"]: e for e in client.versions(name)}
    if version not in entries:
        raise ManageError(f"{name} v{version} is not registered", EXIT_REFUSED)
    default = client.default_version(name)
    if version == default:
        raise ManageError(f"{name} v{version} is the default version: deploy or roll back to another first",
                          EXIT_REFUSED)
    _retire_registration(client, name, version, timeout)
    return {"name": name, "retired": version, "default": default}


def _retire_registration(client: Client, name: str, version: str, timeout: float, idle_wait: bool = True) -> None:
    facts = client.archive_of(client.describe(name, version))
    if idle_wait:
        client.wait_idle(name, version, timeout)
    client.unregister(name, version, timeout)
    if _is_registration_copy(facts):
        facts.path.unlink(missing_ok=True)  # a copy scale() wrote; the original archive stays
    logger.info("retired %s v%s", name, version)


def scale(client: Client, name: str, version: str | None, workers: int, *, in_place: bool = False,
          timeout: float = 120.0) -> dict:
    if workers < 1:
        raise ManageError("--workers must be at least 1 (retire a version to remove it)", EXIT_BAD_ARGUMENTS)
    default = client.default_version(name)
    if default is None:
        raise ManageError(f"no model named {name!r} is registered", EXIT_REFUSED)
    version = validate_version(version) if version else default
    entry = client.describe(name, version)
    current = len(entry.get("workers", []))
    result = {"name": name, "version": version, "workers": workers, "before": current}
    if workers >= current or in_place or version != default:
        if workers < current and version != default and not in_place:
            client.wait_idle(name, version, timeout)  # nothing routes to it by default: let it drain
        client.call("PUT", f"/models/{name}/{version}",
                    params={"min_worker": workers, "max_worker": workers, "synchronous": "true"}, timeout=timeout)
        client.wait_ready(name, version, workers, timeout)
        logger.info("%s v%s: %d -> %d workers", name, version, current, workers)
        return result
    # Lossless scale-down of the serving version: a fresh registration with fewer workers takes the
    # traffic, and the old one is retired once drained (TorchServe would kill busy workers mid-batch).
    facts = client.archive_of(entry)
    if facts is None:
        raise ManageError(f"{name} v{version} was not registered from a file in {client.model_store}; "
                          "use --in-place (lossy under load)", EXIT_REFUSED)
    registered = {e["modelVersion"] for e in client.versions(name)}
    for n in range(1, 1000):
        new_version = f"{facts.base_version}-r{n}"
        if new_version not in registered and not (client.model_store / archive_file_name(name, new_version)).exists():
            break
    copy = write_registration_copy(facts, new_version, client.model_store)
    try:
        register_version(client, copy, workers=workers, batch_size=entry.get("batchSize"),
                         max_batch_delay=entry.get("maxBatchDelay"), timeout=timeout)
    except ManageError:
        copy.path.unlink(missing_ok=True)
        raise
    client.set_default(name, new_version)
    _retire_registration(client, name, version, timeout)
    logger.info("%s: v%s (%d workers) replaced by v%s (%d workers)", name, version, current, new_version, workers)
    return {**result, "version": new_version, "replaced": version}


def overview(client: Client, names: list[str] | None = None) -> list[dict]:
    """One row per model. A registered name outside our rules (the raw management API accepts '../evil')
    is listed with ``refused_name`` instead of its versions: such a name cannot be addressed safely."""
    rows = []
    for name in names if names is not None else client.model_names():
        if names is None:
            try:
                validate_name(name)
            except ValueError as refusal:
                logger.warning("model %r: %s (restart the server to drop it; docs/OPERATIONS.md)", name, refusal)
                rows.append({"name": name, "refused_name": str(refusal), "versions": []})
                continue
        entries = client.versions(validate_name(name))
        if not entries:
            raise ManageError(f"no model named {name!r} is registered", EXIT_REFUSED)
        default = client.default_version(name)
        rows.append({
            "name": name,
            "default": default,
            "versions": [{
                "version": e["modelVersion"],
                "archive_version": client.base_version(e),
                "archive": e.get("modelUrl"),
                "default": e["modelVersion"] == default,
                "workers": [{"pid": w.get("pid"), "status": w.get("status")} for w in e.get("workers", [])],
                "batch_size": e.get("batchSize"),
                "max_batch_delay": e.get("maxBatchDelay"),
                "pending_requests": e.get("jobQueueStatus", {}).get("pendingRequests"),
            } for e in sorted(entries, key=lambda e: version_key(e["modelVersion"]))],
        })
    return rows
