"""The page for people: recognise a photo, teach a mode, manage its versions (JSON API + static page).

    python -m web.server --port 8000                # beside a TorchServe started by scripts/serve.py

``scripts/serve.py`` starts it next to TorchServe. It listens on 127.0.0.1. Recognising is open;
training, deploying, rolling back, retiring and scaling need the operator token (web/auth.py),
printed at start and kept in ``<runtime-dir>/operator_token``. TorchServe's keys stay here: the
browser only ever talks to this server. Uploads are streamed to TorchServe over pooled keep-alive
connections. The API is documented in README.md ("The page").
Exit codes: 0 stopped, 2 bad arguments, 1 anything else.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import logging
import sys
import time
from pathlib import Path

import aiohttp
from aiohttp import web

from handlers.backbones import EfficientNetLite0, EfficientNetLite0Lite2, backbone_names, get_backbone
from handlers.constants import MAX_REQUEST_BYTES, VERSION_HEADER
from imagerec.management import (
    DEFAULT_INFERENCE_URL,
    DEFAULT_KEY_FILE,
    DEFAULT_MANAGEMENT_URL,
    DEFAULT_MODEL_STORE,
    EXIT_CHECK_FAILED,
    EXIT_REFUSED,
    EXIT_UNREACHABLE,
    Client,
    ManageError,
)
from imagerec.naming import validate_name, validate_version
from imagerec.paths import PROJECT_ROOT
from imagerec.torchserve import auth_header, read_keys
from web import operations, teaching
from web.auth import TOKEN_HEADER, check_token, load_or_create_token
from web.jobs import JobStore

logger = logging.getLogger("web")

STATIC_DIR = Path(__file__).resolve().with_name("static")
DEFAULT_PORT = 8000
DEFAULT_RUNTIME_DIR = PROJECT_ROOT / "runtime" / "web"
RECOGNISE_TIMEOUT_S = 60.0
_CHUNK = 1 << 16
# Offered beside the served backbone by default: heads on it beat the served offline one on every
# shared photo set (docs/bench/openset.md), at a cost the page states in the teach form.
ACCURATE_BACKBONE = EfficientNetLite0Lite2.name
# What a mode on ACCURATE_BACKBONE costs against efficientnet_lite0, served by one TorchServe worker
# (docs/bench/backbones.md, run 1: 52.0 against 136.5 img/s at 16 clients; idle worker PSS 259
# against 219 MB). The page's hint reads these, so a new measurement changes one place.
ACCURATE_COST = {"baseline": EfficientNetLite0.name, "cpu_ratio": 2.6, "extra_worker_mb": 40}

# Errors the page shows in plain words: a stable code (the page translates it) and English text.
MESSAGES = {
    "not_image": "This file is not a photo the service can read. Send a JPEG, PNG, WebP, BMP or GIF.",
    "no_photo": "No photo was sent.",
    "too_large": f"The photo is larger than {MAX_REQUEST_BYTES // 2**20} MB.",
    "unknown_mode": "There is no such mode.",
    "mode_busy": "This mode is being deployed or its workers are starting. Try again in a moment.",
    "server_down": "The recognition server is not answering. Is TorchServe running?",
    "timeout": "The recognition server took too long to answer.",
    "failed": "The recognition failed on the server.",
    "token_missing": "This action needs the operator token.",
    "token_wrong": "The operator token is wrong.",
    "bad_request": "The request is not valid.",
    "refused": "Refused.",
    "check_failed": "The new version failed its check; the default is unchanged.",
    "not_found": "Not found.",
    "not_ready": "The job is not ready for that.",
}


def error(code: str, status: int, detail: str | None = None) -> web.Response:
    return web.json_response({"error": code, "message": MESSAGES.get(code, code), "detail": detail}, status=status)


class _TooLarge(Exception):
    pass


class Page:
    """The server's state: where TorchServe is, the pooled client session, jobs, the operator token."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.inference_url = args.inference.rstrip("/")
        self.client = Client(args.management, args.key_file, args.model_store, args.inference)
        self.token, self.token_file = load_or_create_token(args.runtime_dir)
        self.training_backbones = args.training_backbones or default_training_backbones(args.backbone)
        self.jobs = JobStore(args.runtime_dir / "jobs")
        self.session: aiohttp.ClientSession | None = None
        self._key: tuple[float, str] | None = None
        self._operations = asyncio.Lock()  # one lifecycle change at a time

    def inference_key(self) -> str:
        """TorchServe's inference key, re-read when key_file.json changes (a TorchServe restart)."""
        mtime = self.args.key_file.stat().st_mtime
        if self._key is None or self._key[0] != mtime:
            self._key = (mtime, read_keys(self.args.key_file)["inference"])
        return self._key[1]

    async def blocking(self, function, *args, **kwargs):
        return await asyncio.get_running_loop().run_in_executor(None, functools.partial(function, *args, **kwargs))

    # -- lifecycle of the server ---------------------------------------------------------------
    async def on_startup(self, app: web.Application) -> None:
        # One pooled, keep-alive session for every request to TorchServe.
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=64, keepalive_timeout=75),
            timeout=aiohttp.ClientTimeout(total=RECOGNISE_TIMEOUT_S),
        )
        self.jobs.start()

    async def on_cleanup(self, app: web.Application) -> None:
        await self.jobs.stop()
        if self.session:
            await self.session.close()

    # -- open: the page and recognising --------------------------------------------------------
    async def index(self, request: web.Request) -> web.StreamResponse:
        return web.FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    async def status(self, request: web.Request) -> web.Response:
        return web.json_response({
            "notice": self.args.notice or None,
            "backbone": self.args.backbone,
            # What a new mode may be trained on, the default first; the page draws a choice of them.
            "training_backbones": [training_choice(name, self.args.backbone) for name in self.training_backbones],
            "token_header": TOKEN_HEADER,
            "limits": {"photo_bytes": MAX_REQUEST_BYTES, "set_bytes": teaching.MAX_SET_BYTES,
                       "set_files": teaching.MAX_SET_FILES, "min_photos_per_class": teaching.MIN_PHOTOS_PER_CLASS},
        })

    async def modes(self, request: web.Request) -> web.Response:
        try:
            rows = await self.blocking(operations.list_modes, self.client)
        except ManageError as exc:
            return self._manage_error(exc)
        return web.json_response({"modes": rows})

    async def recognise(self, request: web.Request) -> web.Response:
        started = time.perf_counter()
        try:
            mode = validate_name(request.query.get("mode", ""))
            version = request.query.get("version")
            if version:
                validate_version(version)
        except ValueError as exc:
            return error("unknown_mode", 400, str(exc))
        if request.content_length is not None and request.content_length > MAX_REQUEST_BYTES + 64 * 1024:
            return error("too_large", 413)
        source = request.content
        if request.content_type.startswith("multipart/"):
            reader = await request.multipart()
            part = await reader.next()
            if part is None or part.name != "photo":
                return error("no_photo", 400, "send the photo in a form field named 'photo'")
            source = part
        elif request.content_length == 0:
            return error("no_photo", 400)
        sent = 0

        async def stream():
            nonlocal sent
            while True:
                chunk = await (source.read_chunk(_CHUNK) if source is not request.content else source.readany())
                if not chunk:
                    return
                sent += len(chunk)
                if sent > MAX_REQUEST_BYTES:
                    raise _TooLarge()
                yield chunk

        path = f"/predictions/{mode}" + (f"/{version}" if version else "")
        headers = {**auth_header(self.inference_key()), "Content-Type": "application/octet-stream"}
        if source is request.content and request.content_length is not None:
            # Known size: streamed as it arrives, with its length (no chunked framing for TorchServe).
            headers["Content-Length"] = str(request.content_length)
        body = stream()
        try:
            async with self.session.put(self.inference_url + path, data=body, headers=headers) as response:
                payload = await response.read()
                status = response.status
                answered_by = response.headers.get(VERSION_HEADER)
        except _TooLarge:
            return error("too_large", 413)
        except aiohttp.ClientConnectionError as exc:
            if sent > MAX_REQUEST_BYTES:
                return error("too_large", 413)
            return error("server_down", 503, exc.__class__.__name__)
        except asyncio.TimeoutError:
            return error("timeout", 504)
        except aiohttp.ClientError as exc:
            if sent > MAX_REQUEST_BYTES or isinstance(getattr(exc, "__cause__", None), _TooLarge):
                return error("too_large", 413)
            return error("server_down", 503, exc.__class__.__name__)
        if status != 200:
            return self._torchserve_error(status, payload)
        elapsed_ms = (time.perf_counter() - started) * 1000
        body = b'{"mode":"%s","version":%s,"ms":%.1f,"top":%s}' % (
            mode.encode(), (b'"%s"' % answered_by.encode()) if answered_by else b"null", elapsed_ms, payload)
        return web.Response(body=body, content_type="application/json", headers={VERSION_HEADER: answered_by or ""})

    def _torchserve_error(self, status: int, payload: bytes) -> web.Response:
        text = payload.decode(errors="replace")[:300]
        if status == 404:
            return error("unknown_mode", 404, text)
        if status == 503:
            return error("mode_busy", 503, text)
        if status == 413:
            return error("too_large", 413, text)
        if status == 415 or (status == 400 and ("truncated" in text or "image" in text)):
            return error("no_photo" if "empty" in text else "not_image", 415 if status == 415 else 400, text)
        if status == 400 and "empty" in text:
            return error("no_photo", 400, text)
        return error("failed", 502, f"HTTP {status}: {text}")

    # -- operator ----------------------------------------------------------------------------
    def _refused(self, request: web.Request) -> web.Response | None:
        status = check_token(request.headers, self.token)
        if status is None:
            return None
        logger.warning("refused %s %s from %s: %s", request.method, request.path, request.remote,
                       "no token" if status == 401 else "wrong token")
        return error("token_missing" if status == 401 else "token_wrong", status)

    def _manage_error(self, exc: ManageError) -> web.Response:
        if exc.exit_code == EXIT_UNREACHABLE:
            return error("server_down", 503, str(exc))
        if exc.exit_code == EXIT_CHECK_FAILED:
            return error("check_failed", 409, str(exc))
        if exc.exit_code == EXIT_REFUSED:
            return error("refused", 409, str(exc))
        return error("failed", 500 if exc.exit_code == 1 else 400, str(exc))

    async def _operate(self, request: web.Request, function, *args) -> web.Response:
        refused = self._refused(request)
        if refused:
            return refused
        async with self._operations:
            try:
                result = await self.blocking(function, self.client, *args)
            except ManageError as exc:
                return self._manage_error(exc)
            except ValueError as exc:
                return error("bad_request", 400, str(exc))
        logger.info("operator: %s %s -> %s", request.method, request.path, result)
        return web.json_response(result)

    async def _json(self, request: web.Request) -> dict:
        try:
            data = await request.json()
        except ValueError:
            return {}
        return data if isinstance(data, dict) else {}

    async def check_operator(self, request: web.Request) -> web.Response:
        return self._refused(request) or web.json_response({"ok": True})

    async def make_default(self, request: web.Request) -> web.Response:
        data = await self._json(request)
        return await self._operate(request, operations.make_default, _name(request), str(data.get("version", "")))

    async def rollback(self, request: web.Request) -> web.Response:
        data = await self._json(request)
        return await self._operate(request, operations.rollback, _name(request), data.get("to") or None)

    async def retire(self, request: web.Request) -> web.Response:
        data = await self._json(request)
        return await self._operate(request, operations.retire_version, _name(request), str(data.get("version", "")))

    async def scale(self, request: web.Request) -> web.Response:
        data = await self._json(request)
        try:
            workers = int(data.get("workers"))
        except (TypeError, ValueError):
            return self._refused(request) or error("bad_request", 400, "workers must be a whole number")
        return await self._operate(request, operations.scale_version, _name(request), data.get("version") or None,
                                   workers)

    # -- teaching ----------------------------------------------------------------------------
    async def create_job(self, request: web.Request) -> web.Response:
        refused = self._refused(request)
        if refused:
            return refused
        if not request.content_type.startswith("multipart/"):
            return error("bad_request", 400, "send the teaching set as multipart/form-data")
        job_id = self.jobs.new_id()
        folder = self.jobs.folder(job_id)
        try:
            teaching_set = await teaching.receive(await request.multipart(), folder / "data", self.training_backbones)
            await self.blocking(teaching.check_set, teaching_set)
            reserved = [j["version"] for j in self.jobs.all()
                        if j["name"] == teaching_set.name and j["status"] not in ("failed", "interrupted")]
            version = await self.blocking(operations.next_version, self.client, teaching_set.name, reserved)
        except teaching.TeachingSetError as exc:
            teaching.discard(folder)
            return web.json_response({"error": exc.code, "message": str(exc)}, status=exc.status)
        except ManageError as exc:
            teaching.discard(folder)
            return self._manage_error(exc)
        except BaseException:
            teaching.discard(folder)  # a broken upload leaves nothing behind
            raise
        job = self.jobs.create(job_id, teaching_set.name, version, teaching_set.counts, teaching_set.backbone)
        return web.json_response(self.jobs.view(job), status=201)

    async def list_jobs(self, request: web.Request) -> web.Response:
        refused = self._refused(request)
        if refused:
            return refused
        return web.json_response({"jobs": [self.jobs.view(j) for j in reversed(self.jobs.all())]})

    def _job(self, request: web.Request) -> dict:
        try:
            return self.jobs.load(request.match_info["job"])
        except KeyError:
            raise web.HTTPNotFound(text='{"error": "not_found", "message": "no such job"}',
                                   content_type="application/json") from None

    async def get_job(self, request: web.Request) -> web.Response:
        return self._refused(request) or web.json_response(self.jobs.view(self._job(request)))

    async def job_photo(self, request: web.Request) -> web.StreamResponse:
        """A photo of the job's teaching set (the evaluation shows the wrong ones)."""
        refused = self._refused(request)
        if refused:
            return refused
        job = self._job(request)
        data = Path(job["data_dir"]).resolve()
        path = (data / request.query.get("file", "")).resolve()
        if data not in path.parents or not path.is_file():
            return error("not_found", 404)
        return web.FileResponse(path)  # Content-Type from the suffix; nosniff is set on every answer

    async def deploy_job(self, request: web.Request) -> web.Response:
        refused = self._refused(request)
        if refused:
            return refused
        job = self._job(request)
        if job["status"] not in ("trained", "deploy_failed"):
            return error("not_ready", 409, f"the job is {job['status']}")
        self.jobs.update(job["id"], status="deploying", deploy_started=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        async with self._operations:
            try:
                result = await self.blocking(operations.deploy_archive, self.client, Path(job["archive"]))
            except ManageError as exc:
                self.jobs.update(job["id"], status="deploy_failed", deploy_error=str(exc))
                return self._manage_error(exc)
            except BaseException as exc:
                self.jobs.update(job["id"], status="deploy_failed", deploy_error=f"{exc.__class__.__name__}: {exc}")
                raise
        self.jobs.update(job["id"], status="deployed", deployed=result)
        return web.json_response(self.jobs.view(self.jobs.load(job["id"])))


def _name(request: web.Request) -> str:
    return request.match_info["name"]


def default_training_backbones(served: str) -> list[str]:
    """The served model's backbone (fast: the default), then the accurate one unless it is served."""
    return list(dict.fromkeys([served, ACCURATE_BACKBONE]))


def backbone_role(name: str, served: str) -> str:
    """How the page presents a training backbone: ``accurate`` (ACCURATE_BACKBONE, even when it is the
    served one: it is never the fast choice), ``fast`` (the served model's), else ``other`` (its name
    alone: the page claims nothing about a backbone it has no figures for)."""
    if name == ACCURATE_BACKBONE:
        return "accurate"
    return "fast" if name == served else "other"


def training_choice(name: str, served: str) -> dict:
    """One entry of /api/status ``training_backbones``: its name, its role, and what it costs where
    that was measured (the page's hint quotes it)."""
    role = backbone_role(name, served)
    return {"name": name, "role": role, **({"cost": ACCURATE_COST} if role == "accurate" else {})}


def registered_backbones(text: str) -> list[str]:
    """argparse type: comma-separated names of registered backbones (handlers/backbones.py), each once."""
    names = list(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))
    if not names:
        raise argparse.ArgumentTypeError("name at least one registered backbone")
    for name in names:
        try:
            get_backbone(name)
        except ValueError as exc:  # its message lists the registered ones
            raise argparse.ArgumentTypeError(str(exc)) from None
    return names


@web.middleware
async def security_headers(request: web.Request, handler):
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        response = exc
    # Everything is served from here: no CDN, no inline script, no framing by other sites.
    response.headers.setdefault("Content-Security-Policy",
                                "default-src 'self'; img-src 'self' blob: data:; style-src 'self'; "
                                "script-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'")
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("Referrer-Policy", "no-referrer")
    if isinstance(response, web.HTTPException) and response.status >= 400:
        raise response
    return response


def build_app(args: argparse.Namespace) -> web.Application:
    page = Page(args)
    # client_max_size bounds bodies read whole (JSON); uploads are streamed under their own limits.
    app = web.Application(client_max_size=1024 * 1024, middlewares=[security_headers])
    app["page"] = page
    app.on_startup.append(page.on_startup)
    app.on_cleanup.append(page.on_cleanup)
    app.router.add_get("/", page.index)
    app.router.add_static("/static/", STATIC_DIR, append_version=False)
    app.router.add_get("/api/status", page.status)
    app.router.add_get("/api/modes", page.modes)
    app.router.add_post("/api/recognise", page.recognise)
    app.router.add_put("/api/recognise", page.recognise)  # curl -T, as TorchServe's own API
    app.router.add_post("/api/operator", page.check_operator)
    app.router.add_post("/api/modes/{name}/default", page.make_default)
    app.router.add_post("/api/modes/{name}/rollback", page.rollback)
    app.router.add_post("/api/modes/{name}/retire", page.retire)
    app.router.add_post("/api/modes/{name}/scale", page.scale)
    app.router.add_get("/api/jobs", page.list_jobs)
    app.router.add_post("/api/jobs", page.create_job)
    app.router.add_get("/api/jobs/{job}", page.get_job)
    app.router.add_get("/api/jobs/{job}/photo", page.job_photo)
    app.router.add_post("/api/jobs/{job}/deploy", page.deploy_job)
    return app


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", type=str, default="127.0.0.1", help="address to listen on (loopback by default)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="port of the page")
    parser.add_argument("--inference", type=str, default=DEFAULT_INFERENCE_URL, help="TorchServe inference API URL")
    parser.add_argument("--management", type=str, default=DEFAULT_MANAGEMENT_URL, help="TorchServe management API URL")
    parser.add_argument("--key-file", type=Path, default=DEFAULT_KEY_FILE, help="TorchServe's key_file.json")
    parser.add_argument("--model-store", type=Path, default=DEFAULT_MODEL_STORE, help="TorchServe's model store")
    parser.add_argument("--runtime-dir", type=Path, default=DEFAULT_RUNTIME_DIR,
                        help="the page's own state: operator token, training jobs")
    parser.add_argument("--backbone", type=str, default="efficientnet_lite0", choices=backbone_names(),
                        help="the served ImageNet model's backbone: new modes are trained on it by default")
    parser.add_argument("--training-backbones", type=registered_backbones, default=None, metavar="NAMES",
                        help="comma-separated registered backbones a new mode may be trained on, the first the "
                        f"default (default: --backbone, then {ACCURATE_BACKBONE} unless it is --backbone)")
    parser.add_argument("--notice", type=str, default="", help="a message the page shows on top (e.g. why a "
                        "fallback backbone is served)")
    return parser


def main(args: argparse.Namespace) -> int:
    args.runtime_dir = args.runtime_dir.resolve()
    app = build_app(args)
    page = app["page"]
    logger.info("page at http://%s:%d/ (TorchServe inference %s, management %s)", args.host, args.port,
                args.inference, args.management)
    logger.info("operator token (for training, deploying, rolling back, retiring, scaling): %s  (kept in %s)",
                page.token, page.token_file)
    logger.info("new modes are trained on %s (the default) or on %s", page.training_backbones[0],
                ", ".join(page.training_backbones[1:]) or "nothing else")
    if args.notice:
        logger.warning("%s", args.notice)
    web.run_app(app, host=args.host, port=args.port, print=None, access_log=None, handle_signals=True)
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        sys.exit(main(get_args_parser().parse_args()))
    except ValueError as exc:
        logger.error("%s", exc)
        sys.exit(2)
