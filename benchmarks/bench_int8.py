"""int8 experiment (measured, not shipped): ONNX Runtime static quantisation (QDQ, per-channel
weights, calibrated on 64 clothing10 training photos) of efficientnet_lite0's exported graph;
ImageNet Top-1 on imagenet-sample500 and ms per image against fp32 / bf16, at the worker's threads.

    .venv/bin/python -m benchmarks.bench_int8 --out /tmp/int8

Writes the quantised graph and the figures (JSON, also the stdout line) into --out.
Exit codes: 0 done, 1 failed.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from handlers.backbones import get_backbone
from handlers.layout import FEATURES_GRAPH_FILE
from handlers.runtime import PortableFeatures
from imagerec.cli import EXIT_FAILED, run_cli
from imagerec.export import exported_graph_dir
from imagerec.paths import DATASETS_DIR
from imagerec.precision_guard import eval_images, read_labelled_photos

logger = logging.getLogger("bench_int8")

BACKBONE = "efficientnet_lite0"
CALIBRATION_BATCH = 8


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder for the quantised graph and int8.json")
    parser.add_argument("--calibration", type=Path, default=DATASETS_DIR / "clothing10" / "train",
                        help="ImageFolder whose photos calibrate the activations (every 8th, 64 at most)")
    parser.add_argument("--imagenet", type=Path, default=DATASETS_DIR / "imagenet-sample500",
                        help="labelled ImageNet photos (labels.tsv) for Top-1")
    parser.add_argument("--threads", type=int, default=2, help="threads of each engine (a worker's)")
    return parser


def quantise(graph: Path, target: Path, calibration: np.ndarray) -> None:
    """Static QDQ quantisation of ``graph`` into ``target``, activations calibrated on (N, 3, H, W)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Batches(CalibrationDataReader):
        def __init__(self):
            self.batches = iter(calibration[i:i + CALIBRATION_BATCH]
                                for i in range(0, len(calibration), CALIBRATION_BATCH))

        def get_next(self):
            batch = next(self.batches, None)
            return None if batch is None else {"images": batch}

    quantize_static(str(graph), str(target), Batches(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)


def measure(features: PortableFeatures, classifier, images: np.ndarray, labels: np.ndarray) -> dict:
    """Top-1 over all photos, and median ms per image at batch 8 (5 runs) and batch 1 (10 runs)."""
    with torch.inference_mode():
        computed = np.concatenate([features(images[i:i + 16]) for i in range(0, len(images), 16)])
        top1 = classifier(torch.from_numpy(computed)).argmax(1).numpy() == labels
    features(images[:8])  # warm-up of the batch shape

    def per_image_ms(batch: np.ndarray, runs: int) -> float:
        times = []
        for _ in range(runs):
            started = time.perf_counter()
            features(batch)
            times.append((time.perf_counter() - started) / len(batch) * 1e3)
        return statistics.median(times)

    return {"top1": float(top1.mean()), "ms_b8": per_image_ms(images[:8], 5), "ms_b1": per_image_ms(images[:1], 10)}


def main(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    backbone = get_backbone(BACKBONE)
    weights = backbone.resolve_weights()
    graph = exported_graph_dir(backbone.name, weights) / FEATURES_GRAPH_FILE
    args.out.mkdir(parents=True, exist_ok=True)
    int8_graph = args.out / "features.int8.onnx"
    calibration = eval_images(sorted(args.calibration.glob("*/*"))[::8][:64], backbone.name)
    started = time.perf_counter()
    quantise(graph, int8_graph, calibration)
    logger.info("quantised in %.1f s: %.1f MB", time.perf_counter() - started, int8_graph.stat().st_size / 1e6)
    photos = read_labelled_photos(args.imagenet)
    images = eval_images([path for path, _ in photos], backbone.name)
    labels = np.array([label for _, label in photos])
    classifier = backbone.load(weights).classifier
    results = {}
    for name, path, engine, precision in (("fp32 onnxruntime", graph, "onnxruntime", "fp32"),
                                          ("fp32 openvino", graph, "openvino", "fp32"),
                                          ("bf16 openvino", graph, "openvino", "bf16"),
                                          ("int8 onnxruntime", int8_graph, "onnxruntime", "fp32"),
                                          ("int8 openvino", int8_graph, "openvino", "fp32")):
        results[name] = measure(PortableFeatures(path, engine, precision, args.threads), classifier, images, labels)
        logger.info("%s: %s", name, results[name])
    (args.out / "int8.json").write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    run_cli(main, get_args_parser(), {RuntimeError: EXIT_FAILED}, logger=logger, output=json.dumps)
