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
