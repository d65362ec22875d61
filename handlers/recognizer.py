"""An unpacked model archive turned into a ready model (``handlers.layout`` says where each file is).

The TorchServe handler, the tests and the benchmarks all load models through ``load_recognizer``, so
"served" and "in-process" mean the same network, weights, precision and labels.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from handlers.backbones import Backbone, FeatureClassifier, get_backbone
from handlers.compiled import CompiledFeatures, load_compiled_features
from handlers.constants import PRECISIONS
from handlers.heads import FeatureHead, build_head
from handlers.layout import HEAD_FILE, WEIGHTS_FILE, ArchiveContents

logger = logging.getLogger(__name__)


class Recognizer(nn.Module):
    """Frozen backbone plus either its ImageNet classifier or a few-shot head.

    ``forward``: images (N, 3, H, W) float32 -> logits (N, C) float32.
    """

    def __init__(self, network: FeatureClassifier, head: FeatureHead | None = None, precision: str = "fp32"):
        super().__init__()
        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}; choose from {', '.join(PRECISIONS)}")
        self.network = network.eval()
        self.head = head.eval() if head is not None else None
        self.precision = precision
        self.compiled = isinstance(self.network.body, CompiledFeatures)
        # oneDNN's convolutions run faster on NHWC activations, in fp32 as in bf16 (same fp32 math:
        # resnet18 batch 8 measured 13.1 -> 8.2 ms/image here, outputs within 3e-6).
        self.network = self.network.to(memory_format=torch.channels_last)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> (N, D) float32 backbone features."""
        images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            return self.network.features(images).float()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classify(self.features(images))

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        """(N, D) features -> (N, C) logits. The classifier or head is tiny: it stays in fp32 so
        probabilities stay well calibrated."""
        return self.network.classifier(features) if self.head is None else self.head(features)

    @property
    def rejection(self):
        """The head's rejection rule (handlers/rejection.py), or None: the ImageNet classifier and
        heads from before rules existed answer with a class for every photo."""
        if self.head is None or not self.head.rejection.fitted:
            return None
        return self.head.rejection

    def predict(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(N, 3, H, W) -> logits (N, C) and the rejection rule's known-ness scores (N,), or None
        without a rule; one backbone pass for both."""
        features = self.features(images)
        rule = self.rejection
        return self.classify(features), (None if rule is None else rule.score(features))


@dataclass
class LoadedModel:
    recognizer: Recognizer
    labels: list[str]
    info: dict  # model_info.json: backbone, precision, head, training record, metrics
    backbone: Backbone


def load_recognizer(model_dir: str | Path, precision: str | None = None, compile: bool = True) -> LoadedModel:
    """Load an unpacked archive (or a staging directory with the same files).

    ``precision`` overrides the archive's own setting (benchmarks compare fp32 with bf16).
    ``compile``: use the archive's compiled backbone where it was built for this machine and torch
    (handlers/compiled.py); False, or any other precision, runs the eager backbone.
    """
    model_dir = Path(model_dir)
    contents = ArchiveContents(model_dir)
    info = contents.info()
    backbone = get_backbone(info["backbone"])
    network = backbone.load(model_dir / WEIGHTS_FILE)
    head = None
    if info.get("head"):
        head = build_head(info["head"]["type"], backbone.feature_dim, info["head"]["num_classes"])
        head.load_state_dict(torch.load(model_dir / HEAD_FILE, map_location="cpu", weights_only=True))
    labels = contents.labels()
    precision = precision or info.get("precision", "fp32")
    compiled = info.get("compiled")
    if compiled and precision == "fp32" and compile:
        body = load_compiled_features(model_dir, compiled)
        if body is not None:
            network.body = body  # the eager body's weights are freed
    recognizer = Recognizer(network, head, precision)
    for parameter in recognizer.parameters():
        parameter.requires_grad_(False)
    return LoadedModel(recognizer, labels, info, backbone)
