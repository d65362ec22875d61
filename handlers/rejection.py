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

Runtime code: no training imports; a rule rides inside a head's state_dict, and ``rule_for_state``
tells which rule a saved state holds.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn


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


def unbiased_lower_quantile(sorted_scores: torch.Tensor, share: float) -> float:
    """The score below which an unseen photo falls with probability ``share``, from (K,) ascending
    scores of K photos drawn like it: the order statistic at 1-based position (K + 1) * share,
    interpolated (Hyndman and Fan 1996, definition 6; as in split conformal prediction, an unseen
    photo falls below the k-th smallest of K exchangeable scores with probability k / (K + 1)).
    torch.quantile's default (definition 7, position 1 + (K - 1) * share) sits about one order
    statistic higher at K = 100, share 0.05: it kept 0.939 of unseen clothing10 training photos
    instead of 0.95 (docs/bench/openset.md). Positions outside [1, K] clamp to the extremes."""
    count = sorted_scores.numel()
    position = min(max((count + 1) * share, 1.0), float(count))
    below = math.floor(position)
    lower = float(sorted_scores[below - 1])
    if below == count:
        return lower
    return lower + (position - below) * (float(sorted_scores[below]) - lower)


class RejectionRule(nn.Module):
    """Base of the rules. ``score``: features (N, D) -> (N,) known-ness (higher: more like the
    training photos; a photo below ``threshold`` is "unknown").

    Buffers shared by every rule (empty until ``fit``; an empty rule rejects nothing):
    ``calibration`` (K,) sorted held-out scores of the K training photos; ``keep`` () the share of
    known photos the default threshold keeps; ``threshold`` () that threshold.
    """

    kind: ClassVar[str]

    def __init__(self, feature_dim: int):
        super().__init__()
        self.feature_dim = feature_dim
        self.register_buffer("calibration", torch.zeros(0))
        self.register_buffer("keep", torch.tensor(1.0))
        self.register_buffer("threshold", torch.tensor(-math.inf))

    @property
    def fitted(self) -> bool:
        return self.calibration.numel() > 0

    def score(self, features: torch.Tensor) -> torch.Tensor:
        """(N, D) backbone features -> (N,) known-ness; +inf (keep) for every photo when unfitted."""
        if not self.fitted:
            return torch.full((features.shape[0],), math.inf)
        return self._score(features.float())

    def _score(self, features: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _calibrate(self, heldout: torch.Tensor, keep: float) -> dict:
        """Store (K,) held-out scores of the training photos and the threshold keeping ``keep``."""
        self.calibration = heldout[torch.isfinite(heldout)].sort().values
        self.keep = torch.tensor(keep)
        self.threshold = torch.tensor(self.threshold_for(keep))
        threshold = float(self.threshold)
        # None, not -inf, when nothing is rejected: manifests are strict JSON (no -Infinity).
        return {"score": self.kind, "keep": keep, "threshold": round(threshold, 6) if math.isfinite(threshold) else None,
                "calibration_photos": int(self.calibration.numel())}

    def threshold_for(self, keep: float) -> float:
        """The score below which a photo is rejected, keeping about ``keep`` of unseen photos drawn
        like the training photos; -inf (reject nothing) for keep 1 or an unfitted rule."""
        keep = validate_keep(keep)
        if keep >= 1.0 or self.calibration.numel() == 0:
            return -math.inf
        return unbiased_lower_quantile(self.calibration, 1.0 - keep)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # Buffer sizes are the training set's: take each buffer's shape from the saved state. An
        # archive made before rules existed has none of these keys: the rule stays empty (off).
        for name in list(self._buffers):
            key = prefix + name
            if key in state_dict:
                self._buffers[name] = state_dict[key].detach().clone().to(self._buffers[name].dtype)


def first_row_of_each_group(groups: torch.Tensor) -> torch.Tensor:
    """(P,) index of each group's first row (a photo's plain view), groups in ascending id order."""
    rows = torch.arange(len(groups))
    _, inverse = groups.unique(return_inverse=True)
    return torch.full((int(inverse.max()) + 1,), len(groups)).scatter_reduce(0, inverse, rows, "amin")


class KnnRejection(RejectionRule):
    """Nearest-training-photo rule. ``score``: features (N, D) -> (N,) cosine to the nearest bank row.

    Buffers besides the shared ones: ``bank`` (M, D) unit-norm training features (train_head stores
    each photo's plain view); ``calibration`` holds leave-one-out scores.
    """

    kind = "knn"

    def __init__(self, feature_dim: int):
        super().__init__(feature_dim)
        self.register_buffer("bank", torch.zeros(0, feature_dim))

    @property
    def fitted(self) -> bool:
        return self.bank.shape[0] > 0 and self.calibration.numel() > 0

    @staticmethod
    def embed(features: torch.Tensor) -> torch.Tensor:
        """(N, D) -> (N, D) unit vectors. No centring: on the training mean of a few classes it
        measured worse for far unknowns (AUROC 0.981 vs 1.000, docs/bench/openset.md)."""
        return F.normalize(features.float(), dim=1)

    def _score(self, features: torch.Tensor) -> torch.Tensor:
        return (self.embed(features) @ self.bank.T).max(dim=1).values

    @torch.no_grad()
    def fit(self, features: torch.Tensor, groups: torch.Tensor, keep: float = DEFAULT_KEEP,
            labels: torch.Tensor | None = None) -> dict:
        """``features`` (M, D): training rows; ``groups`` (M,): the image of each row (augmented views
        share their photo's id; the first row of each group is the photo's plain view); ``labels``
        (M,) accepted for a common signature and unused."""
        keep = validate_keep(keep)
        bank = self.embed(features)
        similarity = bank @ bank.T
        same_photo = groups[:, None] == groups[None, :]
        similarity.masked_fill_(same_photo, -math.inf)
        # One calibration score per photo, from its plain view (what a served photo looks like); a
        # lone photo has no neighbour to be scored against (-inf, dropped).
        self.bank = bank
        summary = self._calibrate(similarity[first_row_of_each_group(groups)].max(dim=1).values, keep)
        return {**summary, "bank_rows": int(self.bank.shape[0])}


def _shrunk_gaussian(residuals: torch.Tensor, shrinkage: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Precision of the covariance of (n, D) ``residuals`` shrunk towards the identity:
    inv((1 - s) S + s v I) with S = R^T R / n and v = trace(S) / D, kept in low-rank form (Woodbury):
    ``scale`` * (I - B diag(w) B^T). Returns (basis B (D, r), weights w (r,), scale ()), r <= n."""
    count, dim = residuals.shape
    variance = (residuals.pow(2).sum() / (count * dim)).clamp(min=1e-12)
    _, singular, right = torch.linalg.svd(residuals, full_matrices=False)
    eigen = (1.0 - shrinkage) * singular.pow(2) / count
    weights = eigen / (eigen + shrinkage * variance)
    useful = weights > 1e-6  # directions the residuals do not span add nothing
    return right[useful].T.contiguous(), weights[useful], 1.0 / (shrinkage * variance)


def _squared_distances(z: torch.Tensor, means: torch.Tensor, basis: torch.Tensor, weights: torch.Tensor,
                       scale: torch.Tensor) -> torch.Tensor:
    """(N, D) points, (K, D) means and a low-rank precision -> (N, K) squared Mahalanobis distances."""
    euclidean = (z.pow(2).sum(1, keepdim=True) - 2.0 * z @ means.T + means.pow(2).sum(1)).clamp(min=0)
    projected = (z @ basis).unsqueeze(1) - (means @ basis).unsqueeze(0)  # (N, K, r)
    return scale * (euclidean - (projected.pow(2) * weights).sum(-1))


class RelativeMahalanobisRejection(RejectionRule):
    """Relative Mahalanobis rule (Ren et al. 2021). ``score``: features (N, D) -> (N,)
    ``-min_c (d_c(z) - d_0(z))``: d_c the squared Mahalanobis distance to class c's mean under the
    shared within-class covariance, d_0 the one to the mean of all training photos under their
    covariance (the "background": subtracting it cancels what every photo of this kind shares),
    z = L2-normalised square root of the features. Covariances shrunk towards the identity.

    Buffers besides the shared ones: ``class_means`` (C, D); ``class_basis`` (D, r), ``class_weights``
    (r,), ``class_scale`` (): the within-class precision (``_shrunk_gaussian``); ``background_mean``
    (D,), ``background_basis`` (D, r0), ``background_weights`` (r0,), ``background_scale`` ().
    ``calibration`` holds scores of each training photo by a rule fitted without its fold.
    """

    kind = "rmd"
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
        self.register_buffer("class_means", torch.zeros(0, feature_dim))
        self.register_buffer("class_basis", torch.zeros(feature_dim, 0))
        self.register_buffer("class_weights", torch.zeros(0))
        self.register_buffer("class_scale", torch.tensor(1.0))
        self.register_buffer("background_mean", torch.zeros(feature_dim))
        self.register_buffer("background_basis", torch.zeros(feature_dim, 0))
        self.register_buffer("background_weights", torch.zeros(0))
        self.register_buffer("background_scale", torch.tensor(1.0))

    @property
    def fitted(self) -> bool:
        return self.class_means.shape[0] > 0 and self.calibration.numel() > 0

    @staticmethod
    def embed(features: torch.Tensor) -> torch.Tensor:
        """(N, D) -> (N, D): sign-preserving square root (Hu et al. 2021; makes the skewed activations
        closer to Gaussian: near AUROC +0.01 on both sets), then L2 (+0.03 to +0.05 on clothing10)."""
        features = features.float()
        return F.normalize(features.sign() * features.abs().sqrt(), dim=1)

    @classmethod
    def applies(cls, labels: torch.Tensor | None) -> bool:
        """Whether (M,) photo labels give every class enough photos for this rule."""
        return labels is not None and len(labels) > 0 and int(torch.bincount(labels).min()) >= cls.MIN_PHOTOS

    @staticmethod
    def _estimate(z: torch.Tensor, labels: torch.Tensor, num_classes: int, shrinkage: float) -> dict:
        means = torch.zeros(num_classes, z.shape[1]).index_add_(0, labels, z)
        means /= torch.bincount(labels, minlength=num_classes).clamp(min=1).unsqueeze(1).float()
        background = z.mean(0)
        class_basis, class_weights, class_scale = _shrunk_gaussian(z - means[labels], shrinkage)
        background_basis, background_weights, background_scale = _shrunk_gaussian(z - background, shrinkage)
        return {"class_means": means, "class_basis": class_basis, "class_weights": class_weights,
                "class_scale": class_scale, "background_mean": background, "background_basis": background_basis,
                "background_weights": background_weights, "background_scale": background_scale}

    @staticmethod
    def _relative_score(z: torch.Tensor, p: dict) -> torch.Tensor:
        """(N, D) embedded features and the rule's parameters -> (N,) known-ness."""
        per_class = _squared_distances(z, p["class_means"], p["class_basis"], p["class_weights"], p["class_scale"])
        background = _squared_distances(z, p["background_mean"].unsqueeze(0), p["background_basis"],
                                         p["background_weights"], p["background_scale"])
        return -(per_class - background).min(dim=1).values

    def _score(self, features: torch.Tensor) -> torch.Tensor:
        return self._relative_score(self.embed(features), self._buffers)

    @torch.no_grad()
    def fit(self, features: torch.Tensor, groups: torch.Tensor, keep: float = DEFAULT_KEEP,
            labels: torch.Tensor | None = None) -> dict:
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
        fold = torch.empty(len(labels), dtype=torch.long)
        offset = 0
        for label in range(num_classes):
            members = (labels == label).nonzero().flatten()
            fold[members] = (torch.arange(len(members)) + offset) % folds
            offset += len(members)  # classes start on different folds: folds stay balanced in size
        heldout = torch.empty(len(labels))
        for index in range(folds):
            held = fold == index
            if held.any():
                fitted = self._estimate(z[~held], labels[~held], num_classes, self.SHRINKAGE)
                heldout[held] = self._relative_score(z[held], fitted)
        for name, value in self._estimate(z, labels, num_classes, self.SHRINKAGE).items():
            self._buffers[name] = value.float()
        return {**self._calibrate(heldout, keep), "shrinkage": self.SHRINKAGE, "folds": folds,
                "rank": int(self.class_basis.shape[1])}


RULES: dict[str, type[RejectionRule]] = {rule.kind: rule for rule in (KnnRejection, RelativeMahalanobisRejection)}


def rule_for_labels(feature_dim: int, labels: torch.Tensor | None) -> RejectionRule:
    """The rule to fit for (M,) training labels: relative Mahalanobis where every class has enough
    photos, else kNN."""
    return (RelativeMahalanobisRejection if RelativeMahalanobisRejection.applies(labels) else KnnRejection)(feature_dim)


def rule_for_state(state_dict: dict, prefix: str, feature_dim: int) -> RejectionRule:
    """An empty rule of the kind whose buffers a saved head state holds under ``prefix`` ("...rejection.").
    kNN archives (and archives made before rules: an empty kNN rule, off) load as they were saved."""
    if prefix + "class_means" in state_dict:
        return RelativeMahalanobisRejection(feature_dim)
    return KnnRejection(feature_dim)
