"""Few-shot benchmark: heads on frozen EfficientNet-Lite0 features, a full fine-tuning baseline,
and the wall time of training/train_head.py (cold and warm feature cache).

    python benchmarks/bench_fewshot.py --docs docs/BENCHMARKS.md

For each data set and k in --shots: --episodes seeded episodes, each drawing --ways random classes
(all classes when a set has fewer), k training images per class from train/, and evaluating on
every val/ image of those classes. Features are computed once per data set through the same cache
as train_head (plain view, augmented views, val), then every episode only fits heads. Prints a
markdown table; --docs replaces the "## Few-shot heads" section of that file with it.

Not part of the test suite (it takes minutes). Exit codes: 0 done, 2 bad arguments, 1 anything else.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.bench_train_head import link_class_folders, run_train_head
from benchmarks.report import machine_description, replace_section
from handlers.backbones import get_backbone
from handlers.heads import build_head
from imagerec.cli import EXIT_BAD_ARGUMENTS, run_cli
from imagerec.export import CACHE_DIR_VAR
from imagerec.paths import DATASETS_DIR as DATASETS
from training.data import load_dataset
from training.evaluation import mean_ci95
from training.features import Augmentation, FeatureExtractor, default_cache_dir
from training.blas import single_thread
from training.evaluation import share
from training.train_head import DEFAULT_HEAD, DEFAULT_VIEWS, training_rows

logger = logging.getLogger("bench_fewshot")

SECTION = "## Few-shot heads"
BACKBONE = "efficientnet_lite0"  # the backbone with genuine ImageNet weights available offline
HEAD_KINDS = ("linear", "prototype")
# Ablation columns: each head with the other choice of augmented views than train_head makes.
VARIANTS = ("linear", "prototype", "linear, no views", "prototype + views")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets-dir", type=Path, default=DATASETS, help="folder holding the shared photo sets")
    parser.add_argument("--datasets", type=str, default="hymenoptera,clothing10,signdigits10",
                        help="comma-separated set names")
    parser.add_argument("--shots", type=str, default="1,5,10,20", help="comma-separated k (images per class)")
    parser.add_argument("--episodes", type=int, default=10, help="seeded episodes per (set, k)")
    parser.add_argument("--ways", type=int, default=5, help="classes per episode (all when a set has fewer)")
    parser.add_argument("--views", type=int, default=DEFAULT_VIEWS, help="augmented views per training image")
    parser.add_argument("--cache-dir", type=Path, default=default_cache_dir(), help="feature cache")
    parser.add_argument("--finetune-epochs", type=int, default=6, help="epochs of the fine-tuning baseline (0: skip)")
    parser.add_argument("--finetune-set", type=str, default="clothing10", help="set of the fine-tuning baseline")
    parser.add_argument("--finetune-shots", type=int, default=20, help="k of the fine-tuning baseline")
    parser.add_argument("--timing-set", type=str, default="clothing10",
                        help="set whose first 5 classes x 20 train images time train_head ('' to skip)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    parser.add_argument("--docs", type=Path, default=None, help="markdown file whose few-shot section is replaced")
    parser.add_argument("--json", type=Path, default=None, help="also write all figures as JSON here")
    return parser


def parse_list(text: str, kind=str) -> list:
    values = [kind(part) for part in text.split(",") if part.strip()]
    if not values:
        raise ValueError(f"empty list {text!r}")
    return values


def set_features(extractor: FeatureExtractor, root: Path, views: int) -> dict:
    dataset = load_dataset(root)
    train = dataset.train
    paths, hashes = [s.path for s in train], [s.sha256 for s in train]
    return {
        "classes": dataset.classes,
        "train": extractor.extract(paths, hashes, description=f"{root.name} train"),
        "augmented": extractor.extract(paths, hashes, views=views, description=f"{root.name} train views")
        if views else None,
        "train_labels": np.array([s.label for s in train], np.int64),
        "train_paths": paths,
        "val": extractor.extract([s.path for s in dataset.val], [s.sha256 for s in dataset.val],
                                 description=f"{root.name} val"),
        "val_labels": np.array([s.label for s in dataset.val], np.int64),
        "val_paths": [s.path for s in dataset.val],
    }


def draw_episode(features: dict, ways: int, shots: int, seed: int) -> tuple[list[int], list[int], list[int]]:
    """(classes, train indices, val indices) of one seeded episode."""
    rng = random.Random(seed)
    num_classes = len(features["classes"])
    classes = sorted(rng.sample(range(num_classes), min(ways, num_classes)))
    train, val = [], []
    for cls in classes:
        candidates = np.flatnonzero(features["train_labels"] == cls).tolist()
        train += rng.sample(candidates, min(shots, len(candidates)))
        val += np.flatnonzero(features["val_labels"] == cls).tolist()
    return classes, train, val


def run_episode(features: dict, ways: int, shots: int, seed: int) -> dict[str, float]:
    classes, train, val = draw_episode(features, ways, shots, seed)
    remap = {cls: i for i, cls in enumerate(classes)}
    labels = np.array([remap[int(features["train_labels"][i])] for i in train], np.int64)
    val_labels = np.array([remap[int(features["val_labels"][i])] for i in val], np.int64)
    augmented = features["augmented"][train] if features["augmented"] is not None else None
    accuracies = {}
    for variant in VARIANTS:
        kind = variant.split(",")[0].split(" ")[0]
        head = build_head(kind, features["train"].shape[1], len(classes))
        # "linear" and "prototype" are exactly what train_head does (views only for heads that use
        # them); the other two flip that choice, to show it was measured.
        use_views = head.uses_views if variant in HEAD_KINDS else not head.uses_views
        rows, row_labels, groups = training_rows(features["train"][train], augmented if use_views else None, labels)
        with single_thread():
            head.fit(rows, row_labels, groups=groups, seed=seed)
        accuracies[variant] = share(head(features["val"][val]).argmax(1) == val_labels)
    return accuracies


def bench_heads(extractor, args) -> list[dict]:
    rows = []
    for name in parse_list(args.datasets):
        features = set_features(extractor, args.datasets_dir / name, args.views)
        for shots in parse_list(args.shots, int):
            started = time.perf_counter()
            results = [run_episode(features, args.ways, shots, seed) for seed in range(args.episodes)]
            row = {"dataset": name, "ways": min(args.ways, len(features["classes"])), "shots": shots,
                   "episodes": args.episodes, "fit_seconds_per_episode": (time.perf_counter() - started) / args.episodes}
            for variant in VARIANTS:
                row[variant] = mean_ci95([r[variant] for r in results])
            logger.info("%s %d-shot: %s", name, shots,
                        ", ".join(f"{k} {row[k][0]:.3f}±{row[k][1]:.3f}" for k in VARIANTS))
            rows.append(row)
    return rows


def finetune_baseline(args) -> dict:
    """All layers of EfficientNet-Lite0 trained on episode 0's images (same draw as the heads)."""
    extractor = FeatureExtractor(BACKBONE, cache_dir=args.cache_dir, progress=False)
    features = set_features(extractor, args.datasets_dir / args.finetune_set, 0)
    classes, train, val = draw_episode(features, args.ways, args.finetune_shots, seed=0)
    remap = {cls: i for i, cls in enumerate(classes)}
    backbone = get_backbone(BACKBONE)
    network = backbone.load(backbone.resolve_weights())
    network.classifier = torch.nn.Linear(backbone.feature_dim, len(classes))
    augment = Augmentation().transform(backbone.preprocessing)
    from handlers.imaging import ImagePreprocessor, decode_image

    preprocess = ImagePreprocessor(backbone.preprocessing)
    images = [decode_image(features["train_paths"][i].read_bytes(), min_side=backbone.preprocessing.resize_size)
              for i in train]
    labels = torch.tensor([remap[int(features["train_labels"][i])] for i in train])
    val_inputs = torch.from_numpy(np.stack([preprocess(features["val_paths"][i].read_bytes()) for i in val]))
    val_labels = torch.tensor([remap[int(features["val_labels"][i])] for i in val])
    optimizer = torch.optim.AdamW([
        {"params": network.body.parameters(), "lr": 1e-4},
        {"params": network.classifier.parameters(), "lr": 1e-3},
    ], weight_decay=1e-4)
    steps_per_epoch = (len(images) + 15) // 16
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=[1e-4, 1e-3],
                                                    total_steps=args.finetune_epochs * steps_per_epoch)
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    started = time.perf_counter()
    for epoch in range(args.finetune_epochs):
        network.train()
        order = torch.randperm(len(images), generator=generator).tolist()
        total = 0.0
        for start in range(0, len(order), 16):
            batch = order[start:start + 16]
            inputs = torch.stack([augment(images[i]) for i in batch])
            loss = F.cross_entropy(network(inputs), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            total += float(loss.detach()) * len(batch)
        logger.info("fine-tuning epoch %d/%d: loss %.3f (%.0fs)", epoch + 1, args.finetune_epochs,
                    total / len(images), time.perf_counter() - started)
    train_seconds = time.perf_counter() - started
    network.eval()
    with torch.inference_mode():
        predicted = torch.cat([network(val_inputs[i:i + 32]).argmax(1) for i in range(0, len(val_inputs), 32)])
    # The heads on exactly this draw, for a like-for-like comparison.
    heads = run_episode(features, args.ways, args.finetune_shots, seed=0)
    return {"dataset": args.finetune_set, "ways": len(classes), "shots": args.finetune_shots,
            "epochs": args.finetune_epochs, "accuracy": float((predicted == val_labels).float().mean()),
            "train_seconds": train_seconds, "val_images": len(val), "heads_same_draw": heads}


def time_train_head(args) -> dict:
    """Wall time of training/train_head.py as a user runs it: 5 class folders x 20 photos. Cold: empty
    feature cache and empty exported-graph cache (the first head on a new machine); warm: both filled."""
    source = args.datasets_dir / args.timing_set / "train"
    with tempfile.TemporaryDirectory(prefix="bench-train-head-") as tmp:
        tmp = Path(tmp)
        link_class_folders(source, tmp / "photos", classes=5, per_class=20)
        env = {**os.environ, CACHE_DIR_VAR: str(tmp / "onnx-cache")}
        timings = {}
        for run, version in (("cold", "1"), ("warm", "2")):
            seconds, report, command = run_train_head(tmp / "photos", tmp / "out", "bench", version, "--backbone",
                                                       BACKBONE, "--cache-dir", str(tmp / "cache"), env=env)
            timings[run] = seconds
            timings[f"{run}_phases"] = report["timings_s"]
            timings[f"{run}_val_accuracy"] = report["metrics"]["accuracy"]
            logger.info("train_head %s cache: %.1fs wall (%s)", run, seconds, report["timings_s"])
        timings["command"] = " ".join(["python training/train_head.py", "PHOTOS(5 classes x 20)", *command[3:]]) \
            .replace(str(tmp), "TMP")
        shutil.rmtree(tmp / "out", ignore_errors=True)
    return timings


def markdown(heads: list[dict], finetune: dict | None, timing: dict | None, args, seconds: float) -> str:
    lines = [SECTION, "", f"Command: `.venv/bin/python -m benchmarks.bench_fewshot {' '.join(sys.argv[1:])}` "
             f"(total {seconds / 60:.1f} min).", "", f"Machine: {machine_description()}.", "",
             f"Backbone {BACKBONE} (frozen); linear head's training rows = each image's plain view + {args.views} augmented "
             f"views (prototype: the plain view); {args.episodes} seeded episodes per row, {args.ways} random classes where a set has more, "
             "evaluated on all val images of the episode's classes. Mean accuracy ± half-width of the 95% "
             f"interval over episodes. Default head: `{DEFAULT_HEAD}`.", "",
             "The last two columns are the ablation of augmented views (train_head gives them to the "
             "linear head only).", "",
             "| set | ways | k | " + " | ".join(VARIANTS) + " |", "|---|---|---|" + "---|" * len(VARIANTS)]
    for row in heads:
        cells = [f"{row[k][0]:.3f} ± {row[k][1]:.3f}" for k in VARIANTS]
        lines.append(f"| {row['dataset']} | {row['ways']} | {row['shots']} | {' | '.join(cells)} |")
    if finetune:
        lines += ["", f"Full fine-tuning baseline (all layers of {BACKBONE}, AdamW + one-cycle schedule, same "
                  f"augmentation, {finetune['epochs']} epochs, episode 0's draw: {finetune['dataset']} "
                  f"{finetune['ways']}-way {finetune['shots']}-shot, {finetune['val_images']} val images): "
                  f"accuracy **{finetune['accuracy']:.3f}** in **{finetune['train_seconds']:.0f} s** of training. "
                  f"Heads on the same draw: " + ", ".join(f"{k} {finetune['heads_same_draw'][k]:.3f}" for k in HEAD_KINDS)
                  + "."]
    if timing:
        lines += ["", "train_head wall time, 5 class folders x 20 photos (80 train / 20 held out), "
                  f"images to .mar, default settings: cold cache **{timing['cold']:.1f} s**, warm cache "
                  f"**{timing['warm']:.1f} s** (process start to exit).", "",
                  f"Phases cold: {json.dumps(timing['cold_phases'])}; warm: {json.dumps(timing['warm_phases'])}.", "",
                  f"Command: `{timing['command']}`"]
    return "\n".join(lines) + "\n"


def main(args: argparse.Namespace) -> str:
    if args.episodes < 2 or args.ways < 2 or args.views < 0 or args.finetune_epochs < 0:
        raise ValueError("--episodes and --ways must be at least 2; --views and --finetune-epochs not negative")
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    started = time.perf_counter()
    extractor = FeatureExtractor(BACKBONE, cache_dir=args.cache_dir, progress=True)
    heads = bench_heads(extractor, args)
    timing = time_train_head(args) if args.timing_set else None
    finetune = finetune_baseline(args) if args.finetune_epochs else None
    text = markdown(heads, finetune, timing, args, time.perf_counter() - started)
    if args.json:
        args.json.write_text(json.dumps({"heads": heads, "finetune": finetune, "timing": timing}, indent=1))
    if args.docs:
        replace_section(args.docs, SECTION, text)
        logger.info("updated %s", args.docs)
    return text


if __name__ == "__main__":
    run_cli(main, get_args_parser(), {ValueError: EXIT_BAD_ARGUMENTS}, logger=logger, output=str.rstrip)
