"""Open-set benchmark: the rejection rule on photos of no trained class, and ``--head auto``.

    python benchmarks/bench_openset.py --out docs/bench/openset.md

Part 1 (rule): for each known set (clothing10, signdigits10), --episodes seeded episodes of --ways
random classes x --shots training photos (draws as in scripts/bench_fewshot.py). The head is fitted as
train_head fits it (default ``auto``) with its rule at --keep. Known photos: val photos of the
episode's classes; near unknowns: val photos of the set's other classes; far unknowns: val photos of
the other shared sets. Reports mean and 95% interval of far/near AUROC and FPR@95, the share of known
photos kept at the calibrated threshold (on the val photos, and on the episode's classes' training
photos the episode did not draw: unseen photos drawn like the training photos), closed-set accuracy
with and without the rule, and other scores (max softmax, energy, centred kNN, the kNN rule) on the
same episodes, plus the rule's cost per photo.

Part 2 (auto): accuracy of ``auto``, ``linear`` and ``prototype`` (each as train_head fits it) at each
k in --auto-shots on every shared set, plus the warm train_head wall time of linear vs auto.

Features come from training/features.py's cache (computed once). Not part of the test suite.
Exit codes: 0 done, 2 bad arguments, 1 anything else.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from argparse import Namespace
from collections import Counter
from pathlib import Path

import numpy as np

from benchmarks.bench_fewshot import BACKBONE, DATASETS, draw_episode, set_features
from benchmarks.bench_train_head import link_class_folders, run_train_head
from benchmarks.report import machine_description
from handlers.backbones import backbone_names
from handlers.arrays import l2_normalise, logsumexp, softmax
from handlers.heads import head_from_state
from handlers.rejection import DEFAULT_KEEP, KnnRejection
from imagerec.cli import EXIT_BAD_ARGUMENTS, run_cli
from imagerec.export import CACHE_DIR_VAR
from training.evaluation import auroc, fpr_at_keep, mean_ci95, share
from training.features import FeatureExtractor, default_cache_dir
from training.train_head import DEFAULT_VIEWS, fit_head, training_rows

logger = logging.getLogger("bench_openset")

SHARED_SETS = ("hymenoptera", "clothing10", "signdigits10")
RULE = "rule"
OTHER_SCORES = ("max softmax", "energy", "kNN, centred", "kNN (rule below 5 photos per class)", RULE)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets-dir", type=Path, default=DATASETS, help="folder holding the shared photo sets")
    parser.add_argument("--backbone", type=str, default=BACKBONE, choices=backbone_names(),
                        help="frozen backbone whose features the heads use")
    parser.add_argument("--known", type=str, default="clothing10,signdigits10", help="known sets of part 1")
    parser.add_argument("--episodes", type=int, default=10, help="seeded episodes per row")
    parser.add_argument("--ways", type=int, default=5, help="known classes per episode (all when a set has fewer)")
    parser.add_argument("--shots", type=int, default=20, help="training photos per class in part 1")
    parser.add_argument("--keep", type=float, default=DEFAULT_KEEP, help="share of known photos the rule keeps")
    parser.add_argument("--head", type=str, default="auto", help="head of part 1 (as train_head --head)")
    parser.add_argument("--auto-shots", type=str, default="1,5,10,20", help="k of part 2 ('' to skip part 2)")
    parser.add_argument("--auto-extra", type=str, default="signdigits10:10:20",
                        help="extra part 2 rows SET:WAYS:K, comma-separated")
    parser.add_argument("--views", type=int, default=DEFAULT_VIEWS, help="augmented views per training photo")
    parser.add_argument("--timing-runs", type=int, default=2, help="warm train_head runs per head (0: skip)")
    parser.add_argument("--cache-dir", type=Path, default=default_cache_dir(), help="feature cache")
    parser.add_argument("--out", type=Path, default=None, help="markdown file to write the figures to")
    parser.add_argument("--json", type=Path, default=None, help="also write all figures as JSON here")
    return parser


def episode_features(features: dict, train: list[int], labels: np.ndarray) -> dict:
    """What train_head.fit_head reads, for one episode's training photos."""
    plain = features["train"][train]
    augmented = features["augmented"][train] if features["augmented"] is not None else None
    rows, row_labels, groups = training_rows(plain, augmented, labels)
    return {"plain": plain, "augmented": augmented, "photo_labels": labels,
            "train": rows, "train_labels": row_labels, "groups": groups}


def fit(kind: str, features: dict, num_classes: int, seed: int, keep: float):
    args = Namespace(seed=seed, keep=keep, weight_decay=None)
    return fit_head(kind, features["plain"].shape[1], num_classes, features, args)


def remapped(features: dict, classes: list[int], train: list[int], val: list[int]):
    remap = {cls: i for i, cls in enumerate(classes)}
    labels = np.array([remap[int(features["train_labels"][i])] for i in train], np.int64)
    val_labels = np.array([remap[int(features["val_labels"][i])] for i in val], np.int64)
    return labels, val_labels


def openset_episode(features: dict, far: np.ndarray, args, seed: int) -> dict:
    classes, train, val = draw_episode(features, args.ways, args.shots, seed)
    labels, val_labels = remapped(features, classes, train, val)
    near_rows = [i for i, label in enumerate(features["val_labels"].tolist()) if label not in classes]
    near = features["val"][near_rows] if near_rows else None
    drawn = set(train)
    undrawn = [i for i, label in enumerate(features["train_labels"].tolist()) if label in classes and i not in drawn]
    head, summary = fit(args.head, episode_features(features, train, labels), len(classes), seed, args.keep)
    known = features["val"][val]
    result = {"head": head.kind, "power": float(head.power), "rule": head.rejection.kind}
    logits = head(known)
    predicted = logits.argmax(1)
    # "Without the rule": the same head state loaded as an archive made before rules (rule off).
    state = {k: v for k, v in head.state().items() if not k.startswith("rejection.")}
    plain_head = head_from_state(head.kind, head.feature_dim, head.num_classes, state)
    result["accuracy_without_rule"] = share(plain_head(known).argmax(1) == val_labels)
    result["accuracy_with_rule"] = share(predicted == val_labels)
    threshold = float(head.rejection.threshold)
    scores = {RULE: head.known_score}
    knn_rule = KnnRejection(head.feature_dim)
    knn_rule.fit(features["train"][train], np.arange(len(train)), args.keep)
    scores["kNN (rule below 5 photos per class)"] = knn_rule.score
    centre = features["train"][train].mean(0)
    bank_centred = l2_normalise(features["train"][train] - centre)
    scores["kNN, centred"] = lambda x: (l2_normalise(x - centre) @ bank_centred.T).max(1)
    scores["max softmax"] = lambda x: softmax(head(x)).max(1)
    scores["energy"] = lambda x: logsumexp(head(x))
    kept = head.known_score(known) >= threshold
    result["known_kept"] = share(kept)
    if undrawn:
        result["undrawn_kept"] = share(head.known_score(features["train"][undrawn]) >= threshold)
    result["accuracy_on_kept"] = share(predicted[kept] == val_labels[kept])
    result["far_rejected"] = share(head.known_score(far) < threshold)
    if near is not None:
        result["near_rejected"] = share(head.known_score(near) < threshold)
    for name, score in scores.items():
        known_scores = score(known)
        result[f"{name}|far_auroc"] = auroc(known_scores, score(far))
        result[f"{name}|far_fpr95"] = fpr_at_keep(known_scores, score(far), 0.95)
        if near is not None:
            result[f"{name}|near_auroc"] = auroc(known_scores, score(near))
            result[f"{name}|near_fpr95"] = fpr_at_keep(known_scores, score(near), 0.95)
    result["threshold"] = threshold
    return result


def rule_cost(features: dict, args) -> dict:
    """Milliseconds of the rule per photo (one photo, and a batch of 8), in process (numpy)."""
    classes, train, _ = draw_episode(features, args.ways, args.shots, 0)
    labels, _ = remapped(features, classes, train, [])
    head, _ = fit("prototype", episode_features(features, train, labels), len(classes), 0, args.keep)
    costs = {}
    for batch in (1, 8):
        photos = features["val"][:batch]
        timings = []
        for _ in range(300):
            started = time.perf_counter()
            head.known_score(photos)
            timings.append(time.perf_counter() - started)
        costs[f"batch {batch}"] = statistics.median(timings) * 1000 / batch
    costs["rule"] = head.rejection.kind
    costs["training_photos"] = len(train)
    return costs


def accuracy_episode(features: dict, ways: int, shots: int, seed: int) -> dict:
    classes, train, val = draw_episode(features, ways, shots, seed)
    labels, val_labels = remapped(features, classes, train, val)
    ep = episode_features(features, train, labels)
    result = {}
    for kind in ("linear", "prototype", "auto"):
        started = time.perf_counter()
        head, summary = fit(kind, ep, len(classes), seed, 1.0)
        result[f"{kind}|seconds"] = time.perf_counter() - started
        result[kind] = share(head(features["val"][val]).argmax(1) == val_labels)
        if kind == "auto":
            result["choice"] = f"{head.kind} p{float(head.power):g}"
    return result


def time_train_head(args) -> dict:
    """Warm wall time of training/train_head.py (features cached, no compiling) with --head linear
    and --head auto, alternated, on clothing10's first 5 classes x 20 train photos."""
    source = args.datasets_dir / "clothing10" / "train"
    timings = {"linear": [], "auto": []}
    with tempfile.TemporaryDirectory(prefix="bench-openset-") as tmp:
        tmp = Path(tmp)
        link_class_folders(source, tmp / "photos", classes=5, per_class=20)
        env = {**os.environ, CACHE_DIR_VAR: str(tmp / "export-cache")}
        # The first run only warms the caches; then linear and auto alternate.
        runs = ["linear"] + [head for _ in range(args.timing_runs) for head in ("linear", "auto")]
        for number, head in enumerate(runs):
            seconds, _, _ = run_train_head(tmp / "photos", tmp / "out", "bench", str(number + 1), "--backbone",
                                           args.backbone, "--cache-dir", str(args.cache_dir), "--head", head, "--force",
                                           env=env, timeout=600)
            if number:
                timings[head].append(seconds)
                logger.info("train_head --head %s warm: %.1fs", head, seconds)
    timings["command"] = ("python training/train_head.py PHOTOS(clothing10, 5 classes x 20) --backbone "
                          f"{args.backbone} --head {{linear,auto}} (feature cache warm)")
    return timings


def ci(values: list[float]) -> str:
    mean, half = mean_ci95(values)
    return f"{mean:.3f} ± {half:.3f}"


def markdown(part1: dict, costs: dict, part2: list[dict], timing: dict | None, args, seconds: float) -> str:
    lines = ["# Open-set rule and `--head auto`", "",
             f"Command: `.venv/bin/python -m benchmarks.bench_openset {' '.join(sys.argv[1:])}` (total {seconds / 60:.1f} min, "
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}).", "",
             f"Machine: {machine_description()}.", "",
             f"Load average (1 min) at the end {os.getloadavg()[0]:.1f}, this benchmark's own load included "
             "(about 1 when nothing else runs): times are only comparable within one run.", "",
             f"Backbone {args.backbone} (frozen). Known classes: {args.ways} random classes per episode, {args.shots} "
             f"training photos each, {args.episodes} seeded episodes; known = val photos of those classes; near "
             "unknowns = val photos of the set's other classes; far unknowns = val photos of the other shared sets. "
             f"Head `{args.head}`, rule at keep {args.keep}. FPR@95 and AUROC use each score's own threshold keeping "
             "95% of the known val photos (the usual definition); 'kept' and 'rejected' use the rule's threshold "
             "calibrated on the training photos; 'unseen train photos kept': the same threshold on the train-split photos of "
             "the episode's classes that the episode did not draw. Mean ± half-width of the 95% interval over episodes.", ""]
    lines += ["## Part 1: the rule", "",
              "| known set | rule | far AUROC | far FPR@95 | near AUROC | near FPR@95 | known kept | unseen train photos "
              "kept | far rejected | near rejected | accuracy without rule | accuracy with rule | accuracy on kept |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, results in part1.items():
        get = lambda key: ci([r[key] for r in results])  # noqa: E731
        rules = ", ".join(f"{k} x{v}" for k, v in Counter(r["rule"] for r in results).items())
        lines.append(f"| {name} | {rules} | {get(f'{RULE}|far_auroc')} | {get(f'{RULE}|far_fpr95')} | "
                     f"{get(f'{RULE}|near_auroc')} | {get(f'{RULE}|near_fpr95')} | {get('known_kept')} | "
                     f"{get('undrawn_kept')} | {get('far_rejected')} | {get('near_rejected')} | {get('accuracy_without_rule')} | "
                     f"{get('accuracy_with_rule')} | {get('accuracy_on_kept')} |")
    lines += ["", "Other scores on the same episodes and heads (AUROC / FPR@95):", "",
              "| known set | score | near AUROC | near FPR@95 | far AUROC | far FPR@95 |", "|---|---|---|---|---|---|"]
    for name, results in part1.items():
        for score in OTHER_SCORES:
            get = lambda key: ci([r[f"{score}|{key}"] for r in results])  # noqa: E731
            lines.append(f"| {name} | {score} | {get('near_auroc')} | {get('near_fpr95')} | {get('far_auroc')} | "
                         f"{get('far_fpr95')} |")
    lines += ["", "Heads chosen by auto in part 1: " + "; ".join(
        f"{name}: " + ", ".join(f"{k} x{v}" for k, v in Counter(f"{r['head']} p{r['power']:g}" for r in results).items())
        for name, results in part1.items()) + ".", "",
        f"Cost of the rule (in-process, numpy, median of 300): {costs['batch 1']:.3f} ms for one photo, "
        f"{costs['batch 8']:.3f} ms per photo in a batch of 8 (rule {costs['rule']}, {costs['training_photos']} training photos).", ""]
    if part2:
        lines += ["## Part 2: `--head auto`", "",
                  "Accuracy on the val photos of each episode's classes (rule off), each head fitted as train_head "
                  "fits it. 'auto - best' is auto minus the better of linear and prototype (mean over episodes).", "",
                  "| set | ways | k | linear | prototype | auto | auto - best | auto chose | fit s (linear / auto) |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for row in part2:
            results = row["results"]
            best = max(statistics.mean(r["linear"] for r in results), statistics.mean(r["prototype"] for r in results))
            gap = statistics.mean(r["auto"] for r in results) - best
            chose = ", ".join(f"{k} x{v}" for k, v in Counter(r["choice"] for r in results).most_common())
            fit_s = (f"{statistics.mean(r['linear|seconds'] for r in results):.2f} / "
                     f"{statistics.mean(r['auto|seconds'] for r in results):.2f}")
            lines.append(f"| {row['dataset']} | {row['ways']} | {row['shots']} | "
                         f"{ci([r['linear'] for r in results])} | {ci([r['prototype'] for r in results])} | "
                         f"{ci([r['auto'] for r in results])} | {gap:+.3f} | {chose} | {fit_s} |")
    lines += ["", "## Targets (issue 12)", ""] + targets(part1, part2, costs)
    if timing:
        lines += ["", f"Warm train_head wall time (process start to exit; {timing['command']}): linear "
                  + ", ".join(f"{t:.1f} s" for t in timing["linear"]) + "; auto "
                  + ", ".join(f"{t:.1f} s" for t in timing["auto"]) + " (runs alternated)."]
    return "\n".join(lines) + "\n"


def targets(part1: dict, part2: list[dict], costs: dict) -> list[str]:
    """One line per target of issue 12: the measured mean and met / MISSED (computed, not typed)."""
    lines = []

    def check(text: str, value: float, ok: bool) -> None:
        lines.append(f"- {text}: {value:.3f} -> {'met' if ok else 'MISSED'}")

    for name, results in part1.items():
        mean = lambda key: statistics.mean(r[key] for r in results)  # noqa: E731
        check(f"{name}: far FPR@95 <= 0.05", mean(f"{RULE}|far_fpr95"), mean(f"{RULE}|far_fpr95") <= 0.05)
        check(f"{name}: far AUROC >= 0.99", mean(f"{RULE}|far_auroc"), mean(f"{RULE}|far_auroc") >= 0.99)
        check(f"{name}: near AUROC >= 0.85", mean(f"{RULE}|near_auroc"), mean(f"{RULE}|near_auroc") >= 0.85)
        change = mean("accuracy_with_rule") - mean("accuracy_without_rule")
        check(f"{name}: closed-set accuracy change within 0.5 points", change, abs(change) <= 0.005)
        check(f"{name}: known kept 0.95 ± 0.02", mean("known_kept"), abs(mean("known_kept") - 0.95) <= 0.02)
        check(f"{name}: unseen train-split photos kept 0.95 ± 0.02 (calibration check, not an issue target)",
              mean("undrawn_kept"), abs(mean("undrawn_kept") - 0.95) <= 0.02)
    if costs:
        check("rule cost per photo < 1 ms (one photo)", costs["batch 1"], costs["batch 1"] < 1.0)
    goals = {("hymenoptera", 2, 20): 0.95, ("clothing10", 5, 20): 0.89, ("signdigits10", 10, 20): 0.93}
    worst = None
    for row in part2:
        results = row["results"]
        auto = statistics.mean(r["auto"] for r in results)
        best = max(statistics.mean(r["linear"] for r in results), statistics.mean(r["prototype"] for r in results))
        if worst is None or auto - best < worst[0]:
            worst = (auto - best, f"{row['dataset']} {row['ways']}-way {row['shots']}-shot")
        goal = goals.get((row["dataset"], row["ways"], row["shots"]))
        if goal is not None:
            check(f"{row['dataset']} {row['ways']}-way {row['shots']}-shot auto >= {goal}", auto, auto >= goal)
    if worst is not None:
        check(f"auto never more than 1 point below the better of linear/prototype (worst row: {worst[1]})",
              worst[0], worst[0] >= -0.01)
    return lines


def main(args: argparse.Namespace) -> str:
    if args.episodes < 2 or args.ways < 2 or args.shots < 1:
        raise ValueError("--episodes and --ways must be at least 2, --shots at least 1")
    started = time.perf_counter()
    extractor = FeatureExtractor(args.backbone, cache_dir=args.cache_dir, progress=False)
    sets = {name: set_features(extractor, args.datasets_dir / name, args.views) for name in SHARED_SETS}
    part1, costs = {}, {}
    for name in [n for n in args.known.split(",") if n]:
        far = np.concatenate([sets[other]["val"] for other in SHARED_SETS if other != name])
        part1[name] = []
        for seed in range(args.episodes):
            part1[name].append(openset_episode(sets[name], far, args, seed))
            logger.info("%s episode %d: %s", name, seed, json.dumps({k: round(v, 3) if isinstance(v, float) else v
                                                                    for k, v in part1[name][-1].items() if "|" not in k}))
        costs = rule_cost(sets[name], args)
    part2 = []
    rows = [(name, args.ways, k) for name in SHARED_SETS for k in [int(k) for k in args.auto_shots.split(",") if k]]
    rows += [(name, int(ways), int(k)) for name, ways, k in (e.split(":") for e in args.auto_extra.split(",") if e)] \
        if args.auto_shots else []
    for name, ways, shots in rows:
        results = [accuracy_episode(sets[name], ways, shots, seed) for seed in range(args.episodes)]
        ways = min(ways, len(sets[name]["classes"]))
        part2.append({"dataset": name, "ways": ways, "shots": shots, "results": results})
        logger.info("%s %d-way %d-shot: %s", name, ways, shots, ", ".join(
            f"{k} {statistics.mean(r[k] for r in results):.3f}" for k in ("linear", "prototype", "auto")))
    timing = time_train_head(args) if args.timing_runs else None
    text = markdown(part1, costs, part2, timing, args, time.perf_counter() - started)
    if args.json:
        args.json.write_text(json.dumps({"part1": part1, "costs": costs, "part2": part2, "timing": timing}, indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        logger.info("wrote %s", args.out)
    return text


if __name__ == "__main__":
    run_cli(main, get_args_parser(), {ValueError: EXIT_BAD_ARGUMENTS}, logger=logger, output=str.rstrip)
