"""Honest evaluation of a head on held-out images: metrics, a printed table, a JSON report and a
confusion-matrix PNG (drawn with Pillow, no plotting library). numpy arrays in: a warm train_head
never imports torch (1.7 s of its 2 s budget)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont


def share(mask: np.ndarray) -> float:
    """The share of True in a boolean array (0.0 for an empty one), as an exact fraction."""
    return int(np.count_nonzero(mask)) / mask.size if mask.size else 0.0


def evaluate(probabilities: np.ndarray, labels: np.ndarray, classes: list[str]) -> dict:
    """Accuracy, balanced accuracy, NLL, per-class precision/recall/support and the confusion
    matrix (rows: true class, columns: predicted class) of (N, C) probabilities."""
    num_classes = len(classes)
    predicted = probabilities.argmax(axis=1)
    confusion = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(confusion, (labels, predicted), 1)
    per_class = {}
    recalls = []
    for index, name in enumerate(classes):
        true_positive = int(confusion[index, index])
        support = int(confusion[index].sum())
        predicted_count = int(confusion[:, index].sum())
        recall = true_positive / support if support else None
        precision = true_positive / predicted_count if predicted_count else None
        if recall is not None:
            recalls.append(recall)
        per_class[name] = {"precision": precision, "recall": recall, "support": support}
    n = len(labels)
    nll = float(-np.log(np.maximum(probabilities[np.arange(n), labels], 1e-12)).mean()) if n else None
    return {
        "images": n,
        "accuracy": share(predicted == labels) if n else None,
        "balanced_accuracy": sum(recalls) / len(recalls) if recalls else None,
        "nll": nll,
        "per_class": per_class,
        "confusion": confusion.tolist(),
    }


def format_table(metrics: dict) -> str:
    """Plain-text table of per-class precision and recall with overall accuracy."""
    def fmt(value):
        return "   -  " if value is None else f"{value:6.3f}"

    width = max(10, *(len(name) for name in metrics["per_class"]))
    lines = [f"{'class':<{width}}  precision  recall  support"]
    for name, row in metrics["per_class"].items():
        lines.append(f"{name:<{width}}     {fmt(row['precision'])}  {fmt(row['recall'])}  {row['support']:7d}")
    lines.append(f"{'accuracy':<{width}}     {fmt(metrics['accuracy'])}          {metrics['images']:7d}")
    lines.append(f"{'balanced':<{width}}     {fmt(metrics['balanced_accuracy'])}")
    return "\n".join(lines)


def write_report(path: Path, report: dict) -> Path:
    path.write_text(json.dumps(report, indent=1, sort_keys=True))
    return path


def draw_confusion(confusion: list[list[int]], classes: list[str], path: Path, title: str = "",
                   columns: list[str] | None = None) -> Path:
    """Confusion matrix as a PNG: rows true class (``classes``), columns predicted (``columns``,
    default the same names; e.g. the classes plus "unknown"); cell shade = row fraction."""
    font = ImageFont.load_default()
    columns = list(classes) if columns is None else columns
    n, n_cols = len(classes), len(columns)
    cell = 44 if max(n, n_cols) <= 12 else max(18, 528 // max(n, n_cols))
    label_width = 12 + max(font.getbbox(name)[2] for name in [*classes, *columns])
    top = 40 + label_width  # column labels are written rotated above the grid
    left = label_width + 16
    width, height = left + n_cols * cell + 20, top + n * cell + 40
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.text((10, 8), title or "confusion matrix (rows: true, columns: predicted)", fill="black", font=font)
    for row in range(n):
        total = sum(confusion[row]) or 1
        for col in range(n_cols):
            count = confusion[row][col]
            share = count / total
            # Right answers in blue, errors in red: the eye finds the confusions first.
            shade = int(255 * (1 - share))
            colour = (shade, shade, 255) if classes[row] == columns[col] else (255, shade, shade)
            x0, y0 = left + col * cell, top + row * cell
            draw.rectangle([x0, y0, x0 + cell, y0 + cell], fill=colour, outline=(180, 180, 180))
            text = str(count)
            box = font.getbbox(text)
            ink = "white" if share > 0.6 else "black"
            draw.text((x0 + (cell - box[2]) / 2, y0 + (cell - box[3]) / 2), text, fill=ink, font=font)
        draw.text((8, top + row * cell + cell / 2 - 5), classes[row], fill="black", font=font)
    for col, name in enumerate(columns):
        box = font.getbbox(name)
        label = Image.new("RGB", (box[2] + 4, box[3] + 4), "white")
        ImageDraw.Draw(label).text((2, 0), name, fill="black", font=font)
        label = label.rotate(90, expand=True)
        image.paste(label, (int(left + col * cell + cell / 2 - label.width / 2), top - label.height - 4))
    draw.text((left, top + n * cell + 12), "predicted ->", fill="black", font=font)
    image.save(path)
    return path


def auroc(known: np.ndarray, unknown: np.ndarray) -> float:
    """Area under the ROC curve of telling known from unknown photos by a score (higher: known),
    i.e. P(score of a known photo > score of an unknown one), ties counted half. (N,), (M,) -> float."""
    ordered = np.sort(np.asarray(unknown, np.float64))
    known = np.asarray(known, np.float64)
    below = np.searchsorted(ordered, known, side="left")
    at_or_below = np.searchsorted(ordered, known, side="right")
    return float((below + 0.5 * (at_or_below - below)).sum() / (len(known) * len(unknown)))


def fpr_at_keep(known: np.ndarray, unknown: np.ndarray, keep: float = 0.95) -> float:
    """FPR@95 (for keep 0.95): share of unknown photos accepted at the threshold that keeps ``keep``
    of the known photos (the threshold set on these known photos themselves: the usual benchmark)."""
    threshold = np.quantile(np.asarray(known, np.float64), 1.0 - keep)  # linear interpolation, as torch.quantile
    return share(np.asarray(unknown, np.float64) >= threshold)


def openset_confusion(predicted: np.ndarray, rejected: np.ndarray, labels: np.ndarray, num_classes: int,
                      unknown_predicted: np.ndarray | None = None, unknown_rejected: np.ndarray | None = None) -> list[list[int]]:
    """Confusion with an "unknown" column (index C): rows true class, columns predicted class or
    rejected. ``predicted`` (N,) argmax, ``rejected`` (N,) bool, ``labels`` (N,); photos of other
    kinds (``unknown_*``, (M,)) add an "unknown" row. (C or C+1) x (C+1) counts."""
    shown = np.where(rejected, num_classes, predicted)
    confusion = np.zeros((num_classes + 1, num_classes + 1), np.int64)
    np.add.at(confusion, (labels, shown), 1)
    if unknown_predicted is None:
        return confusion[:num_classes].tolist()
    shown = np.where(unknown_rejected, num_classes, unknown_predicted)
    confusion[num_classes] += np.bincount(shown, minlength=num_classes + 1)
    return confusion.tolist()


def mean_ci95(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% interval (Student t for the episode count)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, float("nan")
    variance = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, _t975(n - 1) * math.sqrt(variance / n)


def _t975(dof: int) -> float:
    table = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
             10: 2.228, 12: 2.179, 15: 2.131, 19: 2.093, 20: 2.086, 24: 2.064, 29: 2.045, 30: 2.042}
    if dof in table:
        return table[dof]
    below = [d for d in table if d < dof]
    return table[max(below)] if dof < 30 else 1.96 + 2.4 / dof
