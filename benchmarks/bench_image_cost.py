"""What one image costs a worker's preprocessing (decode, resize, crop): time and peak memory.

    .venv/bin/python -m benchmarks.bench_image_cost   # makes the images, measures in .venv-serve

Each case runs in a fresh process of the serving environment (what a worker runs) on the image's
bytes: the time is the best of 3 runs, the memory the peak RSS during them over the RSS before
(Linux: the peak is reset through /proc/self/clear_refs).
Cases: a normal photo, thin images at and beyond the aspect-ratio limit (handlers/constants.py
MAX_ASPECT_RATIO), and the largest accepted images (MAX_IMAGE_PIXELS) as PNG and JPEG.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import subprocess
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from imagerec.cli import EXIT_FAILED, run_cli
from imagerec.paths import PROJECT_ROOT
from imagerec.torchserve import serving_python

logger = logging.getLogger("bench_image_cost")

MEASURE = r"""
import json, sys, time
from pathlib import Path
from handlers.backbones import get_backbone
from handlers.imaging import ImageError, ImagePreprocessor

def rss_kb(field):
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(field))

data = Path(sys.argv[1]).read_bytes()
preprocessor = ImagePreprocessor(get_backbone("efficientnet_lite0").preprocessing)
base = rss_kb("VmRSS:")
Path("/proc/self/clear_refs").write_text("5")  # Linux: the peak (VmHWM) starts again from now
best, outcome = None, None
for _ in range(3):
    start = time.perf_counter()
    try:
        preprocessor.geometry(data)
        outcome = "accepted"
    except ImageError as error:
        outcome = f"refused {error.status}"
    elapsed = time.perf_counter() - start
    best = elapsed if best is None else min(best, elapsed)
grown = rss_kb("VmHWM:") - base
print(json.dumps({"outcome": outcome, "ms": round(best * 1e3, 1), "peak_mb": round(grown / 1024, 1)}))
"""


def make_image(width: int, height: int, fmt: str) -> bytes:
    """Smooth content (a gradient plus mild noise) that compresses like a photo, not like noise."""
    rng = np.random.default_rng(0)
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :, None]
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None, None]
    pixels = np.clip((x + y) / 2 + 8 * rng.standard_normal((height, width, 3), dtype=np.float32), 0, 255)
    buffer = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buffer, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buffer.getvalue()

CASES = [
    (640, 480, "JPEG"),      # a small photo
    (4000, 3000, "JPEG"),    # a 12 MP phone photo (decoded at reduced scale)
    (4000, 3000, "PNG"),     # the same as PNG (no reduced-scale decoding)
    (1, 20000, "PNG"),       # thin: refused
    (1414, 1414, "PNG"),     # 2 MP square ...
    (250, 8000, "PNG"),      # ... and 2 MP at 32:1, the aspect limit: accepted
    (249, 8000, "PNG"),      # just over 32:1: refused
    (1400, 44800, "PNG"),    # 32:1 and 62.7 MP: the most pixels at the widest accepted ratio
    (8000, 8000, "PNG"),     # 64 MP square, the megapixel limit
    (8000, 8000, "JPEG"),
]


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--python", type=Path, default=serving_python(),
                        help="interpreter of the serving environment (what workers run)")
    parser.add_argument("--max-megapixels", type=float, default=100.0,
                        help="skip the cases larger than this (the 64 MP ones take minutes to make on 2 cores)")
    return parser


def main(args: argparse.Namespace) -> list[dict]:
    rows = []
    for width, height, fmt in CASES:
        if width * height > args.max_megapixels * 1e6:
            continue
        with tempfile.NamedTemporaryFile(suffix=f".{fmt.lower()}") as image:
            data = make_image(width, height, fmt)
            image.write(data)
            image.flush()
            result = subprocess.run([str(args.python), "-c", MEASURE, image.name], capture_output=True, text=True,
                                    timeout=600, cwd=PROJECT_ROOT, env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)})
        if result.returncode != 0:
            raise RuntimeError(f"{width}x{height} {fmt}: {result.stderr[-2000:]}")
        row = {"image": f"{width}x{height} {fmt}", "bytes": len(data), **json.loads(result.stdout.strip().splitlines()[-1])}
        logger.info("%-18s %9d bytes  %-12s %7.1f ms  %6.1f MB", row["image"], row["bytes"], row["outcome"],
                    row["ms"], row["peak_mb"])
        rows.append(row)
    return rows


if __name__ == "__main__":
    run_cli(main, get_args_parser(), {RuntimeError: EXIT_FAILED}, logger=logger, output=json.dumps)
