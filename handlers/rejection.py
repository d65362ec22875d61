"""Rejection rules: when a photo belongs to none of a head's classes ("unknown").

A rule is fitted at training time from the training photos alone (no photos of unknowns): a score
that is high for photos like the training photos, and a threshold chosen so that a stated share of
known photos (``keep``) scores above it. The threshold is calibrated on held-out scores of the
training photos (each photo scored by a rule fitted without it, never against itself or its own
augmented views; the quantile corrected for their small number: ``unbiased_lower_quantile``), not on
the validation split, so the validation split stays an honest estimate of the keep rate. The
calibration scores are stored, so another keep rate maps to a threshold at serving time.

Scores (higher: more like the training photos):

- ``rmd``, the default when every class has at least ``RelativeMahalanobisRejection.MIN_PHOTOS``
  training photos: relative Mahalanobis distance (Ren et al., "A Simple Fix to Mahalanobis Distance
  for Improving Near-OOD Detection", 2021; the class-conditional Gaussians of Lee et al., NeurIPS
  2018) on square-rooted, L2-normalised backbone features, with a covariance shrunk towards the
  identity (a few dozen photos cannot estimate a 1280-d covariance). On this project's features it
  separates photos of other classes of the same kind ("near" unknowns: other clothes, other hand
  signs) better than kNN (near AUROC 0.77 vs 0.71 on clothing10, 0.88 vs 0.78 on signdigits10),
  with far unknowns still all rejected (docs/bench/openset.md).
- ``knn``: cosine similarity to the nearest training photo (deep nearest neighbours, Sun et al.,
  "Out-of-Distribution Detection with Deep Nearest Neighbors", ICML 2022), on L2-normalised
  features: for fewer photos per class, and what archives made before ``rmd`` carry.

Both separate photos of other kinds far better than scores read from the head's logits (max
softmax, Hendrycks and Gimpel 2017; energy, Liu et al. 2020), which a classifier trained on a few
classes is confidently wrong about.

Runtime code: no training imports, numpy only (a warm train_head never imports torch). A rule rides
inside its head's state (``state()`` / ``load_state()``: named numpy arrays), and ``rule_for_state``
tells which rule a saved state holds.
"""

from __future__ import annotations

import math
from typing import ClassVar

import numpy as np

from handlers.arrays import l2_normalise

DEFAULT_KEEP = 0.95


def validate_keep(keep: float) -> float:
    """``keep`` as a float in (0, 1]; ValueError otherwise (1 keeps every photo: no rejection)."""
    try:
        value = float(keep)
    except (TypeError, ValueError):
        raise ValueError(f"keep must be a number in (0, 1], got {keep!r}") from None
    if not (math.isfinite(value) and 0.0 < value <= 1.0):
        raise ValueError(f"keep must be in (0, 1] (the share of known photos to keep), got {keep!r}")
    return value


def unbiased_lower_quantile(sorted_scores: np.ndarray, share: float) -> float:
    """The score below which an unseen photo falls with probability ``share``, from (K,) ascending
    scores of K photos drawn like it: the order statistic at 1-based position (K + 1) * share,
    interpolated (Hyndman and Fan 1996, definition 6; as in split conformal prediction, an unseen
    photo falls below the k-th smallest of K exchangeable scores with probability k / (K + 1)).
    torch.quantile's default (definition 7, position 1 + (K - 1) * share) sits about one order
    statistic higher at K = 100, share 0.05: it kept 0.939 of unseen clothing10 training photos
    instead of 0.95 (docs/bench/openset.md). Positions outside [1, K] clamp to the extremes."""
    count = len(sorted_scores)
    position = min(max((count + 1) * share, 1.0), float(count))
    below = math.floor(position)
    lower = float(sorted_scores[below - 1])
    if below == count:
        return lower
    return lower + (position - below) * (float(sorted_scores[below]) - lower)


class RejectionRule:
    """Base of the rules. ``score``: features (N, D) -> (N,) known-ness (higher: more like the
    training photos; a photo below ``threshold`` is "unknown").

    Arrays shared by every rule (empty until ``fit``; an empty rule rejects nothing):
    ``calibration`` (K,) sorted held-out scores of the K training photos; ``keep`` () the share of
    known photos the default threshold keeps; ``threshold`` () that threshold. All float32, as
    stored: the served comparison ``score < threshold`` is between float32 numbers.
    """

    kind: ClassVar[str]
    # The arrays ``state()`` saves, by name (also the keys of the torch state_dicts of older archives).
    STATE: ClassVar[tuple[str, ...]] = ("calibration", "keep", "threshold")

    def __init__(self, feature_dim: int):
        self.feature_dim = feature_dim
        self.calibration = np.zeros(0, np.float32)
        self.keep = np.array(1.0, np.float32)
        self.threshold = np.array(-math.inf, np.float32)

    @property
    def fitted(self) -> bool:
        return self.calibration.size > 0

    def score(self, features: np.ndarray) -> np.ndarray:
        """(N, D) backbone features -> (N,) known-ness; +inf (keep) for every photo when unfitted."""
        if not self.fitted:
            return np.full(features.shape[0], np.inf, np.float32)
        return self._score(np.asarray(features, np.float32))

    def _score(self, features: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _calibrate(self, heldout: np.ndarray, keep: float) -> dict:
        """Store (K,) held-out scores of the training photos and the threshold keeping ``keep``."""
        self.calibration = np.sort(heldout[np.isfinite(heldout)]).astype(np.float32)
        self.keep = np.array(keep, np.float32)
        self.threshold = np.array(self.threshold_for(keep), np.float32)
        threshold = float(self.threshold)
        # None, not -inf, when nothing is rejected: manifests are strict JSON (no -Infinity).
        return {"score": self.kind, "keep": keep, "threshold": round(threshold, 6) if math.isfinite(threshold) else None,
                "calibration_photos": int(self.calibration.size)}

    def threshold_for(self, keep: float) -> float:
        """The score below which a photo is rejected, keeping about ``keep`` of unseen photos drawn
        like the training photos; -inf (reject nothing) for keep 1 or an unfitted rule."""
        keep = validate_keep(keep)
        if keep >= 1.0 or self.calibration.size == 0:
            return -math.inf
        return unbiased_lower_quantile(self.calibration, 1.0 - keep)

    def state(self, prefix: str = "") -> dict[str, np.ndarray]:
        """The rule's arrays by name (``prefix`` + name), as ``load_state`` reads them back."""
        return {prefix + name: np.asarray(getattr(self, name)) for name in self.STATE}

    def load_state(self, state: dict[str, np.ndarray], prefix: str = "") -> set[str]:
        """Take each array present under ``prefix`` (its shape is the training set's, so it comes
        from the state), in the dtype the rule keeps; returns the keys it used. An archive made
        before rules existed has none of these keys: the rule stays empty (off)."""
        used = set()
        for name in self.STATE:
            key = prefix + name
            if key in state:
                setattr(self, name, np.array(state[key], dtype=np.asarray(getattr(self, name)).dtype))
                used.add(key)
        return used


def first_row_of_each_group(groups: np.ndarray) -> np.ndarray:
    """(P,) index of each group's first row (a photo's plain view), groups in ascending id order."""
    return np.unique(groups, return_index=True)[1]


class KnnRejection(RejectionRule):
    """Nearest-training-photo rule. ``score``: features (N, D) -> (N,) cosine to the nearest bank row.

    Arrays besides the shared ones: ``bank`` (M, D) unit-norm training features (train_head stores
    each photo's plain view); ``calibration`` holds leave-one-out scores.
    """

    kind = "knn"
    STATE = (*RejectionRule.STATE, "bank")

    def __init__(self, feature_dim: int):
        super().__init__(feature_dim)
        self.bank = np.zeros((0, feature_dim), np.float32)

    @property
    def fitted(self) -> bool:
        return self.bank.shape[0] > 0 and self.calibration.size > 0

    @staticmethod
    def embed(features: np.ndarray) -> np.ndarray:
        """(N, D) -> (N, D) unit vectors. No centring: on the training mean of a few classes it
        measured worse for far unknowns (AUROC 0.981 vs 1.000, docs/bench/openset.md)."""
        return l2_normalise(np.asarray(features, np.float32))

    def _score(self, features: np.ndarray) -> np.ndarray:
        return (self.embed(features) @ self.bank.T).max(axis=1)

    def fit(self, features: np.ndarray, groups: np.ndarray, keep: float = DEFAULT_KEEP,
            labels: np.ndarray | None = None) -> dict:
        """``features`` (M, D): training rows; ``groups`` (M,): the image of each row (augmented views
        share their photo's id; the first row of each group is the photo's plain view); ``labels``
        (M,) accepted for a common signature and unused."""
        keep = validate_keep(keep)
        bank = self.embed(features)
        similarity = bank @ bank.T
        same_photo = groups[:, None] == groups[None, :]
        similarity[same_photo] = -np.inf
        # One calibration score per photo, from its plain view (what a served photo looks like); a
        # lone photo has no neighbour to be scored against (-inf, dropped).
        self.bank = bank
        summary = self._calibrate(similarity[first_row_of_each_group(groups)].max(axis=1), keep)
        return {**summary, "bank_rows": int(self.bank.shape[0])}


def _shrunk_gaussian(residuals: np.ndarray, shrinkage: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Precision of the covariance of (n, D) ``residuals`` shrunk towards the identity:
    inv((1 - s) S + s v I) with S = R^T R / n and v = trace(S) / D, kept in low-rank form (Woodbury):
    ``scale`` * (I - B diag(w) B^T). Returns (basis B (D, r), weights w (r,), scale ()), r <= n."""
    count, dim = residuals.shape
    variance = max(np.square(residuals).sum() / np.float32(count * dim), np.float32(1e-12))
    # The eigenvectors of S from the small (n, n) Gram matrix R R^T instead of an SVD of R: the same
    # directions (R^T u / sigma), 4-8x faster at n ~ 100, D = 1280, where the calibration's 42 fits
    # were most of a warm train_head's fit. float64, because the Gram matrix squares R's condition.
    r64 = residuals.astype(np.float64)
    squared, left = np.linalg.eigh(r64 @ r64.T)  # ascending sigma^2, (n,) and (n, n)
    squared, left = squared[::-1].clip(min=0.0), left[:, ::-1]
    eigen = (1.0 - shrinkage) * squared / count
    weights = eigen / (eigen + shrinkage * float(variance))
    useful = weights > 1e-6  # directions the residuals do not span add nothing
    basis = (r64.T @ left[:, useful]) / np.sqrt(squared[useful])  # (D, r) unit columns
    return (np.ascontiguousarray(basis, dtype=np.float32), weights[useful].astype(np.float32),
            np.array(1.0 / (shrinkage * variance), np.float32))


def _squared_distances(z: np.ndarray, means: np.ndarray, basis: np.ndarray, weights: np.ndarray,
                       scale: np.ndarray) -> np.ndarray:
    """(N, D) points, (K, D) means and a low-rank precision -> (N, K) squared Mahalanobis distances."""
    euclidean = np.maximum(np.square(z).sum(1, keepdims=True) - 2.0 * z @ means.T + np.square(means).sum(1), 0)
    projected = (z @ basis)[:, None, :] - (means @ basis)[None, :, :]  # (N, K, r)
    return scale * (euclidean - (np.square(projected) * weights).sum(-1))


class RelativeMahalanobisRejection(RejectionRule):
    """Relative Mahalanobis rule (Ren et al. 2021). ``score``: features (N, D) -> (N,)
    ``-min_c (d_c(z) - d_0(z))``: d_c the squared Mahalanobis distance to class c's mean under the
    shared within-class covariance, d_0 the one to the mean of all training photos under their
    covariance (the "background": subtracting it cancels what every photo of this kind shares),
    z = L2-normalised square root of the features. Covariances shrunk towards the identity.

    Arrays besides the shared ones: ``class_means`` (C, D); ``class_basis`` (D, r), ``class_weights``
    (r,), ``class_scale`` (): the within-class precision (``_shrunk_gaussian``); ``background_mean``
    (D,), ``background_basis`` (D, r0), ``background_weights`` (r0,), ``background_scale`` ().
    ``calibration`` holds scores of each training photo by a rule fitted without its fold.
    """

    kind = "rmd"
    PARAMETERS = ("class_means", "class_basis", "class_weights", "class_scale", "background_mean",
                  "background_basis", "background_weights", "background_scale")
    STATE = (*RejectionRule.STATE, *PARAMETERS)
    # Shrinkage towards the identity: 0.9 and 0.95 measured within noise of each other (near AUROC on
    # clothing10 / signdigits10 episodes other than the benchmark's); 0.8 and 0.98 lower on one set.
    SHRINKAGE = 0.9
    # Below this many training photos in some class the kNN rule is used instead. The Mahalanobis
    # rule ranks better from 2 photos per class on (near AUROC, clothing10 5-way, 10 episodes: 0.717
    # vs 0.685 at 2, 0.728 vs 0.674 at 5), but its held-out calibration (class means from fewer photos
    # than the served rule's) keeps more than asked with few photos: 0.99 of clothing10 val photos at
    # keep 0.95 with 2-5 photos per class, 0.97 with 10, 0.95 with 20.
    MIN_PHOTOS = 5
    # Held-out folds of the calibration: more folds fit each held-out score on more photos, as the
    # served rule is fitted on all (10 folds kept 0.97 of unseen clothing10 photos at keep 0.95, 20: 0.96).
    FOLDS = 20

    def __init__(self, feature_dim: int):
        super().__init__(feature_dim)
        self.class_means = np.zeros((0, feature_dim), np.float32)
        self.class_basis = np.zeros((feature_dim, 0), np.float32)
        self.class_weights = np.zeros(0, np.float32)
        self.class_scale = np.array(1.0, np.float32)
        self.background_mean = np.zeros(feature_dim, np.float32)
        self.background_basis = np.zeros((feature_dim, 0), np.float32)
        self.background_weights = np.zeros(0, np.float32)
        self.background_scale = np.array(1.0, np.float32)

    @property
    def fitted(self) -> bool:
        return self.class_means.shape[0] > 0 and self.calibration.size > 0

    @staticmethod
    def embed(features: np.ndarray) -> np.ndarray:
        """(N, D) -> (N, D): sign-preserving square root (Hu et al. 2021; makes the skewed activations
        closer to Gaussian: near AUROC +0.01 on both sets), then L2 (+0.03 to +0.05 on clothing10)."""
        features = np.asarray(features, np.float32)
        return l2_normalise(np.sign(features) * np.sqrt(np.abs(features)))

    @classmethod
    def applies(cls, labels: np.ndarray | None) -> bool:
        """Whether (M,) photo labels give every class enough photos for this rule."""
        return labels is not None and len(labels) > 0 and int(np.bincount(labels).min()) >= cls.MIN_PHOTOS

    @staticmethod
    def _estimate(z: np.ndarray, labels: np.ndarray, num_classes: int, shrinkage: float) -> dict:
        means = np.zeros((num_classes, z.shape[1]), np.float32)
        np.add.at(means, labels, z)
        means /= np.maximum(np.bincount(labels, minlength=num_classes), 1)[:, None].astype(np.float32)
        background = z.mean(0)
        class_basis, class_weights, class_scale = _shrunk_gaussian(z - means[labels], shrinkage)
        background_basis, background_weights, background_scale = _shrunk_gaussian(z - background, shrinkage)
        return {"class_means": means, "class_basis": class_basis, "class_weights": class_weights,
                "class_scale": class_scale, "background_mean": background, "background_basis": background_basis,
                "background_weights": background_weights, "background_scale": background_scale}

    @staticmethod
    def _relative_score(z: np.ndarray, p: dict) -> np.ndarray:
        """(N, D) embedded features and the rule's parameters -> (N,) known-ness."""
        per_class = _squared_distances(z, p["class_means"], p["class_basis"], p["class_weights"], p["class_scale"])
        background = _squared_distances(z, p["background_mean"][None, :], p["background_basis"],
                                        p["background_weights"], p["background_scale"])
        return -(per_class - background).min(axis=1)

    def _score(self, features: np.ndarray) -> np.ndarray:
        return self._relative_score(self.embed(features), {name: getattr(self, name) for name in self.PARAMETERS})

    def fit(self, features: np.ndarray, groups: np.ndarray, keep: float = DEFAULT_KEEP,
            labels: np.ndarray | None = None) -> dict:
        """``features`` (M, D) training rows, ``groups`` (M,) the image of each row, ``labels`` (M,) in
        [0, C). Only each photo's plain view (its group's first row) is used. Calibration: photos of
        each class dealt round-robin into ``FOLDS`` folds; each fold scored by a rule fitted on the others."""
        keep = validate_keep(keep)
        if labels is None:
            raise ValueError("the relative Mahalanobis rule needs the training labels")
        plain = first_row_of_each_group(groups)
        z, labels = self.embed(features[plain]), labels[plain]
        if not self.applies(labels):
            raise ValueError(f"the relative Mahalanobis rule needs at least {self.MIN_PHOTOS} photos per class")
        num_classes = int(labels.max()) + 1
        folds = min(self.FOLDS, len(labels))
        fold = np.empty(len(labels), np.int64)
        offset = 0
        for label in range(num_classes):
            members = np.flatnonzero(labels == label)
            fold[members] = (np.arange(len(members)) + offset) % folds
            offset += len(members)  # classes start on different folds: folds stay balanced in size
        heldout = np.empty(len(labels), np.float32)
        for index in range(folds):
            held = fold == index
            if held.any():
                fitted = self._estimate(z[~held], labels[~held], num_classes, self.SHRINKAGE)
                heldout[held] = self._relative_score(z[held], fitted)
        for name, value in self._estimate(z, labels, num_classes, self.SHRINKAGE).items():
            setattr(self, name, np.asarray(value, np.float32))
        return {**self._calibrate(heldout, keep), "shrinkage": self.SHRINKAGE, "folds": folds,
                "rank": int(self.class_basis.shape[1])}


RULES: dict[str, type[RejectionRule]] = {rule.kind: rule for rule in (KnnRejection, RelativeMahalanobisRejection)}


def rule_for_labels(feature_dim: int, labels: np.ndarray | None) -> RejectionRule:
    """The rule to fit for (M,) training labels: relative Mahalanobis where every class has enough
    photos, else kNN."""
    return (RelativeMahalanobisRejection if RelativeMahalanobisRejection.applies(labels) else KnnRejection)(feature_dim)


def rule_for_state(state: dict, prefix: str, feature_dim: int) -> RejectionRule:
    """An empty rule of the kind whose arrays a saved head state holds under ``prefix`` ("...rejection.").
    kNN archives (and archives made before rules: an empty kNN rule, off) load as they were saved."""
    if prefix + "class_means" in state:
        return RelativeMahalanobisRejection(feature_dim)
    return KnnRejection(feature_dim)
