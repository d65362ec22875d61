"""The offline phase of benchmarks/bench_serving.py, run in a spawned child process: torch, in-process
timings (the reference), preprocessing costs, the benchmark's archives, and the workers' own
measurements (benchmarks/bench_in_worker.py in the serving environment).

A child process, so that no torch pages of the benchmark process count in the servers' memory.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import time
from pathlib import Path

from benchmarks.bench_in_worker import VARIANTS, median_time
from imagerec.cli import LOG_FORMAT
from imagerec.paths import PROJECT_ROOT
from imagerec.torchserve import serving_python

logger = logging.getLogger("bench_serving")

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif"}
HEAD_SETS = ("clothing10", "signdigits10")  # the two heads of the memory target; the first is load-tested
HEAD_SHOTS = 20  # training images per class for the benchmark's heads
RESNET18_SEED = 0  # the self-made resnet18 weights: torch.manual_seed(0), then the network's own init
RESNET18_WEIGHTS_FILE = "resnet18-selfmade.pth"
LEVER_DELAYS_MS = (0, 1, 5, 10)  # max batch delays tried against the default archive's


def val_photos(datasets: Path) -> list[Path]:
    """Every val image of every set, in a fixed order."""
    return sorted(p for p in datasets.glob("*/val/*/*") if p.suffix.lower() in IMAGE_SUFFIXES)


def spread(items: list, count: int) -> list:
    """``count`` items evenly spread over the list (all of them when count is 0 or too big)."""
    if count <= 0 or count >= len(items):
        return list(items)
    return [items[i * len(items) // count] for i in range(count)]


def offline_phase(options: dict) -> dict:
    """Runs in a spawned child. Returns plain data: timings, guard, archive paths, batching."""
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    import torch

    from imagerec.archive import BatchingConfig
    from imagerec.options import add_batching_arguments

    workdir = Path(options["workdir"])
    build_parser = argparse.ArgumentParser()
    add_batching_arguments(build_parser)
    defaults = build_parser.parse_args([])  # the archive options' defaults, as build_archive.py has them
    precision = options["precision"] or defaults.precision
    batching = BatchingConfig(
        batch_size=options["batch_size"] or defaults.batch_size,
        max_batch_delay_ms=defaults.max_batch_delay if options["max_batch_delay"] is None else options["max_batch_delay"],
    )
    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    photos = val_photos(Path(options["datasets"]))
    default_variant = precision
    result = {"variant": default_variant, "batching": vars(batching), "threads": threads, "photos": len(photos)}
    weights = make_resnet18_weights(workdir)
    result["reference"] = reference_timings(weights, photos, options["reference_reps"])
    result["costs"] = preprocessing_costs(photos, batching.batch_size)
    heads = fit_heads(Path(options["datasets"]))
    result["archives"] = build_bench_archives(workdir, weights, heads, default_variant, batching, options)
    result["worker"] = in_worker_measurements(workdir, result["archives"], photos, batching.batch_size, threads, options)
    return result


def resnet18_variant_model(variant: str) -> str:
    """The model name of the resnet18 archive served as ``variant`` (model names allow no '+')."""
    return f"resnet18_{variant.replace('+', '_')}"


def in_worker_measurements(workdir: Path, archives: dict, photos: list[Path], batch_size: int, threads: int,
                           options: dict) -> dict:
    """Forward costs and the accuracy guard with the workers' torch (benchmarks/bench_in_worker.py)."""
    guard_photos = spread(photos, options["guard_images"])
    spec = {
        "threads": threads, "batch_size": batch_size, "reps": options["reference_reps"],
        "cost_photos": [str(p) for p in spread(photos, 64)],
        # Every variant is measured from the default archive of each backbone.
        "costs": {name: archives[name]["archive"] for name in ("resnet18", "efficientnet_lite0")},
        "guard": {
            "efficientnet_lite0": {"archive": archives["efficientnet_lite0"]["archive"],
                                   "photos": [str(p) for p in guard_photos]},
            **{f"head_{s}": {"archive": archives[f"head_{s}"]["archive"],
                             "photos": [str(p) for p in guard_photos if p.parts[-4] == s]} for s in HEAD_SETS},
            "resnet18": {"archive": archives["resnet18"]["archive"], "relative": True,
                         "photos": [str(p) for p in spread(photos, 64)]},
        },
    }
    spec_path, out_path = workdir / "in_worker_spec.json", workdir / "in_worker_result.json"
    spec_path.write_text(json.dumps(spec, indent=1))
    command = [str(serving_python()), "-m", "benchmarks.bench_in_worker",
               "--spec", str(spec_path), "--out", str(out_path)]
    logger.info("forward costs and accuracy guard in the serving environment (%d guard images)", len(guard_photos))
    # The serving environment has torch and TorchServe only: it finds this project on PYTHONPATH.
    subprocess.run(command, check=True, cwd=PROJECT_ROOT, env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)})
    return json.loads(out_path.read_text())


def reference_phase(options: dict) -> dict:
    """The reference again, after the served runs (spawned child): load may change during a run."""
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    return reference_timings(Path(options["workdir"]) / RESNET18_WEIGHTS_FILE, val_photos(Path(options["datasets"])),
                             options["reference_reps"])


def make_resnet18_weights(workdir: Path) -> Path:
    import torch

    from handlers.backbones import get_backbone

    torch.manual_seed(RESNET18_SEED)
    network = get_backbone("resnet18").build_network()
    path = workdir / RESNET18_WEIGHTS_FILE
    torch.save(network.state_dict(), path)
    return path


def reference_timings(weights: Path, photos: list[Path], reps: int) -> dict:
    """The issue's reference: fp32 eager resnet18, all cores, in this process."""
    import numpy as np
    import torch

    from handlers.backbones import get_backbone
    from handlers.imaging import ImagePreprocessor

    backbone = get_backbone("resnet18")
    network = backbone.load(weights)
    preprocessor = ImagePreprocessor(backbone.preprocessing)
    sample = [p.read_bytes() for p in spread(photos, max(reps, 16))]
    latencies = []
    with torch.inference_mode():
        for data in sample[:2]:  # warm-up: first calls allocate and pick kernels
            network(torch.from_numpy(preprocessor(data)[None]))
        for data in sample[:reps]:
            start = time.perf_counter()
            network(torch.from_numpy(preprocessor(data)[None]))
            latencies.append(time.perf_counter() - start)
        batch = torch.from_numpy(np.stack([preprocessor(data) for data in sample[:16]]))
        forward16 = median_time(lambda: network(batch), max(3, reps // 4))
    return {
        "batch1_latency_ms": statistics.median(latencies) * 1e3,
        "batch16_throughput": 16 / forward16,
    }


def preprocessing_costs(photos: list[Path], batch_size: int) -> dict:
    """Per-image preprocessing costs behind the ceiling (Pillow and numpy: the same in both environments)."""
    import torch

    from handlers.backbones import get_backbone
    from handlers.imaging import ImagePreprocessor, decode_image

    costs = {}
    sample = [p.read_bytes() for p in spread(photos, 64)]
    preprocessor = ImagePreprocessor(get_backbone("resnet18").preprocessing)
    torch.set_num_threads(1)  # preprocessing runs on one core per image
    costs["preprocess_ms"] = median_time(lambda: [preprocessor(d) for d in sample], 3) / len(sample) * 1e3
    costs["decode_ms"] = median_time(lambda: [decode_image(d, 256) for d in sample], 3) / len(sample) * 1e3
    costs["large_photo"] = large_photo_timings(photos, preprocessor)
    torch.set_num_threads(os.cpu_count() or 1)
    costs["batch_preprocess"] = batch_preprocess_timings(preprocessor, sample, batch_size)
    return costs


def batch_preprocess_timings(preprocessor, sample: list[bytes], batch_size: int) -> dict:
    """The handler's preprocessing lever: a batch's images one by one (the old path) against geometry on
    one thread per core plus one normalisation of the whole batch (the handler now)."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    batches = [sample[i:i + batch_size] for i in range(0, len(sample) - batch_size + 1, batch_size)]
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        threaded = median_time(lambda: [preprocessor.normalise(np.stack(list(pool.map(preprocessor.geometry, b))))
                                         for b in batches], 3)
    serial = median_time(lambda: [np.stack([preprocessor(d) for d in b]) for b in batches], 3)
    images = sum(len(b) for b in batches)
    return {"batch_size": batch_size, "serial_ms_per_image": serial / images * 1e3,
            "threaded_ms_per_image": threaded / images * 1e3}


def large_photo_timings(photos: list[Path], preprocessor) -> dict:
    """The JPEG draft lever on a big photo: the largest val JPEG scaled to 12 MP (phone size)."""
    import io

    from PIL import Image

    from handlers.imaging import decode_image, eval_transform

    transform = eval_transform(preprocessor.preprocessing)
    biggest = max((p for p in photos if p.suffix.lower() in (".jpg", ".jpeg")), key=lambda p: p.stat().st_size)
    with Image.open(biggest) as image:
        big = image.convert("RGB").resize((4000, 3000), Image.BILINEAR)
    buffer = io.BytesIO()
    big.save(buffer, "JPEG", quality=90)
    data = buffer.getvalue()
    size = preprocessor.preprocessing.resize_size
    draft = median_time(lambda: transform(decode_image(data, min_side=size)), 5, 1)
    full = median_time(lambda: transform(decode_image(data)), 5, 1)
    return {"source": biggest.name, "bytes": len(data), "draft_ms": draft * 1e3, "full_ms": full * 1e3}


def fit_heads(datasets: Path) -> dict:
    """{set name: (prototype head fitted on fp32 efficientnet_lite0 features, class names)}."""
    import numpy as np

    from handlers.backbones import get_backbone
    from handlers.heads import build_head
    from handlers.imaging import ImagePreprocessor
    from handlers.recognizer import Recognizer

    backbone = get_backbone("efficientnet_lite0")
    preprocessor = ImagePreprocessor(backbone.preprocessing)
    model = Recognizer(backbone.load(backbone.resolve_weights()), None, "fp32")
    heads = {}
    for set_name in HEAD_SETS:
        classes = sorted(d.name for d in (datasets / set_name / "train").iterdir() if d.is_dir())
        train = [(p, i) for i, c in enumerate(classes)
                 for p in sorted((datasets / set_name / "train" / c).iterdir())[:HEAD_SHOTS]]
        features = np.concatenate([model.features(np.stack([preprocessor(p.read_bytes()) for p, _ in train[i:i + 32]]))
                                   for i in range(0, len(train), 32)])
        head = build_head("prototype", backbone.feature_dim, len(classes))
        head.fit(features, np.array([i for _, i in train]))
        heads[set_name] = (head, classes)
    return heads


def build_bench_archives(workdir: Path, weights: Path, heads: dict, default_variant: str, batching,
                         options: dict) -> dict:
    """{model name: {"archive", "backbone", "variant", "batching", "head"}}: what the servers load."""
    import dataclasses

    from imagerec.archive import build_archive
    from handlers.backbones import get_backbone, imagenet_categories

    out = workdir / "archives"
    specs = {"resnet18": ("resnet18", default_variant, batching, None)}
    if options["compare_variants"]:
        for other in (v for v in VARIANTS if v != default_variant):
            specs[resnet18_variant_model(other)] = ("resnet18", other, batching, None)
    if options["levers"]:
        # Each lever changes one thing against the default archive.
        specs["resnet18_batch1"] = ("resnet18", default_variant, dataclasses.replace(batching, batch_size=1), None)
        specs["resnet18_batch16"] = ("resnet18", default_variant, dataclasses.replace(batching, batch_size=16), None)
        for delay in (d for d in LEVER_DELAYS_MS if d != batching.max_batch_delay_ms):
            specs[f"resnet18_delay{delay}"] = ("resnet18", default_variant,
                                               dataclasses.replace(batching, max_batch_delay_ms=delay), None)
        specs["resnet18_2x1threads"] = ("resnet18", default_variant, dataclasses.replace(batching, workers=2), None)
        # TorchServe's stock layout: one worker per core, each using every core.
        specs["resnet18_2x2threads"] = ("resnet18", default_variant,
                                        dataclasses.replace(batching, workers=2, torch_threads=2), None)
    specs["efficientnet_lite0"] = ("efficientnet_lite0", default_variant, batching, None)
    for set_name in HEAD_SETS:
        specs[f"head_{set_name}"] = ("efficientnet_lite0", default_variant, batching, set_name)
    archives = {}
    for name, (backbone_name, variant, config, head_set) in specs.items():
        backbone = get_backbone(backbone_name)
        head, labels = heads[head_set] if head_set else (None, imagenet_categories())
        path = build_archive(
            name=name, version="1.0", backbone_name=backbone_name,
            weights_path=weights if backbone_name == "resnet18" else backbone.resolve_weights(),
            labels=labels, out_dir=out, precision=variant.split("+")[0], head=head, batching=config,
            overwrite=True,
        )
        archives[name] = {"archive": str(path), "backbone": backbone_name, "variant": variant,
                          "batching": dataclasses.asdict(config), "head": head_set}
    return archives
