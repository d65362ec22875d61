"""Few-shot heads: small classifiers on frozen backbone features.

Heads take features, never images: (N, D) float32 features in, (N, C) float32 logits out, all numpy
arrays. They share one base that owns the feature normalisation (an optional power transform,
centring on the training mean, then L2) and the rejection rule (handlers/rejection.py: which photos
fit none of the classes), so the same math runs at training time and inside the served archive.

numpy, not torch: a warm train_head (features cached) never imports torch, whose import alone costs
1.7 s of its 2 s budget. The numbers are the torch heads' (float32 where they were float32, the same
held-out images for the same seed), so archives and benchmark figures did not move with the port.

Registry: ``HEADS[kind]`` is the class; ``build_head(kind, feature_dim, num_classes)`` makes one,
``head.fit(features, labels)`` trains it, ``head(features)`` gives its logits, and ``state()`` /
``load_state()`` round-trip it as named arrays (an archive's ``handlers.layout.HEAD_FILE``). The names
are the keys of the torch state_dicts that archives made before the port carry, so those load too.
"""

from __future__ import annotations

import abc
from typing import ClassVar

import numpy as np

from handlers.arrays import cross_entropy, l2_normalise, softmax
from handlers.rejection import DEFAULT_KEEP, KnnRejection, first_row_of_each_group, rule_for_labels, rule_for_state


class FeatureHead(abc.ABC):
    """Base of all heads. ``head(features)``: features (N, D) -> logits (N, C); ``known_score``:
    features (N, D) -> (N,) score of the rejection rule (a photo below ``rejection.threshold`` is
    "unknown")."""

    kind: ClassVar[str]
    # Whether training should add augmented views of each image as extra rows. Measured per head
    # (docs/BENCHMARKS.md): they help the linear head and slightly hurt class means.
    uses_views: ClassVar[bool] = False
    # The head's own arrays in its state: state key -> attribute (besides "center" and "power").
    ARRAYS: ClassVar[dict[str, str]] = {}

    def __init__(self, feature_dim: int, num_classes: int):
        self.feature_dim = feature_dim
        self.num_classes = num_classes
        # Mean of the training features; subtracting it removes the direction all ImageNet
        # features share, which otherwise dominates cosine similarities between classes.
        self.center = np.zeros(feature_dim, np.float32)
        # Exponent of a sign-preserving power transform before centring (1: none). 0.5 is the square
        # root of Tukey's ladder, used on pooled CNN features by Hu et al., "Leveraging the Feature
        # Distribution in Transfer-based Few-Shot Learning" (2021): it makes the skewed, mostly
        # non-negative activations closer to Gaussian. Chosen per data set by ``--head auto``.
        self.power = np.array(1.0, np.float32)
        self.rejection = KnnRejection(feature_dim)

    def transform(self, features: np.ndarray) -> np.ndarray:
        """(N, D) -> (N, D): the power transform (identity at power 1)."""
        features = np.asarray(features, np.float32)
        if float(self.power) == 1.0:
            return features
        return np.sign(features) * np.abs(features) ** float(self.power)

    def normalise(self, features: np.ndarray) -> np.ndarray:
        """(N, D) -> (N, D): power-transformed, centred and L2-normalised."""
        return l2_normalise(self.transform(features) - self.center)

    def fit_normalisation(self, features: np.ndarray, power: float = 1.0) -> np.ndarray:
        """Set the power and the centre from (N, D) training features; returns them normalised (N, D)."""
        self.power = np.array(power, np.float32)
        self.center = self.transform(features).mean(axis=0)
        return self.normalise(features)

    def fit_rejection(self, features: np.ndarray, groups: np.ndarray, keep: float = DEFAULT_KEEP,
                      labels: np.ndarray | None = None) -> dict:
        """Fit the rejection rule on (M, D) training rows, their (M,) image ids and (M,) labels: the
        relative Mahalanobis rule where every class has enough photos, else (or without labels) kNN
        (handlers/rejection.py)."""
        self.rejection = rule_for_labels(self.feature_dim, labels)
        return self.rejection.fit(features, groups, keep, labels)

    def known_score(self, features: np.ndarray) -> np.ndarray:
        """(N, D) backbone features -> (N,) rejection score (higher: more like the training photos)."""
        return self.rejection.score(features)

    def __call__(self, features: np.ndarray) -> np.ndarray:
        """(N, D) backbone features -> (N, C) float32 logits."""
        return self.logits(self.normalise(features))

    @abc.abstractmethod
    def logits(self, normalised: np.ndarray) -> np.ndarray:
        """(N, D) normalised features -> (N, C) logits."""

    @abc.abstractmethod
    def fit(self, features: np.ndarray, labels: np.ndarray, *, groups: np.ndarray | None = None,
            seed: int = 0, power: float = 1.0) -> dict:
        """Train on (N, D) float32 features and (N,) int64 labels in [0, C). Returns a summary dict.

        Every head accepts ``groups`` ((N,) image id of each row: augmented views of one image share
        it), ``seed`` and ``power`` (the feature power transform), so callers can pass them to any
        head; heads add their own keyword options, and a misspelled option is a TypeError, never
        silently ignored."""

    def state(self, prefix: str = "") -> dict[str, np.ndarray]:
        """Everything a fitted head is, as named arrays: "center", "power", the head's own arrays and
        "rejection.<array>" (``prefix`` before every name)."""
        arrays = {"center": "center", "power": "power", **self.ARRAYS}
        state = {prefix + key: np.asarray(getattr(self, attribute)) for key, attribute in arrays.items()}
        state.update(self.rejection.state(prefix + "rejection."))
        return state

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        """Become the head ``state()`` described. ValueError for a state of another head: an array
        missing or of another shape, or a name this head does not know."""
        unexpected = set(state) - self._load(state, "")
        if unexpected:
            raise ValueError(f"{self.kind} head state has unexpected arrays {sorted(unexpected)[:5]}")

    def _load(self, state: dict[str, np.ndarray], prefix: str) -> set[str]:
        """Load the arrays under ``prefix``; returns the keys used."""
        used = set()
        for key, attribute in {"center": "center", "power": "power", **self.ARRAYS}.items():
            current = np.asarray(getattr(self, attribute))
            if prefix + key not in state:
                if key == "power":  # archives made before the power transform existed: theirs was 1
                    continue
                raise ValueError(f"{self.kind} head state lacks {prefix + key!r}")
            value = np.array(state[prefix + key], dtype=current.dtype)
            if value.shape != current.shape:
                raise ValueError(f"{self.kind} head state: {prefix + key!r} has shape {value.shape}, "
                                 f"expected {current.shape} ({self.feature_dim} features, {self.num_classes} classes)")
            setattr(self, attribute, value)
            used.add(prefix + key)
        # The rule's kind (and its arrays' sizes) come from the saved state: kNN archives load as before.
        self.rejection = rule_for_state(state, prefix + "rejection.", self.feature_dim)
        return used | self.rejection.load_state(state, prefix + "rejection.")


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


def head_from_state(kind: str, feature_dim: int, num_classes: int, state: dict[str, np.ndarray]) -> FeatureHead:
    """A head of ``kind`` loaded from its ``state()`` (or an older archive's converted state_dict)."""
    head = build_head(kind, feature_dim, num_classes)
    head.load_state(state)
    return head


@register_head
class PrototypeHead(FeatureHead):
    """Nearest class mean: cosine similarity to each class prototype, times a fitted scale.

    ``prototypes``: (C, D) unit vectors; ``scale``: inverse temperature turning cosine similarities
    into calibrated probabilities.
    """

    kind = "prototype"
    ARRAYS = {"prototypes": "prototypes", "scale": "scale"}

    def __init__(self, feature_dim: int, num_classes: int):
        super().__init__(feature_dim, num_classes)
        self.prototypes = np.zeros((num_classes, feature_dim), np.float32)
        self.scale = np.array(10.0, np.float32)

    def logits(self, normalised: np.ndarray) -> np.ndarray:
        return self.scale * normalised @ self.prototypes.T

    def fit(self, features: np.ndarray, labels: np.ndarray, *, groups: np.ndarray | None = None,
            seed: int = 0, power: float = 1.0) -> dict:
        """``power``: the feature power transform (see FeatureHead). Class means need neither image
        groups nor a seed: both are accepted and unused."""
        normalised = self.fit_normalisation(features, power)
        sums = np.zeros_like(self.prototypes)
        np.add.at(sums, labels, normalised)  # row by row, in order: torch's index_add_ sums
        counts = np.maximum(np.bincount(labels, minlength=self.num_classes), 1)
        self.prototypes = l2_normalise(sums / counts[:, None].astype(np.float32))
        # Fit the temperature on leave-one-out similarities: a sample's own prototype without it,
        # otherwise every training image looks closer to its class than an unseen one would.
        loo = l2_normalise(sums[labels] - normalised)
        cosine = normalised @ self.prototypes.T
        own = counts[labels] > 1
        cosine[own, labels[own]] = (normalised[own] * loo[own]).sum(axis=1)
        scales = np.logspace(0, 2.5, 60).astype(np.float32)  # torch.logspace(0, 2.5, 60)'s float32 values
        losses = np.array([cross_entropy(s * cosine, labels) for s in scales])
        self.scale = np.array(scales[losses.argmin()], np.float32)
        return {"scale": float(self.scale), "train_nll": float(losses.min())}


def _torch_randperm(n: int, stream: np.random.RandomState) -> np.ndarray:
    """torch.randperm(n, generator=...) on CPU, drawing from ``stream``: torch's shuffle (swap
    position i with i + u % (n - i), u a raw 32-bit Mersenne Twister output), and
    ``np.random.RandomState(seed)`` gives the outputs ``torch.Generator().manual_seed(seed)`` does.
    So the linear head holds out the images its torch version held out for the same seed
    (tests/unit/test_heads.py compares them)."""
    order = np.arange(n)
    draws = stream.randint(0, 2 ** 32, size=max(n - 1, 0), dtype=np.uint32)  # full range: the raw outputs
    for position in range(n - 1):
        other = position + int(draws[position]) % (n - position)
        order[position], order[other] = order[other], order[position]
    return order


def _holdout_mask(labels: np.ndarray, groups: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """True for rows held out: about ``fraction`` of each class's groups (images), never a class's
    last group. Rows of one group (augmented views of one image) are never split, or the held-out
    score would be measured on views of images the model trained on."""
    stream = np.random.RandomState(seed & 0xFFFFFFFF)  # torch's manual_seed keeps the low 32 bits too
    held = np.zeros(len(labels), bool)
    for label in np.unique(labels):
        class_groups = np.unique(groups[labels == label])
        n_out = min(len(class_groups) - 1, round(fraction * len(class_groups)))
        if n_out < 1:
            continue
        chosen = class_groups[_torch_randperm(len(class_groups), stream)[:n_out]]
        held |= np.isin(groups, chosen)
    return held


def _weight_and_bias(parameters: np.ndarray, classes: int, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """(C*D + C,) flat parameters -> weight (C, D) (row-major first), bias (C,): views, not copies."""
    return parameters[: classes * dim].reshape(classes, dim), parameters[classes * dim:]


def softmax_regression_objective(x: np.ndarray, labels: np.ndarray, class_weights: np.ndarray,
                                 weight_decay: float):
    """The linear head's objective as ``parameters -> (loss, gradient)`` for handlers/lbfgs.py.

    ``x`` (N, D) features, ``labels`` (N,), ``class_weights`` (C,); parameters (C*D + C,) are the
    weight (C, D) row-major, then the bias (C,). Loss: cross_entropy(x W^T + b, labels,
    weight=class_weights) + weight_decay * |W|^2. Gradient written out (d loss / d logits_i =
    w_(y_i) (softmax_i - onehot_i) / sum w_(y_i)): the same numbers as torch's autograd
    (tests/unit/test_lbfgs.py), and auto cross-validation makes thousands of calls.
    """
    classes, dim = len(class_weights), x.shape[1]
    row_weights = class_weights[labels]
    onehot = np.eye(classes, dtype=x.dtype)[labels]
    scale = row_weights / row_weights.sum()

    def loss_and_grad(parameters: np.ndarray) -> tuple[float, np.ndarray]:
        weight, bias = _weight_and_bias(parameters, classes, dim)
        logits = x @ weight.T + bias
        shifted = logits - logits.max(axis=1, keepdims=True)
        log_probabilities = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        loss = -(scale * (log_probabilities * onehot).sum(1)).sum() + weight_decay * np.square(weight).sum()
        d_logits = (np.exp(log_probabilities) - onehot) * scale[:, None]
        grad = np.concatenate([(d_logits.T @ x + 2.0 * weight_decay * weight).ravel(), d_logits.sum(0)])
        return float(loss), grad

    return loss_and_grad


class RowSpace:
    """N feature rows (N, D) in an orthonormal basis of the space they span, when N < D.

    The linear head's objective sees its weight only through ``x @ weight.T`` and ``|weight|^2``, so
    the minimiser lies in the span of the rows (the representer theorem: Schoelkopf, Herbrich and
    Smola, "A Generalized Representer Theorem", 2001), and L-BFGS started from zero never leaves it
    (every gradient is in it). Solving for the (C, r) coordinates instead of the (C, D) weight is the
    same problem, the basis being an isometry, at r / D of the cost per step (r <= N: a few hundred
    rows against 1280-2560 dimensions). The basis comes from the (N, N) Gram matrix's eigenvectors
    in float64; directions whose eigenvalue is below ``1e-9`` of the largest carry no data and are
    dropped. With N >= D the rows are used as they are.

    ``coordinates`` (N, r) = x @ Q; ``weight(coefficients)`` maps (C, r) back to (C, D) = coefficients @ Q^T.
    """

    RELATIVE_FLOOR = 1e-9

    def __init__(self, x: np.ndarray):
        if x.shape[0] >= x.shape[1]:
            self.coordinates, self._basis_t = x, None  # the rows as they are
            return
        wide = x.astype(np.float64)
        values, vectors = np.linalg.eigh(wide @ wide.T)
        kept = values > values[-1] * self.RELATIVE_FLOOR
        values, vectors = values[kept], vectors[:, kept]
        self.coordinates = (vectors * np.sqrt(values)).astype(np.float32)
        self._basis_t = ((vectors / np.sqrt(values)).T @ wide).astype(np.float32)  # Q^T (r, D)

    def weight(self, coefficients: np.ndarray) -> np.ndarray:
        """(C, r) coefficients -> (C, D) weight."""
        return coefficients if self._basis_t is None else coefficients @ self._basis_t


@register_head
class LinearHead(FeatureHead):
    """Softmax regression on centred, L2-normalised features.

    Class-balanced cross-entropy plus weight decay, minimised full-batch with L-BFGS (handlers/lbfgs.py:
    on a few thousand rows that converges in well under a second, where SGD needs a tuned schedule
    and many epochs). The weight decay is chosen on a
    held-out part of the training images (early stopping along the regularisation path: training
    stops at the strength where held-out loss is lowest), then the head is refitted on all images.

    ``weight`` (C, D) and ``bias`` (C,): the logits are ``normalised @ weight.T + bias``.
    """

    kind = "linear"
    uses_views = True
    WEIGHT_DECAYS = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2)
    # State names of torch's nn.Linear, which older archives carry.
    ARRAYS = {"linear.weight": "weight", "linear.bias": "bias"}

    def __init__(self, feature_dim: int, num_classes: int):
        super().__init__(feature_dim, num_classes)
        self.weight = np.zeros((num_classes, feature_dim), np.float32)
        self.bias = np.zeros(num_classes, np.float32)

    def logits(self, normalised: np.ndarray) -> np.ndarray:
        return normalised @ self.weight.T + self.bias

    @staticmethod
    def _class_weights(labels: np.ndarray, num_classes: int) -> np.ndarray:
        counts = np.maximum(np.bincount(labels, minlength=num_classes).astype(np.float32), 1)
        return counts.sum() / (num_classes * counts)

    def _solve(self, x: np.ndarray, labels: np.ndarray, weight_decay: float, max_iter: int,
               space: RowSpace | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(N, D) normalised features, (N,) labels -> weight (C, D), bias (C,) minimising class-balanced
        cross-entropy + ``weight_decay`` * |weight|^2. ``space``: ``RowSpace(x)``, when the caller
        solves several times on the same rows."""
        from handlers.lbfgs import minimise  # training only: serving workers never fit

        space = space if space is not None else RowSpace(x)
        rows = space.coordinates
        classes, dim = self.num_classes, rows.shape[1]
        loss_and_grad = softmax_regression_objective(rows, labels, self._class_weights(labels, classes), weight_decay)
        # float32 from zeros, as the torch head solved it.
        solution = minimise(loss_and_grad, np.zeros(classes * dim + classes, np.float32), max_iter=max_iter,
                            history_size=20, tolerance_grad=1e-6)
        coefficients, bias = _weight_and_bias(solution, classes, dim)
        return space.weight(coefficients.copy()), bias.copy()

    def fit(self, features: np.ndarray, labels: np.ndarray, *, groups: np.ndarray | None = None,
            weight_decay: float | None = None, holdout_fraction: float = 0.25, max_iter: int = 200,
            seed: int = 0, power: float = 1.0) -> dict:
        """``groups``: image id of each row (augmented views of one image share it); ``weight_decay``:
        a fixed strength instead of choosing one on held-out images; ``power``: the feature power
        transform (see FeatureHead)."""
        groups = np.arange(len(labels)) if groups is None else groups
        x = self.fit_normalisation(features, power)
        summary: dict = {}
        if weight_decay is None:
            held = _holdout_mask(labels, groups, holdout_fraction, seed)
            if held.any():
                class_weights = self._class_weights(labels[held], self.num_classes)
                scores = {}
                kept, kept_labels, held_x = x[~held], labels[~held], x[held]
                kept_rows = RowSpace(kept)  # one basis for every candidate strength
                for candidate in self.WEIGHT_DECAYS:
                    weight, bias = self._solve(kept, kept_labels, candidate, max_iter, kept_rows)
                    logits = held_x @ weight.T + bias
                    scores[candidate] = cross_entropy(logits, labels[held], weight=class_weights)
                weight_decay = min(scores, key=scores.get)
                summary["holdout_nll"] = {f"{k:g}": round(v, 4) for k, v in scores.items()}
                summary["holdout_images"] = len(np.unique(groups[held]))
            else:  # one image per class: nothing to hold out
                weight_decay = 1e-3
        self.weight, self.bias = self._solve(x, labels, weight_decay, max_iter)
        train_accuracy = float(np.mean(self.logits(x).argmax(1) == labels))
        summary.update(weight_decay=weight_decay, train_accuracy=round(train_accuracy, 4))
        return summary


@register_head
class EnsembleHead(FeatureHead):
    """A linear head and a prototype head, their class probabilities averaged.

    ``head(features)``: features (N, D) -> (N, C) log of the mean of the members' softmax probabilities
    (softmax of these logits gives that mean back). Each member keeps its own normalisation; the
    linear member trains on every row (augmented views too), the prototype member on each photo's
    plain view (the first row of its group), as each does alone (docs/BENCHMARKS.md). Averaging the
    predictions of different models (Dietterich, "Ensemble Methods in Machine Learning", 2000)
    measured +0.011 over the better single head on clothing10 5-way 20-shot and -0.02 on
    signdigits10, so ``--head auto`` offers it as one more candidate (docs/bench/openset.md).

    State: the base's arrays, then each member's under "members.<name>." ("members.linear.linear.weight").
    """

    kind = "ensemble"
    uses_views = True

    def __init__(self, feature_dim: int, num_classes: int):
        super().__init__(feature_dim, num_classes)
        self.members: dict[str, FeatureHead] = {"linear": LinearHead(feature_dim, num_classes),
                                                "prototype": PrototypeHead(feature_dim, num_classes)}

    def __call__(self, features: np.ndarray) -> np.ndarray:
        probabilities = np.stack([softmax(member(features)) for member in self.members.values()]).mean(axis=0)
        return np.log(np.maximum(probabilities, np.float32(1e-12)))

    def logits(self, normalised: np.ndarray) -> np.ndarray:
        raise TypeError("an ensemble's members normalise their own features: call the head on raw features")

    def fit(self, features: np.ndarray, labels: np.ndarray, *, groups: np.ndarray | None = None,
            seed: int = 0, power: float = 1.0, weight_decay: float | None = None) -> dict:
        """``power`` applies to both members; ``weight_decay`` to the linear member (None: chosen on
        held-out images, as LinearHead.fit does)."""
        groups = np.arange(len(labels)) if groups is None else groups
        self.power = np.array(power, np.float32)
        plain = first_row_of_each_group(groups)
        summary = {"linear": self.members["linear"].fit(features, labels, groups=groups, seed=seed, power=power,
                                                        weight_decay=weight_decay),
                   "prototype": self.members["prototype"].fit(features[plain], labels[plain], power=power)}
        return summary

    def state(self, prefix: str = "") -> dict[str, np.ndarray]:
        state = super().state(prefix)
        for name, member in self.members.items():
            state.update(member.state(f"{prefix}members.{name}."))
        return state

    def _load(self, state: dict[str, np.ndarray], prefix: str) -> set[str]:
        used = super()._load(state, prefix)
        for name, member in self.members.items():
            used |= member._load(state, f"{prefix}members.{name}.")
        return used
