"""Machine-readable training progress: one JSON object per line, appended as training moves on.

``train_head.py --progress-file PATH`` writes it; the web page's job runner (web/jobs.py) reads it.
Each line has ``stage`` (``data``, ``features``, ``fit``, ``evaluate``, ``archive``, ``done``) and,
for ``features``, ``done`` and ``total`` counted in backbone views (cached views count as done)::

    {"stage": "features", "done": 64, "total": 120, "time": 1764323000.1}

Lines are written whole and flushed, so a reader never sees half of one (it skips a torn last line).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

STAGES = ("data", "features", "fit", "evaluate", "archive", "done")
# Feature lines are rate-limited: a line per batch is plenty for a progress bar, not one per image.
MIN_INTERVAL_S = 0.2


class ProgressWriter:
    """Appends progress lines to ``path``; every method is a no-op when ``path`` is None."""

    def __init__(self, path: str | Path | None):
        self.path = Path(path) if path else None
        self.done = 0
        self.total = 0
        self._last_write = 0.0

    def _write(self, record: dict) -> None:
        if self.path is None:
            return
        record["time"] = round(time.time(), 3)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
        self._last_write = time.monotonic()

    def stage(self, name: str, **details) -> None:
        if name not in STAGES:
            raise ValueError(f"unknown progress stage {name!r}")
        self._write({"stage": name, **details})

    def start_features(self, total: int) -> None:
        self.done, self.total = 0, total
        self.stage("features", done=0, total=total)

    def advance(self, views: int) -> None:
        """``views`` more backbone views finished (passed to FeatureExtractor.on_progress)."""
        self.done = min(self.total, self.done + views)
        if self.done == self.total or time.monotonic() - self._last_write >= MIN_INTERVAL_S:
            self.stage("features", done=self.done, total=self.total)


def read_progress(path: str | Path) -> list[dict]:
    """Every complete line of a progress file ([] if it does not exist yet)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    records = []
    for line in text.splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue  # a line still being written
    return records
