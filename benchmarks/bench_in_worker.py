"""The worker's side of benchmarks/bench_serving.py: forward costs and the accuracy guard, measured with
the serving environment's torch (.venv-serve), on the archives the servers load.

    .venv-serve/bin/python -m benchmarks.bench_in_worker --spec spec.json --out result.json

bench_serving.py writes the spec and reads the result; run by hand only to repeat its measurements.
Each archive is measured in three variants, all from the same files:
  fp32              eager backbone (the reference of the guard)
  fp32+onnxruntime  the archive's ONNX graph on ONNX Runtime (handlers/runtime.py)
  fp32+openvino     the archive's ONNX graph on OpenVINO
  bf16+openvino     the same graph on OpenVINO in bf16
  bf16              eager backbone under bf16 autocast
Imports torch and handlers only: the serving environment has nothing else (it finds this project
on PYTHONPATH).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path

from handlers.layout import extract_archive

logger = logging.getLogger("bench_in_worker")

VARIANTS = ("fp32", "fp32+onnxruntime", "fp32+openvino", "bf16+openvino", "bf16")
REFERENCE_VARIANT = "fp32"
GUARD_MIN_TOP1 = 0.99
GUARD_MAX_PROB_CHANGE = 0.02


def variants_of(model_dir: Path) -> list[str]:
    """The variants an unpacked archive can run: all of them (every archive carries its graph)."""
    return list(VARIANTS)


def load_variant(model_dir: Path, variant: str):
    """(LoadedModel, ImagePreprocessor) for one variant of an unpacked archive."""
    from handlers.imaging import ImagePreprocessor
    from handlers.recognizer import load_recognizer

    precision, _, engine = variant.partition("+")
    loaded = load_recognizer(model_dir, precision=precision, engine=engine or "eager")
    if loaded.recognizer.runtime != (engine or "eager"):
        raise RuntimeError(f"{model_dir}: no usable backbone graph for variant {variant}")
    return loaded, ImagePreprocessor(loaded.backbone.preprocessing)


def median_time(function, reps: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        function()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def forward_costs(model_dir: Path, photos: list[Path], batch_size: int, reps: int) -> dict:
    """{variant: forward ms at batch 1 and ms/image at ``batch_size``}, real photos as input."""
    import numpy as np

    costs = {}
    for variant in variants_of(model_dir):
        loaded, preprocessor = load_variant(model_dir, variant)
        batch = np.stack([preprocessor(p.read_bytes()) for p in photos[:batch_size]])
        singles = [image[None] for image in batch]
        one = statistics.median(median_time(lambda: loaded.recognizer(x), max(1, reps // len(singles)), 1)
                                for x in singles)
        full = median_time(lambda: loaded.recognizer(batch), max(3, reps // 2))
        costs[variant] = {"forward1_ms": one * 1e3, "forward_batch_ms_per_image": full / len(batch) * 1e3}
        logger.info("%s %s: forward b1 %.1f ms, b%d %.2f ms/image", model_dir.name, variant, one * 1e3,
                    len(batch), full / len(batch) * 1e3)
    return costs


def logits_of(model_dir: Path, variant: str, photos: list[Path], batch_size: int):
    """(N, C) logits (a torch tensor, for ``compare``) of one variant over the photos, in batches of the served size."""
    import numpy as np
    import torch

    loaded, preprocessor = load_variant(model_dir, variant)
    out = []
    for start in range(0, len(photos), batch_size):
        images = np.stack([preprocessor(p.read_bytes()) for p in photos[start:start + batch_size]])
        out.append(loaded.recognizer(images))
    return torch.from_numpy(np.concatenate(out))


def compare(reference_logits, candidate_logits) -> dict:
    """Top-1 agreement and the largest probability change among either side's top-3 classes."""
    import torch

    p_ref, p_new = reference_logits.softmax(1), candidate_logits.softmax(1)
    k = min(3, p_ref.shape[1])
    classes = torch.cat([p_ref.topk(k, 1).indices, p_new.topk(k, 1).indices], 1)
    change = (p_new.gather(1, classes) - p_ref.gather(1, classes)).abs().amax(1)
    agreement = float((p_ref.argmax(1) == p_new.argmax(1)).float().mean())
    worst = float(change.max())
    return {
        "images": len(p_ref), "top1_agreement": agreement, "max_top3_change": worst,
        "over_limit": int((change > GUARD_MAX_PROB_CHANGE).sum()),
        "passed": agreement >= GUARD_MIN_TOP1 and worst <= GUARD_MAX_PROB_CHANGE,
    }


def relative_logit_change(reference_logits, candidate_logits) -> dict:
    """For near-uniform logits (self-made resnet18 weights), where top-1 agreement means nothing."""
    spread = reference_logits.amax(1) - reference_logits.amin(1)
    relative = (candidate_logits - reference_logits).abs().amax(1) / spread
    return {"images": len(reference_logits), "max_relative_logit_change": float(relative.max()),
            "median_relative_logit_change": float(relative.median()),
            "top1_agreement": float((candidate_logits.argmax(1) == reference_logits.argmax(1)).float().mean())}


def accuracy_guard(model_dir: Path, photos: list[Path], batch_size: int, relative: bool) -> dict:
    """{variant: comparison with the fp32 eager reference} for every other variant."""
    reference = logits_of(model_dir, REFERENCE_VARIANT, photos, batch_size)
    measure = relative_logit_change if relative else compare
    return {variant: measure(reference, logits_of(model_dir, variant, photos, batch_size))
            for variant in variants_of(model_dir) if variant != REFERENCE_VARIANT}


def run(spec: dict) -> dict:
    """spec: {"threads", "batch_size", "reps", "cost_photos": [...], "costs": {name: archive},
    "guard": {name: {"archive", "photos": [...], "relative": bool}}}."""
    import torch

    torch.set_num_threads(spec["threads"])
    result = {"torch": torch.__version__, "costs": {}, "guard": {}}
    with tempfile.TemporaryDirectory(prefix="bench-in-worker-") as tmp:
        unpacked = {}

        def model_dir(archive: str) -> Path:
            if archive not in unpacked:
                unpacked[archive] = extract_archive(archive, Path(tmp) / Path(archive).stem)
            return unpacked[archive]

        cost_photos = [Path(p) for p in spec["cost_photos"]]
        for name, archive in spec["costs"].items():
            result["costs"][name] = forward_costs(model_dir(archive), cost_photos, spec["batch_size"], spec["reps"])
        for name, job in spec["guard"].items():
            logger.info("accuracy guard: %s on %d images", name, len(job["photos"]))
            result["guard"][name] = accuracy_guard(model_dir(job["archive"]), [Path(p) for p in job["photos"]],
                                                   spec["batch_size"], job.get("relative", False))
    return result


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", type=Path, required=True, help="JSON written by bench_serving.py")
    parser.add_argument("--out", type=Path, required=True, help="where to write the JSON result")
    return parser


def main(args: argparse.Namespace) -> None:
    result = run(json.loads(args.spec.read_text()))
    args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    main(get_args_parser().parse_args())
