"""The admission front: a small reverse proxy before TorchServe's inference API that bounds how many
request bytes are in flight, and refuses the rest at once with 503 and a Retry-After header.

Why it exists (docs/bench/uploads.md has the measurements): TorchServe 0.12's Java frontend buffers
every request body whole in Netty direct memory before it looks at it, with no limit on how many at
once. Sixteen concurrent 20 MB photos exhausted its memory: some uploads got 507 "Cannot reserve
16777216 bytes of direct buffer memory" (or "Java heap space"), and a batch the frontend wrote to the
worker meanwhile never arrived: TorchServe waited its responseTimeout (120 s), then killed the
worker ("Worker died", 500; the model stalled meanwhile).
No TorchServe setting limits bodies in flight, and TorchServe never sends Retry-After. Here every
request is admitted only while the bytes admitted and not yet answered stay within a budget, so
TorchServe never holds more than that; a refused body is read and thrown away in small chunks (never
held), then answered 503 with Retry-After. A small reserve of the budget is kept for small requests,
so a storm of large photos does not refuse a small one.

Everything else passes through unchanged: paths, query, Authorization and other headers, TorchServe's
status, body and headers (X-Model-Version). A 503 from TorchServe itself (its job queue full) also
gets a Retry-After.

Stopping (``DRAIN_SIGNAL``, sent by ``TorchServe.refuse_new_requests``): from then on every new
request is answered 503 + Retry-After + ``Connection: close`` (a client retries, or goes to another
replica), while the requests already admitted go on to TorchServe and are answered. ``STATUS_PATH``
tells how many are still in flight: TorchServe's stop waits for zero.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import re
import signal
from dataclasses import dataclass

import aiohttp
from aiohttp import web

from imagerec.cli import EXIT_BAD_ARGUMENTS, run_cli

logger = logging.getLogger(__name__)

MIB = 1024 * 1024
# Headers that describe one connection, not the message (RFC 9110 section 7.6.1), plus the ones
# the proxy handles itself: Expect (curl sends "100-continue" before large bodies; the front
# answers it, and the body it forwards is already there) and the recomputed ones.
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
    "transfer-encoding", "upgrade", "host", "content-length", "expect",
})
DRAIN_CHUNK = 256 * 1024
# Paths whose body is an image for the model (TorchServe's inference API).
IMAGE_PATHS = ("/predictions/", "/explanations/")
FORM_URLENCODED = "application/x-www-form-urlencoded"
DRAIN_SIGNAL = signal.SIGUSR1  # stop admitting requests; answer the admitted ones
# The front's own state (JSON: requests in flight, draining); TorchServe has no path like it.
STATUS_PATH = "/front/status"
_PART_NAME = re.compile(rb'(?im)^content-disposition:[^\r\n]*?[;\s]name="([^"]*)"')


def multipart_part_names(body: bytes, boundary: str) -> list[str]:
    """The name of every part of a multipart/form-data body, in order (headers only, no copies of
    the parts' contents)."""
    delimiter = b"--" + boundary.encode("latin-1")
    names = []
    position = body.find(delimiter)
    while position >= 0:
        start = position + len(delimiter)
        if body.startswith(b"--", start):  # the closing delimiter
            break
        head_end = body.find(b"\r\n\r\n", start, start + 16384)
        match = _PART_NAME.search(body, start, head_end if head_end >= 0 else start)
        names.append(match.group(1).decode("utf-8", "replace") if match else "")
        position = body.find(delimiter, head_end if head_end >= 0 else start)
    return names


def _duplicate_parts(names: list[str]) -> list[str]:
    return sorted({name for name in names if names.count(name) > 1})


@dataclass(frozen=True)
class FrontLimits:
    """What the front admits. Defaults: measured in docs/bench/uploads.md."""

    # Request bytes admitted and not yet answered, in all: 4 documented-maximum photos (21 MiB,
    # max_request_size, each) plus the small reserve. TorchServe's frontend holds each admitted body
    # in direct memory up to about twice over (Netty's aggregator consolidates a body's pieces into a
    # copy; the batch sent to the worker is written into a buffer that grows by doubling), so this
    # budget needs about 2 x 92 MiB of the -XX:MaxDirectMemorySize=256m in config.properties.
    inflight_bytes: int = 4 * 21 * MIB + 8 * MIB
    # The last part of the budget only requests up to small_bytes may use: a phone-sized
    # thumbnail or a normal photo still gets through while large uploads fill the rest.
    small_reserve_bytes: int = 8 * MIB
    small_bytes: int = 2 * MIB
    # The largest body (config.properties max_request_size): larger is refused with 413.
    max_body_bytes: int = 22020096
    retry_after_s: int = 2
    # Longer than a model's responseTimeout (handlers/archive.py BatchingConfig, 120 s): TorchServe
    # answers first.
    upstream_timeout_s: float = 180.0


class AdmissionFront:
    """aiohttp application state: the budget and the upstream session."""

    def __init__(self, upstream: str, limits: FrontLimits = FrontLimits()):
        self.upstream = upstream.rstrip("/")
        self.limits = limits
        self.inflight = 0  # bytes admitted and not yet answered
        self.inflight_requests = 0
        self.draining = False
        self.session: aiohttp.ClientSession | None = None

    def start_draining(self) -> None:
        if not self.draining:
            logger.info("draining: refusing new requests; %d in flight", self.inflight_requests)
        self.draining = True

    async def status(self, request: web.Request) -> web.Response:
        return web.json_response({"inflight_requests": self.inflight_requests, "draining": self.draining})

    def _cost(self, request: web.Request) -> int:
        # A body of unknown length (chunked) may be as large as the limit allows.
        return request.content_length if request.content_length is not None else self.limits.max_body_bytes

    def _admit(self, cost: int) -> bool:
        limit = self.limits.inflight_bytes
        if cost > self.limits.small_bytes:
            limit -= self.limits.small_reserve_bytes
        if self.inflight + cost > limit:
            return False
        self.inflight += cost
        return True

    def _error(self, status: int, message: str, retry: bool = False) -> web.Response:
        headers = {"Retry-After": str(self.limits.retry_after_s)} if retry else {}
        body = {"code": status, "type": "ServiceUnavailable" if status == 503 else "RequestRefused", "message": message}
        return web.json_response(body, status=status, headers=headers)

    async def _drain(self, request: web.Request) -> None:
        """Read the body and throw it away, so the client gets to read our answer (closing while it is
        still sending makes most clients report a connection error instead)."""
        try:
            while await request.content.read(DRAIN_CHUNK):
                pass
        except (aiohttp.ClientError, ConnectionError, asyncio.CancelledError):
            raise
        except Exception:  # a malformed body: the answer is the same
            pass

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if self.draining:
            await self._drain(request)
            response = self._error(503, "server is shutting down; retry after the Retry-After seconds", retry=True)
            response.force_close()  # Connection: close, so a keep-alive client reconnects (elsewhere)
            return response
        cost = self._cost(request)
        if request.content_length is not None and request.content_length > self.limits.max_body_bytes:
            await self._drain(request)
            return self._error(413, f"request body of {request.content_length} bytes exceeds the limit of "
                                    f"{self.limits.max_body_bytes} bytes")
        if request.path.startswith(IMAGE_PATHS) and request.content_type == FORM_URLENCODED:
            # What curl --data-binary sends without -H Content-Type: TorchServe would parse the image as
            # form fields and answer 500 with the body's bytes in its message.
            await self._drain(request)
            return self._error(415, f"Content-Type {FORM_URLENCODED} (curl --data-binary without a Content-Type) "
                                    "cannot carry an image: send it with -H 'Content-Type: image/jpeg', as "
                                    "curl -T photo.jpg, or as curl -F data=@photo.jpg")
        if not self._admit(cost):
            await self._drain(request)
            logger.info("refused %s %s (%d bytes): %d bytes in flight", request.method, request.path, cost,
                        self.inflight)
            return self._error(503, "server busy with other uploads; retry after the Retry-After seconds",
                               retry=True)
        self.inflight_requests += 1
        try:
            return await self._forward(request)
        finally:
            self.inflight -= cost
            self.inflight_requests -= 1

    async def _forward(self, request: web.Request) -> web.Response:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        body = None
        if request.path.startswith(IMAGE_PATHS) and request.content_type == "multipart/form-data":
            # TorchServe gives the handler one value per part name: a second part of the same name
            # silently replaces the first. Bounded by max_body_bytes and counted in the budget.
            try:
                body = await request.read()
            except web.HTTPRequestEntityTooLarge:
                return self._error(413, f"request body exceeds the limit of {self.limits.max_body_bytes} bytes")
            duplicates = _duplicate_parts(multipart_part_names(body, _boundary(request)))
            if duplicates:
                return self._error(400, f"multipart request with more than one part named "
                                        f"{', '.join(repr(n) for n in duplicates)}: send one image per request "
                                        "(curl -F data=@photo.jpg)")
        elif request.body_exists:
            # Streamed through, never held whole here: the budget is what TorchServe holds.
            body = request.content
            if request.content_length is not None:
                headers["Content-Length"] = str(request.content_length)
        try:
            async with self.session.request(
                request.method, self.upstream + request.path_qs, headers=headers, data=body, allow_redirects=False,
            ) as upstream:
                payload = await upstream.read()
                response_headers = {k: v for k, v in upstream.headers.items() if k.lower() not in HOP_BY_HOP}
                if upstream.status == 503 and "Retry-After" not in upstream.headers:
                    response_headers["Retry-After"] = str(self.limits.retry_after_s)
                return web.Response(status=upstream.status, reason=upstream.reason, body=payload,
                                    headers=response_headers)
        except (aiohttp.ClientConnectionError, asyncio.TimeoutError) as error:
            logger.warning("upstream %s failed for %s: %r", self.upstream, request.path, error)
            return self._error(503, "model server not reachable; retry after the Retry-After seconds", retry=True)

    async def on_startup(self, app: web.Application) -> None:
        timeout = aiohttp.ClientTimeout(total=self.limits.upstream_timeout_s)
        self.session = aiohttp.ClientSession(timeout=timeout, auto_decompress=False)
        asyncio.get_running_loop().add_signal_handler(DRAIN_SIGNAL, self.start_draining)

    async def on_cleanup(self, app: web.Application) -> None:
        await self.session.close()


def _boundary(request: web.Request) -> str:
    for parameter in request.headers.get("Content-Type", "").split(";")[1:]:
        key, _, value = parameter.strip().partition("=")
        if key.lower() == "boundary":
            return value.strip('"')
    return ""


def build_app(upstream: str, limits: FrontLimits = FrontLimits()) -> web.Application:
    front = AdmissionFront(upstream, limits)
    app = web.Application(client_max_size=limits.max_body_bytes)
    app.router.add_get(STATUS_PATH, front.status)
    app.router.add_route("*", "/{tail:.*}", front.handle)
    app.on_startup.append(front.on_startup)
    app.on_cleanup.append(front.on_cleanup)
    app["front"] = front
    return app


def serve(host: str, port: int, upstream: str, limits: FrontLimits = FrontLimits()) -> None:
    """Run the front until SIGINT/SIGTERM."""
    logger.info("admission front on http://%s:%d -> %s (%d MiB in flight)", host, port, upstream,
                limits.inflight_bytes // MIB)
    web.run_app(build_app(upstream, limits), host=host, port=port, print=None, access_log=None,
                handle_signals=True)


RUN_HELP = """Run the admission front before a TorchServe inference API.

    python scripts/front.py --listen 127.0.0.1:8080 --upstream http://127.0.0.1:8090

scripts/serve.py (through TorchServe(front=True), which runs this module as ``python -m
imagerec.front``) starts it; run it by hand only to put it before a TorchServe started otherwise.
Exit codes: 0 stopped by a signal, 2 bad arguments.
"""


def get_args_parser() -> argparse.ArgumentParser:
    defaults = FrontLimits()
    parser = argparse.ArgumentParser(description=RUN_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--listen", type=str, default="127.0.0.1:8080", help="HOST:PORT the front listens on")
    parser.add_argument("--upstream", type=str, required=True, help="TorchServe's inference URL")
    parser.add_argument("--inflight-mib", type=int, default=defaults.inflight_bytes // MIB,
                        help="request bytes in flight, in all (MiB); more is refused with 503 + Retry-After")
    parser.add_argument("--max-body", type=int, default=defaults.max_body_bytes,
                        help="largest request body in bytes (config.properties max_request_size)")
    parser.add_argument("--retry-after", type=int, default=defaults.retry_after_s,
                        help="seconds in the Retry-After header of a 503")
    return parser


def main(args: argparse.Namespace) -> int:
    host, _, port = args.listen.rpartition(":")
    if not host or not port.isdigit() or args.inflight_mib < 1 or args.max_body < 1 or args.retry_after < 0:
        raise ValueError("bad arguments: --listen HOST:PORT, positive --inflight-mib and --max-body")
    limits = FrontLimits(inflight_bytes=args.inflight_mib * MIB, max_body_bytes=args.max_body,
                         retry_after_s=args.retry_after)
    serve(host, int(port), args.upstream, limits)
    return 0


def cli() -> None:
    """The front's command line (scripts/front.py and ``python -m imagerec.front``)."""
    run_cli(main, get_args_parser(), {ValueError: EXIT_BAD_ARGUMENTS}, logger=logger)


if __name__ == "__main__":
    # The library starts the front as a module (imagerec/torchserve.py): a library running an entry
    # point by its path would make imports point backwards. Run from the module imported under its
    # own name, so that log lines say "imagerec.front", not "__main__".
    from imagerec.front import cli as front_cli

    front_cli()
