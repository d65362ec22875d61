"""``--head auto``: choose the head and its settings by cross-validation on the training photos only.

Neither head is best everywhere (docs/BENCHMARKS.md): the linear head wins where classes need a
learned boundary (hand signs), the prototype head where a few shots make a boundary noisy. ``auto``
scores every candidate (head kind, including the ensemble of both heads, feature power transform,
augmented views, weight decay) by
stratified k-fold cross-validation over the training *photos* (a photo's augmented views stay in
its fold), picks the best mean accuracy (ties: lower log-loss, then the simpler candidate), and the
caller refits that candidate on all training photos. The validation split is never looked at.
"""

from __future__ import annotations

import logging
import random
from dataclasses import asdict, dataclass

import numpy as np

from handlers.arrays import cross_entropy
from handlers.heads import build_head

logger = logging.getLogger(__name__)

POWERS = (1.0, 0.5)  # no transform; square root (Hu et al. 2021)
# The linear head's strengths searched (a subset of LinearHead.WEIGHT_DECAYS: each costs one fit per
# fold; neighbouring strengths measured within noise of each other).
WEIGHT_DECAYS = (1e-4, 1e-3, 1e-2)
# Two candidates closer than this in cross-validated accuracy are a tie (a fold of 20 photos moves
# accuracy in steps of 0.05; the log-loss then decides).
TIE = 0.005
MAX_FOLDS = 4


@dataclass(frozen=True)
class Candidate:
    kind: str  # "linear", "prototype" or "ensemble"
    power: float = 1.0  # feature power transform (FeatureHead.transform)
    views: bool = False  # augmented views of each photo as extra training rows
    weight_decay: float | None = None  # linear head only

    def describe(self) -> str:
        parts = [self.kind, f"power {self.power:g}", "views" if self.views else "plain view"]
        if self.weight_decay is not None:
            parts.append(f"weight decay {self.weight_decay:g}")
        return ", ".join(parts)

    def fit_options(self) -> dict:
        options = {"power": self.power}
        if self.weight_decay is not None:
            options["weight_decay"] = self.weight_decay
        return options


def candidates(has_views: bool) -> list[Candidate]:
    """The search space, simplest first (the order breaks exact ties). The linear head trains on
    augmented views when there are any (they help it; they slightly hurt class means:
    docs/BENCHMARKS.md), the prototype head on the plain views."""
    found = [Candidate("prototype", power) for power in POWERS]
    for power in POWERS:
        found += [Candidate("linear", power, has_views, wd) for wd in WEIGHT_DECAYS]
    # Both heads' probabilities averaged (handlers/heads.py EnsembleHead), its linear member choosing
    # its own weight decay: one candidate, at power 1 (measured above power 0.5 on clothing10, where the
    # ensemble wins; on signdigits10 the linear head wins at either power).
    found.append(Candidate("ensemble", 1.0, has_views))
    return found


def stratified_folds(labels: np.ndarray, folds: int, seed: int) -> list[np.ndarray]:
    """Photo indices of each fold; every class's photos dealt round-robin after a seeded shuffle."""
    rng = random.Random(seed)
    assignment = np.empty(len(labels), np.int64)
    offset = 0
    for label in np.unique(labels).tolist():
        members = np.flatnonzero(labels == label).tolist()
        rng.shuffle(members)
        for position, member in enumerate(members):
            assignment[member] = (position + offset) % folds
        offset += len(members)  # classes start on different folds: folds stay balanced in size
    return [np.flatnonzero(assignment == fold) for fold in range(folds)]


def _rows(plain: np.ndarray, augmented: np.ndarray | None, labels: np.ndarray, photos: np.ndarray):
    """Training rows of ``photos``: (rows (M, D), labels (M,), groups (M,))."""
    rows, row_labels, groups = [plain[photos]], [labels[photos]], [photos]
    if augmented is not None:
        views = augmented.shape[1]
        rows.append(augmented[photos].reshape(-1, augmented.shape[-1]))
        row_labels.append(np.repeat(labels[photos], views))
        groups.append(np.repeat(photos, views))
    return np.concatenate(rows), np.concatenate(row_labels), np.concatenate(groups)


def cross_validate(candidate: Candidate, plain: np.ndarray, augmented: np.ndarray | None, labels: np.ndarray,
                   num_classes: int, folds: list[np.ndarray], seed: int = 0) -> dict:
    """Mean held-out accuracy and log-loss of ``candidate`` over ``folds``.

    ``plain`` (N, D) one row per photo; ``augmented`` (N, V, D) or None; ``labels`` (N,)."""
    correct, nll, count = 0, 0.0, 0
    everyone = np.arange(len(labels))
    for held in folds:
        if not len(held):
            continue
        train = everyone[~np.isin(everyone, held)]
        rows, row_labels, groups = _rows(plain, augmented if candidate.views else None, labels, train)
        head = build_head(candidate.kind, plain.shape[1], num_classes)
        head.fit(rows, row_labels, groups=groups, seed=seed, **candidate.fit_options())
        logits = head(plain[held])
        correct += int((logits.argmax(1) == labels[held]).sum())
        nll += cross_entropy(logits, labels[held], reduction="sum")
        count += len(held)
    return {"accuracy": correct / count, "nll": nll / count}


def choose_head(plain: np.ndarray, augmented: np.ndarray | None, labels: np.ndarray, num_classes: int,
                seed: int = 0, space: list[Candidate] | None = None) -> tuple[Candidate, dict]:
    """The best candidate by cross-validation on the training photos, and a report of every score.

    ``plain`` (N, D): each training photo's plain-view features; ``augmented`` (N, V, D) or None;
    ``labels`` (N,) in [0, C); ``space``: the candidates (default ``candidates()``). With a single
    photo in some class nothing can be held out: the linear head is chosen, as ``--head linear``
    fits it (at one shot it measured 0.01 above the prototype head on all three shared sets,
    docs/bench/openset.md)."""
    smallest = int(np.bincount(labels, minlength=num_classes).min())
    n_folds = min(MAX_FOLDS, smallest)
    if n_folds < 2:
        choice = Candidate("linear", views=augmented is not None and augmented.shape[1] > 0)
        return choice, {"choice": asdict(choice), "reason": "a class has a single training photo: nothing to "
                        "cross-validate; linear head as --head linear fits it", "cross_validated": {}}
    folds = stratified_folds(labels, n_folds, seed)
    scores = {}
    best, best_score = None, None
    for candidate in space or candidates(augmented is not None and augmented.shape[1] > 0):
        score = cross_validate(candidate, plain, augmented, labels, num_classes, folds, seed)
        scores[candidate.describe()] = {k: round(v, 4) for k, v in score.items()}
        if best is None or score["accuracy"] > best_score["accuracy"] + TIE or (
                abs(score["accuracy"] - best_score["accuracy"]) <= TIE and score["nll"] < best_score["nll"]):
            best, best_score = candidate, score
    logger.info("auto: %d-fold cross-validation on %d training photos chose %s (accuracy %.3f, log-loss %.3f)",
                n_folds, len(labels), best.describe(), best_score["accuracy"], best_score["nll"])
    return best, {"choice": asdict(best), "folds": n_folds, "photos": len(labels),
                  "cross_validated": scores, "chosen_score": {k: round(v, 4) for k, v in best_score.items()}}
