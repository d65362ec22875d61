"""What one image costs a worker's preprocessing (decode, resize, crop): time and peak memory.

    .venv-serve/bin/python benchmarks/bench_image_cost.py

Each case runs in a fresh process of the serving environment (what a worker runs): the figure is the
best of 3 runs, and the memory is the growth of the process's peak RSS over its peak after importing.
Cases: a normal photo, thin images at and beyond the aspect-ratio limit (handlers/constants.py
MAX_ASPECT_RATIO), and the largest accepted images (MAX_IMAGE_PIXELS) as PNG and JPEG.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]

logger = logging.getLogger("bench_image_cost")

MEASURE = r"""
import io, json, resource, sys, time
import numpy as np
from PIL import Image
from handlers.backbones import get_backbone
from handlers.imaging import ImageError, ImagePreprocessor

width, height, fmt = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
rng = np.random.default_rng(0)
# Smooth content (a gradient plus mild noise) compresses like a photo, not like noise.
x = np.linspace(0, 255, width, dtype=np.float32)[None, :, None]
y = np.linspace(0, 255, height, dtype=np.float32)[:, None, None]
pixels = np.clip((x + y) / 2 + 8 * rng.standard_normal((height, width, 3), dtype=np.float32), 0, 255).astype(np.uint8)
buffer = io.BytesIO()
Image.fromarray(pixels).save(buffer, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
data = buffer.getvalue()
del pixels, buffer
preprocessor = ImagePreprocessor(get_backbone("efficientnet_lite0").preprocessing)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
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
grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base
print(json.dumps({"bytes": len(data), "outcome": outcome, "ms": round(best * 1e3, 1), "peak_mb": round(grown / 1024, 1)}))
"""

CASES = [
    (640, 480, "JPEG"),      # a small photo
    (4000, 3000, "JPEG"),    # a 12 MP phone photo (decoded at reduced scale)
    (4000, 3000, "PNG"),     # the same as PNG (no reduced-scale decoding)
    (1, 20000, "PNG"),       # thin: refused
    (250, 8000, "PNG"),      # 32:1, at the limit: accepted
    (249, 8000, "PNG"),      # just over 32:1: refused
    (1400, 44800, "PNG"),    # 32:1 and 62.7 MP: the most pixels at the widest accepted ratio
    (8000, 8000, "PNG"),     # 64 MP square, the megapixel limit
    (8000, 8000, "JPEG"),
]


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--python", type=Path, default=PROJECT_ROOT / ".venv-serve" / "bin" / "python",
                        help="interpreter of the serving environment (what workers run)")
    return parser


def main(args: argparse.Namespace) -> list[dict]:
    rows = []
    for width, height, fmt in CASES:
        result = subprocess.run([str(args.python), "-c", MEASURE, str(width), str(height), fmt], capture_output=True,
                                text=True, timeout=600, cwd=PROJECT_ROOT)
        if result.returncode != 0:
            raise RuntimeError(f"{width}x{height} {fmt}: {result.stderr[-2000:]}")
        row = {"image": f"{width}x{height} {fmt}", **json.loads(result.stdout.strip().splitlines()[-1])}
        logger.info("%-18s %9d bytes  %-12s %7.1f ms  %6.1f MB", row["image"], row["bytes"], row["outcome"],
                    row["ms"], row["peak_mb"])
        rows.append(row)
    return rows


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(json.dumps(main(get_args_parser().parse_args())))
