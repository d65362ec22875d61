"""Few-shot heads: small classifiers on frozen backbone features.

Heads take features, never images: (N, D) float features in, (N, C) logits out. They share one base
that owns the feature normalisation (an optional power transform, centring on the training mean,
then L2) and the rejection rule (handlers/rejection.py: which photos fit none of the classes), so the
same math runs at training time and inside the served archive.

Registry: ``HEADS[kind]`` is the class; ``build_head(kind, feature_dim, num_classes)`` makes one,
``head.fit(features, labels)`` trains it, and ``state_dict()`` / ``load_state_dict()`` round-trip it.
"""

from __future__ import annotations

import abc
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from handlers.rejection import DEFAULT_KEEP, KnnRejection, first_row_of_each_group, rule_for_labels, rule_for_state


class FeatureHead(nn.Module, abc.ABC):
    """Base of all heads. ``forward``: features (N, D) -> logits (N, C); ``known_score``: features
    (N, D) -> (N,) score of the rejection rule (a photo below ``rejection.threshold`` is "unknown")."""

    kind: ClassVar[str]
    # Whether training should add augmented views of each image as extra rows. Measured per head
    # (docs/BENCHMARKS.md): they help the linear head and slightly hurt class means.
    uses_views: ClassVar[bool] = False

    def __init__(self, feature_dim: int, num_classes: int):
        super().__init__()
        self.feature_dim = feature_dim
        self.num_classes = num_classes
        # Mean of the training features; subtracting it removes the direction all ImageNet
        # features share, which otherwise dominates cosine similarities between classes.
        self.register_buffer("center", torch.zeros(feature_dim))
        # Exponent of a sign-preserving power transform before centring (1: none). 0.5 is the square
        # root of Tukey's ladder, used on pooled CNN features by Hu et al., "Leveraging the Feature
        # Distribution in Transfer-based Few-Shot Learning" (2021): it makes the skewed, mostly
        # non-negative activations closer to Gaussian. Chosen per data set by ``--head auto``.
        self.register_buffer("power", torch.tensor(1.0))
        self.rejection = KnnRejection(feature_dim)

    def transform(self, features: torch.Tensor) -> torch.Tensor:
        """(N, D) -> (N, D): the power transform (identity at power 1)."""
        features = features.float()
        if float(self.power) == 1.0:
            return features
        return features.sign() * features.abs().pow(self.power)

    def normalise(self, features: torch.Tensor) -> torch.Tensor:
        """(N, D) -> (N, D): power-transformed, centred and L2-normalised."""
        return F.normalize(self.transform(features) - self.center, dim=1)

    @torch.no_grad()
    def fit_normalisation(self, features: torch.Tensor, power: float = 1.0) -> torch.Tensor:
        """Set the power and the centre from (N, D) training features; returns them normalised (N, D)."""
        self.power.fill_(power)
        self.center.copy_(self.transform(features).mean(dim=0))
        return self.normalise(features)

    def fit_rejection(self, features: torch.Tensor, groups: torch.Tensor, keep: float = DEFAULT_KEEP,
                      labels: torch.Tensor | None = None) -> dict:
        """Fit the rejection rule on (M, D) training rows, their (M,) image ids and (M,) labels: the
        relative Mahalanobis rule where every class has enough photos, else (or without labels) kNN
        (handlers/rejection.py)."""
        self.rejection = rule_for_labels(self.feature_dim, labels)
        return self.rejection.fit(features, groups, keep, labels)

    def known_score(self, features: torch.Tensor) -> torch.Tensor:
        """(N, D) backbone features -> (N,) rejection score (higher: more like the training photos)."""
        return self.rejection.score(features)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Archives made before the power transform existed have no power: theirs was 1.
        state_dict.setdefault(prefix + "power", torch.tensor(1.0))
        # The rule's kind (and its buffers' sizes) come from the saved state: kNN archives load as before.
        self.rejection = rule_for_state(state_dict, prefix + "rejection.", self.feature_dim)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.logits(self.normalise(features))

    @abc.abstractmethod
    def logits(self, normalised: torch.Tensor) -> torch.Tensor:
        """(N, D) normalised features -> (N, C) logits."""

    @abc.abstractmethod
    def fit(self, features: torch.Tensor, labels: torch.Tensor, *, groups: torch.Tensor | None = None,
            seed: int = 0, power: float = 1.0) -> dict:
        """Train on (N, D) features and (N,) int64 labels in [0, C). Returns a summary dict.

        Every head accepts ``groups`` ((N,) image id of each row: augmented views of one image share
        it), ``seed`` and ``power`` (the feature power transform), so callers can pass them to any
        head; heads add their own keyword options, and a misspelled option is a TypeError, never
        silently ignored."""


HEADS: dict[str, type[FeatureHead]] = {}


def register_head(cls: type[FeatureHead]) -> type[FeatureHead]:
    """Class decorator: make a head available by its ``kind``."""
    if cls.kind in HEADS:
        raise ValueError(f"head {cls.kind!r} is registered twice")
    HEADS[cls.kind] = cls
    return cls


def build_head(kind: str, feature_dim: int, num_classes: int) -> FeatureHead:
    try:
        cls = HEADS[kind]
    except KeyError:
        raise ValueError(f"unknown head {kind!r}; choose from {', '.join(sorted(HEADS))}") from None
    return cls(feature_dim, num_classes)


@register_head
class PrototypeHead(FeatureHead):
    """Nearest class mean: cosine similarity to each class prototype, times a fitted scale.

    ``prototypes``: (C, D) unit vectors; ``scale``: inverse temperature turning cosine similarities
    into calibrated probabilities.
    """

    kind = "prototype"

    def __init__(self, feature_dim: int, num_classes: int):
        super().__init__(feature_dim, num_classes)
        self.register_buffer("prototypes", torch.zeros(num_classes, feature_dim))
        self.register_buffer("scale", torch.tensor(10.0))

    def logits(self, normalised: torch.Tensor) -> torch.Tensor:
        return self.scale * normalised @ self.prototypes.T

    @torch.no_grad()
    def fit(self, features: torch.Tensor, labels: torch.Tensor, *, groups: torch.Tensor | None = None,
            seed: int = 0, power: float = 1.0) -> dict:
        """``power``: the feature power transform (see FeatureHead). Class means need neither image
        groups nor a seed: both are accepted and unused."""
        normalised = self.fit_normalisation(features, power)
        sums = torch.zeros_like(self.prototypes).index_add_(0, labels, normalised)
        counts = torch.bincount(labels, minlength=self.num_classes).clamp(min=1).unsqueeze(1)
        self.prototypes.copy_(F.normalize(sums / counts, dim=1))
        # Fit the temperature on leave-one-out similarities: a sample's own prototype without it,
        # otherwise every training image looks closer to its class than an unseen one would.
        loo = F.normalize(sums[labels] - normalised, dim=1)
        cosine = normalised @ self.prototypes.T
        own = counts.squeeze(1)[labels] > 1
        cosine[own, labels[own]] = (normalised[own] * loo[own]).sum(dim=1)
        scales = torch.logspace(0, 2.5, 60)
        losses = torch.stack([F.cross_entropy(s * cosine, labels) for s in scales])
        self.scale.fill_(float(scales[losses.argmin()]))
        return {"scale": float(self.scale), "train_nll": float(losses.min())}


def _holdout_mask(labels: torch.Tensor, groups: torch.Tensor, fraction: float, seed: int) -> torch.Tensor:
    """True for rows held out: about ``fraction`` of each class's groups (images), never a class's
    last group. Rows of one group (augmented views of one image) are never split, or the held-out
    score would be measured on views of images the model trained on."""
    generator = torch.Generator().manual_seed(seed)
    held = torch.zeros(len(labels), dtype=torch.bool)
    for label in labels.unique():
        class_groups = groups[labels == label].unique()
        n_out = min(len(class_groups) - 1, round(fraction * len(class_groups)))
        if n_out < 1:
            continue
        chosen = class_groups[torch.randperm(len(class_groups), generator=generator)[:n_out]]
        held |= torch.isin(groups, chosen)
    return held


def _weight_and_bias(parameters: torch.Tensor, classes: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(C*D + C,) flat parameters -> weight (C, D) (row-major first), bias (C,): views, not copies."""
    return parameters[: classes * dim].view(classes, dim), parameters[classes * dim:]


def softmax_regression_objective(x: torch.Tensor, labels: torch.Tensor, class_weights: torch.Tensor,
                                 weight_decay: float):
    """The linear head's objective as ``parameters -> (loss, gradient)`` for handlers/lbfgs.py.

    ``x`` (N, D) features, ``labels`` (N,), ``class_weights`` (C,); parameters (C*D + C,) are the
    weight (C, D) row-major, then the bias (C,). Loss: F.cross_entropy(x W^T + b, labels,
    weight=class_weights) + weight_decay * |W|^2. Gradient written out (d loss / d logits_i =
    w_(y_i) (softmax_i - onehot_i) / sum w_(y_i)) rather than by autograd: the same numbers
    (tests/unit/test_lbfgs.py), at about a third of the time per call, and auto cross-validation
    makes thousands of calls.
    """
    classes, dim = class_weights.numel(), x.shape[1]
    row_weights = class_weights[labels]
    onehot = F.one_hot(labels, classes).to(x.dtype)
    scale = row_weights / row_weights.sum()

    def loss_and_grad(parameters: torch.Tensor) -> tuple[float, torch.Tensor]:
        weight, bias = _weight_and_bias(parameters, classes, dim)
        log_probabilities = torch.log_softmax(torch.addmm(bias, x, weight.T), dim=1)
        loss = -(scale * (log_probabilities * onehot).sum(1)).sum() + weight_decay * weight.pow(2).sum()
        d_logits = (log_probabilities.exp() - onehot) * scale[:, None]
        grad = torch.cat([(d_logits.T @ x + 2.0 * weight_decay * weight).flatten(), d_logits.sum(0)])
        return float(loss), grad

    return loss_and_grad


@register_head
class LinearHead(FeatureHead):
    """Softmax regression on centred, L2-normalised features.

    Class-balanced cross-entropy plus weight decay, minimised full-batch with L-BFGS (handlers/lbfgs.py:
    on a few thousand rows that converges in well under a second, where SGD needs a tuned schedule
    and many epochs). The weight decay is chosen on a
    held-out part of the training images (early stopping along the regularisation path: training
    stops at the strength where held-out loss is lowest), then the head is refitted on all images.
    """

    kind = "linear"
    uses_views = True
    WEIGHT_DECAYS = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2)

    def __init__(self, feature_dim: int, num_classes: int):
        super().__init__(feature_dim, num_classes)
        self.linear = nn.Linear(feature_dim, num_classes)

    def logits(self, normalised: torch.Tensor) -> torch.Tensor:
        return self.linear(normalised)

    @staticmethod
    def _class_weights(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
        counts = torch.bincount(labels, minlength=num_classes).float().clamp(min=1)
        return counts.sum() / (num_classes * counts)

    def _solve(self, x: torch.Tensor, labels: torch.Tensor, weight_decay: float, max_iter: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, D) normalised features, (N,) labels -> weight (C, D), bias (C,) minimising class-balanced
        cross-entropy + ``weight_decay`` * |weight|^2."""
        from handlers.lbfgs import minimise  # training only: serving workers never fit

        classes, dim = self.num_classes, x.shape[1]
        loss_and_grad = softmax_regression_objective(x, labels, self._class_weights(labels, classes), weight_decay)
        solution = minimise(loss_and_grad, torch.zeros(classes * dim + classes), max_iter=max_iter,
                            history_size=20, tolerance_grad=1e-6)
        return tuple(part.clone() for part in _weight_and_bias(solution, classes, dim))

    def fit(self, features: torch.Tensor, labels: torch.Tensor, *, groups: torch.Tensor | None = None,
            weight_decay: float | None = None, holdout_fraction: float = 0.25, max_iter: int = 200,
            seed: int = 0, power: float = 1.0) -> dict:
        """``groups``: image id of each row (augmented views of one image share it); ``weight_decay``:
        a fixed strength instead of choosing one on held-out images; ``power``: the feature power
        transform (see FeatureHead)."""
        groups = torch.arange(len(labels)) if groups is None else groups
        x = self.fit_normalisation(features, power)
        summary: dict = {}
        if weight_decay is None:
            held = _holdout_mask(labels, groups, holdout_fraction, seed)
            if held.any():
                class_weights = self._class_weights(labels[held], self.num_classes)
                scores = {}
                for candidate in self.WEIGHT_DECAYS:
                    weight, bias = self._solve(x[~held], labels[~held], candidate, max_iter)
                    logits = x[held] @ weight.T + bias
                    scores[candidate] = float(F.cross_entropy(logits, labels[held], weight=class_weights))
                weight_decay = min(scores, key=scores.get)
                summary["holdout_nll"] = {f"{k:g}": round(v, 4) for k, v in scores.items()}
                summary["holdout_images"] = int(groups[held].unique().numel())
            else:  # one image per class: nothing to hold out
                weight_decay = 1e-3
        weight, bias = self._solve(x, labels, weight_decay, max_iter)
        with torch.no_grad():
            self.linear.weight.copy_(weight)
            self.linear.bias.copy_(bias)
            train_accuracy = float((self.linear(x).argmax(1) == labels).float().mean())
        summary.update(weight_decay=weight_decay, train_accuracy=round(train_accuracy, 4))
        return summary


@register_head
class EnsembleHead(FeatureHead):
    """A linear head and a prototype head, their class probabilities averaged.

    ``forward``: features (N, D) -> (N, C) log of the mean of the members' softmax probabilities
    (softmax of these logits gives that mean back). Each member keeps its own normalisation; the
    linear member trains on every row (augmented views too), the prototype member on each photo's
    plain view (the first row of its group), as each does alone (docs/BENCHMARKS.md). Averaging the
    predictions of different models (Dietterich, "Ensemble Methods in Machine Learning", 2000)
    measured +0.011 over the better single head on clothing10 5-way 20-shot and -0.02 on
    signdigits10, so ``--head auto`` offers it as one more candidate (docs/bench/openset.md).
    """

    kind = "ensemble"
    uses_views = True

    def __init__(self, feature_dim: int, num_classes: int):
        super().__init__(feature_dim, num_classes)
        self.members = nn.ModuleDict({"linear": LinearHead(feature_dim, num_classes),
                                      "prototype": PrototypeHead(feature_dim, num_classes)})

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        probabilities = torch.stack([member(features).softmax(dim=1) for member in self.members.values()]).mean(0)
        return probabilities.clamp(min=1e-12).log()

    def logits(self, normalised: torch.Tensor) -> torch.Tensor:
        raise TypeError("an ensemble's members normalise their own features: call the head on raw features")

    def fit(self, features: torch.Tensor, labels: torch.Tensor, *, groups: torch.Tensor | None = None,
            seed: int = 0, power: float = 1.0, weight_decay: float | None = None) -> dict:
        """``power`` applies to both members; ``weight_decay`` to the linear member (None: chosen on
        held-out images, as LinearHead.fit does)."""
        groups = torch.arange(len(labels)) if groups is None else groups
        self.power.fill_(power)
        plain = first_row_of_each_group(groups)
        summary = {"linear": self.members["linear"].fit(features, labels, groups=groups, seed=seed, power=power,
                                                        weight_decay=weight_decay),
                   "prototype": self.members["prototype"].fit(features[plain], labels[plain], power=power)}
        return summary
