"""Head archives for the lifecycle tests (test_manage*, test_lifecycle*, test_security*).

Built directly from the library (no training CLI): EfficientNet-Lite0 features of a few
hymenoptera train photos, a prototype head, ``build_archive`` with packed check images. Version 1
and version 2 are fitted on different photos, so they are genuinely different models of the same
classes. Features and archives are computed once per test session (module-level cache).
"""

from __future__ import annotations

from pathlib import Path

import torch

from handlers.archive import build_archive
from handlers.backbones import get_backbone
from handlers.heads import build_head
from handlers.imaging import ImagePreprocessor

NAME = "bees_vs_ants"
CLASSES = ["ants", "bees"]
SHOTS = 8  # per class and version
CHECKS_PER_CLASS = 3

_cache: dict[str, object] = {}


def _photos(datasets_dir: Path, split: str, cls: str) -> list[Path]:
    return sorted((datasets_dir / "hymenoptera" / split / cls).iterdir())


def _features(datasets_dir: Path, paths: list[Path]) -> torch.Tensor:
    backbone = get_backbone("efficientnet_lite0")
    if "network" not in _cache:
        _cache["network"] = backbone.load(backbone.resolve_weights()).eval()
    preprocess = ImagePreprocessor(backbone.preprocessing)
    with torch.inference_mode():
        return _cache["network"].features(torch.stack([preprocess(p.read_bytes()) for p in paths]))


def head_archives(datasets_dir: Path, out_dir: Path) -> dict[str, Path]:
    """{"1": path, "2": path}: bees_vs_ants v1 (train photos 0..7 per class) and v2 (photos 8..15)."""
    if "archives" in _cache:
        return _cache["archives"]
    backbone = get_backbone("efficientnet_lite0")
    checks = [(path, cls) for cls in CLASSES for path in _photos(datasets_dir, "val", cls)[:CHECKS_PER_CLASS]]
    archives = {}
    for index, version in enumerate(("1", "2")):
        paths, labels = [], []
        for label, cls in enumerate(CLASSES):
            chosen = _photos(datasets_dir, "train", cls)[index * SHOTS:(index + 1) * SHOTS]
            paths += chosen
            labels += [label] * len(chosen)
        head = build_head("prototype", backbone.feature_dim, len(CLASSES))
        head.fit(_features(datasets_dir, paths), torch.tensor(labels))
        archives[version] = build_archive(
            name=NAME, version=version, backbone_name=backbone.name, weights_path=backbone.resolve_weights(),
            labels=CLASSES, out_dir=out_dir, head=head, check_images=checks,
            info={"training": {"shots": SHOTS, "photos": [p.name for p in paths]}},
        )
    _cache["archives"] = archives
    return archives


def val_photos(datasets_dir: Path, per_class: int = 12, max_bytes: int = 200_000) -> list[bytes]:
    """Real photos for load clients (bytes in memory): the typical web-sized ones, not the 2592 px
    outliers, so the 2-core machine spends the run on serving rather than on decoding."""
    photos = [p for cls in CLASSES for p in _photos(datasets_dir, "val", cls)[:3 * per_class]]
    return [p.read_bytes() for p in photos if p.stat().st_size <= max_bytes][:2 * per_class]


class LoadClients:
    """N threads sending photos to /predictions/NAME until stopped; every answer is recorded.

    A record is (start time, latency s, HTTP status or -1 for a connection error, X-Model-Version),
    plus the start of the body for a failed request.
    Bounded: each thread stops after ``max_seconds`` even if nobody calls stop().
    """

    def __init__(self, server, name: str, photos: list[bytes], clients: int = 8, max_seconds: float = 600.0,
                 timeout: float = 60.0):
        import threading

        self.server, self.name, self.photos = server, name, photos
        self.records: list[tuple[float, float, int, str | None]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._deadline_s = max_seconds
        self._timeout = timeout
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(clients)]

    def _run(self, index: int) -> None:
        import time

        import requests

        session = requests.Session()
        deadline = time.monotonic() + self._deadline_s
        i = index
        while not self._stop.is_set() and time.monotonic() < deadline:
            start = time.monotonic()
            try:
                response = self.server.predict(self.name, self.photos[i % len(self.photos)], session=session,
                                               timeout=self._timeout)
                record = (start, time.monotonic() - start, response.status_code,
                          response.headers.get("X-Model-Version"))
                if response.status_code != 200:
                    record += (response.text[:300],)  # why, for the failure message
            except requests.RequestException:
                record = (start, time.monotonic() - start, -1, None, "connection error")
            with self._lock:
                self.records.append(record)
            i += len(self._threads)

    def __enter__(self) -> "LoadClients":
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(self._timeout + 5)

    def snapshot(self) -> list:
        with self._lock:
            return list(self.records)


def summarise(records: list) -> dict:
    """Request count, failures (status != 200), p50/p99 latency in ms, versions seen."""
    latencies = sorted(r[1] for r in records)

    def pct(q: float) -> float:
        return round(1000 * latencies[min(len(latencies) - 1, int(q * len(latencies)))], 1) if latencies else 0.0

    failures = [r for r in records if r[2] != 200]
    return {
        "requests": len(records),
        "failures": len(failures),
        "failure_statuses": sorted({r[2] for r in failures}),
        "p50_ms": pct(0.50),
        "p99_ms": pct(0.99),
        "versions": sorted({r[3] for r in records if r[3]}),
    }
