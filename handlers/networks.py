"""The torch side of a backbone: its network split into a feature body and its ImageNet classifier.

Only code that runs a torch model imports this module (``Backbone.load``, the recognizer's eager
fallback, the ONNX export); the backbone registry (handlers/backbones.py) stays importable without
torch, whose import alone costs 1.7 s of a warm train_head's 2 s budget.
"""

from __future__ import annotations

import torch
from torch import nn


class FeatureClassifier(nn.Module):
    """A backbone split into a feature extractor and its ImageNet classifier.

    ``features``: (N, 3, H, W) -> (N, D); ``classifier``: (N, D) -> (N, 1000).
    """

    def __init__(self, body: nn.Module, classifier: nn.Module):
        super().__init__()
        self.body = body
        self.classifier = classifier

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.body(images))


class ConcatenatedFeatures(nn.Module):
    """Several feature bodies on the same input, their features side by side.

    (N, 3, H, W) -> (N, sum of the members' D), in the order of ``bodies``.
    """

    def __init__(self, bodies: dict[str, nn.Module]):
        super().__init__()
        self.members = nn.ModuleDict(bodies)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.cat([body(images) for body in self.members.values()], dim=1)


def averaged_classifier(classifiers: list[nn.Linear]) -> nn.Linear:
    """One linear layer over concatenated features whose logits are the mean of the members' logits.

    ``classifiers[i]``: (N, D_i) -> (N, C); the result: (N, sum D_i) -> (N, C).
    """
    combined = nn.Linear(sum(c.in_features for c in classifiers), classifiers[0].out_features)
    with torch.no_grad():
        combined.weight.copy_(torch.cat([c.weight for c in classifiers], dim=1) / len(classifiers))
        combined.bias.copy_(torch.stack([c.bias for c in classifiers]).mean(0))
    return combined
