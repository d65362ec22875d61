"""The one load generator and the one percentile of every benchmark and load test.

``LoadClients`` runs N closed-loop clients, each on its own keep-alive connection, sending real
photos to one URL path until stopped (and never longer than ``max_seconds`` or ``max_requests``);
every answer is recorded. ``percentile`` is the nearest-rank percentile: the p99 of every figure in
docs/BENCHMARKS.md is the same statistic.
"""

from __future__ import annotations

import argparse
import http.client
import math
import threading
import time
from collections.abc import Callable
from typing import NamedTuple
from urllib.parse import urlsplit

CONNECTION_ERROR = -1  # the status recorded when no HTTP answer came


class Record(NamedTuple):
    """One request: when it was sent (time.monotonic), how long it took, its HTTP status
    (CONNECTION_ERROR if none), the X-Model-Version that answered, and the start of a failure's body."""

    sent: float
    latency: float
    status: int
    version: str | None
    detail: str = ""


def add_load_test_arguments(parser: argparse.ArgumentParser, max_requests: int) -> None:
    """The flags of a load test (benchmarks/bench_serving.py ``load_test`` reads them), for every
    benchmark that runs one."""
    parser.add_argument("--duration", type=float, default=8.0, help="measured seconds per client count")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds before each measurement")
    parser.add_argument("--max-requests", type=int, default=max_requests,
                        help="upper bound on requests per client count (the loop is also bounded by time)")
    parser.add_argument("--request-timeout", type=float, default=30.0, help="seconds per HTTP request")


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100) of ``values``; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def summarise(records: list[Record]) -> dict:
    """Request count, failures (status != 200), p50/p99 latency in ms, versions seen."""
    latencies = [r.latency * 1e3 for r in records]
    failures = [r for r in records if r.status != 200]
    return {
        "requests": len(records),
        "failures": len(failures),
        "failure_statuses": sorted({r.status for r in failures}),
        "p50_ms": round(percentile(latencies, 50) or 0.0, 1),
        "p99_ms": round(percentile(latencies, 99) or 0.0, 1),
        "versions": sorted({r.version for r in records if r.version}),
    }


class LoadClients:
    """``clients`` threads sending ``photos`` to ``base_url + path`` until stopped: raw bodies by
    ``method`` (PUT, as ``curl -T``), or whatever ``encode(photo) -> (body, headers)`` makes of each
    (a multipart form, say; prepared once, before the clients start).

    Use as a context manager (``with LoadClients(...) as load: ...``); ``records`` holds every
    answer. Bounded: each thread stops after ``max_seconds`` or once ``max_requests`` were sent in
    all, even if nobody stops it.
    """

    def __init__(self, base_url: str, path: str, photos: list[bytes], *, headers: dict[str, str] | None = None,
                 clients: int = 8, max_seconds: float = 600.0, max_requests: int = 1_000_000,
                 timeout: float = 60.0, method: str = "PUT",
                 encode: Callable[[bytes], tuple[bytes, dict[str, str]]] | None = None):
        if not photos:
            raise ValueError("LoadClients needs at least one photo")
        url = urlsplit(base_url)
        self.host, self.port = url.hostname, url.port
        self.path, self.method = path, method
        base_headers = {"Content-Type": "application/octet-stream", **(headers or {})}
        self.bodies = [(photo, base_headers) if encode is None else _with_headers(encode(photo), headers)
                       for photo in photos]
        self.records: list[Record] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._budget = max_requests
        self._max_seconds = max_seconds
        self._timeout = timeout
        self._threads = [threading.Thread(target=self._run, args=(i, clients), daemon=True) for i in range(clients)]

    @classmethod
    def for_model(cls, server, model: str, photos: list[bytes], **options) -> "LoadClients":
        """Clients of ``/predictions/MODEL`` on a running ``imagerec.torchserve.TorchServe``."""
        from imagerec.torchserve import auth_header

        return cls(server.inference_url, f"/predictions/{model}", photos,
                   headers=auth_header(server.keys["inference"]), **options)

    def _take_one(self) -> bool:
        with self._lock:
            if self._budget <= 0:
                return False
            self._budget -= 1
            return True

    def _run(self, index: int, clients: int) -> None:
        connection = http.client.HTTPConnection(self.host, self.port, timeout=self._timeout)
        deadline = time.monotonic() + self._max_seconds
        position = index * len(self.bodies) // clients
        try:
            while not self._stop.is_set() and time.monotonic() < deadline and self._take_one():
                body, headers = self.bodies[position % len(self.bodies)]
                position += 1
                sent = time.monotonic()
                try:
                    connection.request(self.method, self.path, body=body, headers=headers)
                    response = connection.getresponse()
                    body = response.read()
                    record = Record(sent, time.monotonic() - sent, response.status,
                                    response.getheader("X-Model-Version"),
                                    "" if response.status == 200 else body[:300].decode(errors="replace"))
                except (OSError, http.client.HTTPException) as error:
                    record = Record(sent, time.monotonic() - sent, CONNECTION_ERROR, None, type(error).__name__)
                    connection.close()
                    connection = http.client.HTTPConnection(self.host, self.port, timeout=self._timeout)
                with self._lock:
                    self.records.append(record)
        finally:
            connection.close()

    def __enter__(self) -> "LoadClients":
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(self._timeout + 5)

    def __exit__(self, *exc) -> None:
        self.stop()

    def snapshot(self) -> list[Record]:
        with self._lock:
            return list(self.records)


def _with_headers(encoded: tuple[bytes, dict[str, str]], headers: dict[str, str] | None) -> tuple[bytes, dict]:
    body, own = encoded
    return body, {**(headers or {}), **own}
