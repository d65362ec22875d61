"""The authenticating gateway in front of one pod's TorchServe: one client credential for every replica.

TorchServe 0.12 makes new random keys at every start, so clients behind a Service cannot hold one
key for all replicas, and its keys must never leave the pod (the management key registers models).
The gateway is the only port a pod exposes:

    client --Bearer <client token>--> gateway :8090 --Bearer <this pod's inference key>--> TorchServe 127.0.0.1:8080

- ``/predictions/NAME[/VERSION]`` (PUT or POST): the client token is checked (constant-time) against
  the tokens of a mounted Secret file (re-read when it changes: several lines = rotation without a
  restart) or an environment variable; the request is streamed to TorchServe over a keep-alive pool on
  loopback with the pod's own inference key, and TorchServe's answer is streamed back unchanged
  (status, JSON, ``X-Model-Version``). A missing or wrong token gets 401 and never reaches TorchServe.
- ``/ready``: 200 only when the model set was prepared (every version registered, READY and its check
  images passed; ``imagerec.model_set.prepare``) and, polled every second, every model of the set
  still has the set's version as default with a READY worker; 503 with the reason otherwise, and
  from the moment a drain begins.
- ``/live``: 200 while the gateway's event loop answers.
- ``/metrics``: TorchServe's Prometheus text (read-only; no key on TorchServe's side either).

Draining (SIGTERM): ``/ready`` turns 503 at once, requests keep being served for ``shutdown_delay``
seconds (time for load balancers to notice) with ``Connection: close``, then the port closes and
in-flight requests are finished (up to ``shutdown_timeout``) before the process exits.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import signal
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp
from aiohttp import web

from handlers.constants import MAX_REQUEST_BYTES
from imagerec.model_set import ModelSet
# The key file reader and the lifecycle errors; they move to imagerec/ with the restructure (issue 10).
from imagerec.cli import EXIT_FAILED
from imagerec.front import HOP_BY_HOP
from imagerec.management import EXIT_UNREACHABLE, ManageError
from imagerec.torchserve import read_keys

logger = logging.getLogger(__name__)

TOKEN_ENV_VAR = "IMAGEREC_CLIENT_TOKEN"
# Multipart framing on top of the largest accepted photo (config.properties: max_request_size).
MAX_BODY_BYTES = MAX_REQUEST_BYTES + 1024 * 1024
# Longer than a version's responseTimeout (120 s): TorchServe answers a slow batch itself first.
UPSTREAM_TIMEOUT_S = 130.0
# The front's hop-by-hop headers (one connection, not the message), plus the ones aiohttp sets itself.
_HOP_BY_HOP = HOP_BY_HOP | {"date", "server"}


class ChangingFile:
    """A small file re-read only when its mtime or size changes (Secrets are updated in place)."""

    def __init__(self, path: str | Path, load: Callable[[Path], object]):
        self.path = Path(path)
        self._load = load
        self._stamp: tuple | None = None
        self._value: object = None

    def get(self):
        stat = self.path.stat()
        stamp = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
        if stamp != self._stamp:
            self._value = self._load(self.path)
            self._stamp = stamp
        return self._value


def _parse_tokens(text: str) -> tuple[bytes, ...]:
    return tuple(line.strip().encode() for line in text.splitlines() if line.strip() and not line.startswith("#"))


class ClientTokens:
    """The client credential(s): lines of a mounted Secret file, or one token from the environment."""

    def __init__(self, token_file: str | Path | None = None, token: str | None = None):
        if not token_file and not token:
            raise ValueError(f"no client token: pass a token file or set {TOKEN_ENV_VAR}")
        self._file = ChangingFile(token_file, lambda path: _parse_tokens(path.read_text())) if token_file else None
        self._fixed = _parse_tokens(token or "")

    def tokens(self) -> tuple[bytes, ...]:
        if self._file is None:
            return self._fixed
        try:
            return self._file.get()
        except OSError as exc:  # a Secret being swapped: refuse rather than guess
            logger.error("cannot read client tokens from %s: %s", self._file.path, exc)
            return ()

    def accepts(self, authorization: str | None) -> bool:
        scheme, _, presented = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not presented.strip():
            return False
        presented_bytes = presented.strip().encode()
        # Compare with every token (no early exit): the time taken says nothing about which matched.
        matches = [hmac.compare_digest(presented_bytes, token) for token in self.tokens()]
        return any(matches)


class Gateway:
    """The aiohttp application and its state. ``prepare`` brings TorchServe to the model set (blocking;
    run in a thread at startup, retried while TorchServe is not reachable yet)."""

    def __init__(self, *, inference_url: str, management_url: str, metrics_url: str, key_file: str | Path,
                 tokens: ClientTokens, model_set: ModelSet, prepare: Callable[[], object],
                 poll_interval: float = 1.0, shutdown_delay: float = 5.0, pool_size: int = 64):
        self.inference_url = inference_url.rstrip("/")
        self.management_url = management_url.rstrip("/")
        self.metrics_url = metrics_url.rstrip("/")
        # TorchServe writes new keys at every start: re-read them when the file changes.
        self.keys = ChangingFile(key_file, read_keys)
        self.tokens = tokens
        self.model_set = model_set
        self.prepare = prepare
        self.poll_interval = poll_interval
        self.shutdown_delay = shutdown_delay
        self.pool_size = pool_size
        self.prepared = False
        self.not_ready_reason = "starting: preparing the model set"
        self.models_ready = False
        self.draining = False
        self._session: aiohttp.ClientSession | None = None
        self._tasks: list[asyncio.Task] = []
        self.app = web.Application(client_max_size=MAX_BODY_BYTES)
        self.app.router.add_get("/live", self.live)
        self.app.router.add_get("/ready", self.ready)
        self.app.router.add_get("/metrics", self.metrics)
        for method in ("PUT", "POST"):
            self.app.router.add_route(method, "/predictions/{name}", self.predict)
            self.app.router.add_route(method, "/predictions/{name}/{version}", self.predict)
        self.app.on_startup.append(self._on_startup)
        self.app.on_cleanup.append(self._on_cleanup)

    # -- lifecycle ---------------------------------------------------------------------------
    async def _on_startup(self, app) -> None:
        connector = aiohttp.TCPConnector(limit=self.pool_size, keepalive_timeout=30)
        self._session = aiohttp.ClientSession(connector=connector, auto_decompress=False)
        self._tasks.append(asyncio.create_task(self._prepare_then_poll()))

    async def _on_cleanup(self, app) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._session.close()

    def begin_drain(self) -> None:
        if not self.draining:
            logger.info("draining: /ready answers 503 from now on")
        self.draining = True

    async def _prepare_then_poll(self) -> None:
        delay = 1.0
        while not self.prepared:
            try:
                await asyncio.to_thread(self.prepare)
                self.prepared = True
            except ManageError as exc:
                self.not_ready_reason = f"model set {self.model_set.revision}: {exc}"
                if exc.exit_code not in (EXIT_UNREACHABLE, EXIT_FAILED):
                    logger.error("%s (not retried: fix the set or its archives)", self.not_ready_reason)
                    return  # a failed check or a bad archive does not heal: stay unready
                logger.info("%s; retrying in %.0f s", self.not_ready_reason, delay)
                await asyncio.sleep(delay)
                delay = min(10.0, delay * 2)
            except Exception as exc:  # noqa: BLE001 - e.g. an unreadable check image: say why, stay unready
                self.not_ready_reason = f"model set {self.model_set.revision}: {exc.__class__.__name__}: {exc}"
                logger.exception("preparing the model set failed (not retried)")
                return
        logger.info("model set %s prepared", self.model_set.revision)
        while True:
            try:
                self.not_ready_reason = await self._check_models()
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError, KeyError) as exc:
                self.not_ready_reason = f"TorchServe not answering: {exc.__class__.__name__}"
            self.models_ready = self.not_ready_reason == ""
            await asyncio.sleep(self.poll_interval)

    async def _check_models(self) -> str:
        """"" when every model of the set has its version as default with a READY worker, else why not."""
        timeout = aiohttp.ClientTimeout(total=5)
        for entry in self.model_set.models:
            async with self._session.get(f"{self.management_url}/models/{entry.name}", timeout=timeout,
                                         headers=self._auth("management")) as response:
                if response.status != 200:
                    return f"{entry.name}: management API answered {response.status}"
                described = (await response.json())[0]
            if described["modelVersion"] != entry.version:
                return f"{entry.name}: default is v{described['modelVersion']}, the set says v{entry.version}"
            if not any(worker.get("status") == "READY" for worker in described.get("workers", [])):
                return f"{entry.name} v{entry.version}: no READY worker"
        return ""

    def _auth(self, role: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys.get()[role]}"}

    # -- endpoints ---------------------------------------------------------------------------
    async def live(self, request: web.Request) -> web.Response:
        return web.json_response({"live": True})

    async def ready(self, request: web.Request) -> web.Response:
        if self.draining:
            reason = "draining"
        elif not self.prepared or not self.models_ready:
            reason = self.not_ready_reason or "starting"
        else:
            return web.json_response({"ready": True, "revision": self.model_set.revision})
        return web.json_response({"ready": False, "revision": self.model_set.revision, "reason": reason},
                                 status=503)

    async def metrics(self, request: web.Request) -> web.StreamResponse:
        return await self._forward(request, self.metrics_url + "/metrics", headers={})

    async def predict(self, request: web.Request) -> web.StreamResponse:
        if not self.tokens.accepts(request.headers.get("Authorization")):
            return web.json_response({"code": 401, "type": "Unauthorized",
                                      "message": "missing or wrong client token (Authorization: Bearer <token>)"},
                                     status=401, headers={"WWW-Authenticate": 'Bearer realm="imagerec"'})
        if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
            return web.json_response({"code": 413, "message": f"request body over {MAX_BODY_BYTES} bytes"}, status=413)
        try:
            headers = self._auth("inference")
        except (OSError, ValueError, KeyError):  # TorchServe not started (yet): no key file
            return web.json_response({"code": 503, "message": "TorchServe is not running"}, status=503)
        if "Content-Type" in request.headers:
            headers["Content-Type"] = request.headers["Content-Type"]
        if request.content_length is not None:
            headers["Content-Length"] = str(request.content_length)
        return await self._forward(request, self.inference_url + request.path, headers=headers,
                                   body=request.content if request.body_exists else b"")

    async def _forward(self, request: web.Request, url: str, headers: dict, body=None) -> web.StreamResponse:
        """Stream the request to TorchServe and its answer back (no buffering of photos in the gateway)."""
        try:
            async with self._session.request(request.method, url, data=body, headers=headers,
                                             timeout=aiohttp.ClientTimeout(total=UPSTREAM_TIMEOUT_S)) as upstream:
                response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
                for name, value in upstream.headers.items():
                    if name.lower() not in _HOP_BY_HOP:
                        response.headers.add(name, value)
                if upstream.content_length is not None:
                    response.content_length = upstream.content_length
                if self.draining:
                    response.force_close()  # keep-alive clients reconnect, to a replica that stays
                await response.prepare(request)
                async for chunk in upstream.content.iter_chunked(64 * 1024):
                    await response.write(chunk)
                await response.write_eof()
                return response
        except asyncio.TimeoutError:
            return web.json_response({"code": 504, "message": "TorchServe did not answer in time"}, status=504)
        except aiohttp.ClientError as exc:
            logger.warning("%s %s: TorchServe unreachable: %s", request.method, request.path, exc)
            return web.json_response({"code": 502, "message": "TorchServe unreachable"}, status=502)


async def serve(gateway: Gateway, host: str, port: int, shutdown_timeout: float = 150.0) -> None:
    """Run until SIGTERM or SIGINT, then drain (see the module docstring) and return."""
    runner = web.AppRunner(gateway.app, access_log=None, shutdown_timeout=shutdown_timeout)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    logger.info("gateway listening on http://%s:%d (model set %s)", host, port, gateway.model_set.revision)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    gateway.begin_drain()
    started = time.monotonic()
    await asyncio.sleep(gateway.shutdown_delay)
    await runner.cleanup()  # closes the port, waits for in-flight requests, then on_cleanup
    logger.info("gateway stopped after draining %.1f s", time.monotonic() - started)

