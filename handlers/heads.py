"""Few-shot heads: small classifiers on frozen backbone features.

Heads take features, never images: (N, D) float features in, (N, C) logits out. They share one base
that owns the feature normalisation (centring on the training mean, then L2), so the same math runs
at training time and inside the served archive.

Registry: ``HEADS[kind]`` is the class; ``build_head(kind, feature_dim, num_classes)`` makes one,
``head.fit(features, labels)`` trains it, and ``state_dict()`` / ``load_state_dict()`` round-trip it.
"""

from __future__ import annotations

import abc
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn


class FeatureHead(nn.Module, abc.ABC):
    """Base of all heads. ``forward``: features (N, D) -> logits (N, C)."""

    kind: ClassVar[str]

    def __init__(self, feature_dim: int, num_classes: int):
        super().__init__()
        self.feature_dim = feature_dim
        self.num_classes = num_classes
        # Mean of the training features; subtracting it removes the direction all ImageNet
        # features share, which otherwise dominates cosine similarities between classes.
        self.register_buffer("center", torch.zeros(feature_dim))

    def normalise(self, features: torch.Tensor) -> torch.Tensor:
        """(N, D) -> (N, D): centred and L2-normalised."""
        return F.normalize(features.float() - self.center, dim=1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.logits(self.normalise(features))

    @abc.abstractmethod
    def logits(self, normalised: torch.Tensor) -> torch.Tensor:
        """(N, D) normalised features -> (N, C) logits."""

    @abc.abstractmethod
    def fit(self, features: torch.Tensor, labels: torch.Tensor, **options) -> dict:
        """Train on (N, D) features and (N,) int64 labels in [0, C). Returns a summary dict."""


HEADS: dict[str, type[FeatureHead]] = {}


def register_head(cls: type[FeatureHead]) -> type[FeatureHead]:
    HEADS[cls.kind] = cls
    return cls


def build_head(kind: str, feature_dim: int, num_classes: int) -> FeatureHead:
    try:
        cls = HEADS[kind]
    except KeyError:
        raise ValueError(f"unknown head {kind!r}; choose from {', '.join(sorted(HEADS))}") from None
    return cls(feature_dim, num_classes)
