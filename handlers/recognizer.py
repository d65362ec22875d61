"""An unpacked model archive turned into a ready model (``handlers.layout`` says where each file is).

The TorchServe handler, the tests and the benchmarks all load models through ``load_recognizer``, so
"served" and "in-process" mean the same network, weights, precision and labels. Images, features and
logits are numpy arrays; torch runs only the models that are torch's (the eager backbone, the
ImageNet classifier), which see tensors made from those arrays at their boundary.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from handlers.backbones import Backbone, get_backbone
from handlers.constants import PRECISIONS
from handlers.heads import FeatureHead, head_from_state
from handlers.layout import (CLASSIFIER_FILE, FEATURES_DATA_FILE, HEAD_FILE, LEGACY_HEAD_FILE, ArchiveContents,
                             file_sha256)
from handlers.networks import FeatureClassifier
from handlers.runtime import PortableFeatures, choose_precision, default_engine, load_portable_features, read_weights

logger = logging.getLogger(__name__)


class Recognizer:
    """Frozen backbone plus either its ImageNet classifier or a few-shot head.

    ``recognizer(images)``: images (N, 3, H, W) float32 -> logits (N, C) float32, numpy arrays.
    """

    def __init__(self, network: FeatureClassifier, head: FeatureHead | None = None, precision: str = "fp32"):
        if precision not in PRECISIONS or precision == "auto":
            raise ValueError(f"unknown precision {precision!r}; choose from fp32, bf16")
        self.network = network.eval()
        self.head = head
        self.precision = precision
        body = self.network.body
        # Which runtime computes the features: "openvino", "onnxruntime" or "eager" (torch).
        self.runtime = body.engine if isinstance(body, PortableFeatures) else "eager"
        # oneDNN's convolutions run faster on NHWC activations, in fp32 as in bf16 (same fp32 math:
        # resnet18 batch 8 measured 13.1 -> 8.2 ms/image here, outputs within 3e-6).
        self.network = self.network.to(memory_format=torch.channels_last)

    def features(self, images: np.ndarray) -> np.ndarray:
        """(N, 3, H, W) -> (N, D) float32 backbone features."""
        if self.runtime != "eager":  # the engine runs the precision it was loaded with
            return self.network.body(images)
        tensor = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            return self.network.features(tensor.contiguous(memory_format=torch.channels_last)).float().numpy()

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return self.classify(self.features(images))

    def classify(self, features: np.ndarray) -> np.ndarray:
        """(N, D) features -> (N, C) logits. The classifier or head is tiny: it stays in fp32 so
        probabilities stay well calibrated."""
        if self.head is not None:
            return self.head(features)
        with torch.inference_mode():
            return self.network.classifier(torch.from_numpy(features)).numpy()

    @property
    def rejection(self):
        """The head's rejection rule (handlers/rejection.py), or None: the ImageNet classifier and
        heads from before rules existed answer with a class for every photo."""
        if self.head is None or not self.head.rejection.fitted:
            return None
        return self.head.rejection

    def predict(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
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


def load_eager_body(model_dir: str | Path, backbone: Backbone) -> nn.Module:
    """The torch feature body of an unpacked archive, its weights read from the graph's raw weights file."""
    body, _ = backbone.split(backbone.build_network())
    missing, unexpected = body.load_state_dict(read_weights(model_dir), strict=False)
    missing = [key for key in missing if not key.endswith("num_batches_tracked")]  # a training counter
    if missing or unexpected:
        raise ValueError(f"{FEATURES_DATA_FILE} does not fit {backbone.name}: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}")
    return body.eval()


def load_classifier(model_dir: str | Path, info: dict, backbone: Backbone) -> nn.Module:
    """The ImageNet classifier of an ImageNet archive; a head archive ships none (its head classifies)."""
    if info.get("head"):
        return nn.Identity()
    classifier = nn.Linear(backbone.feature_dim, info["num_classes"])
    classifier.load_state_dict(torch.load(Path(model_dir) / CLASSIFIER_FILE, map_location="cpu", weights_only=True))
    return classifier


def load_recognizer(model_dir: str | Path, precision: str | None = None, engine: str | None = None) -> LoadedModel:
    """Load an unpacked archive (or a staging directory with the same files).

    ``engine``: "onnxruntime", "openvino" or "eager" (default ``$IMAGEREC_BACKBONE_RUNTIME``, else
    the one handlers/runtime.py picks for the precision). A missing or damaged graph runs eager, with
    a warning.
    ``precision``: None chooses for this machine (the archive's policy, its accuracy guard, this
    CPU: handlers/runtime.py); "fp32" or "bf16" force one (benchmarks, tests).
    """
    model_dir = Path(model_dir)
    contents = ArchiveContents(model_dir)
    info = contents.info()
    backbone = get_backbone(info["backbone"])
    record = info.get("features") or {}
    if record.get("data_sha256") and file_sha256(model_dir / FEATURES_DATA_FILE) != record["data_sha256"]:
        # The weights themselves are damaged: no runtime can answer right, so refuse to load.
        raise ValueError(f"{model_dir}: {FEATURES_DATA_FILE} is damaged (sha256 differs from the manifest)")
    chosen, why = choose_precision(info, precision)
    engine = engine or default_engine(chosen)
    if engine != "openvino" and chosen == "bf16" and precision is None:
        chosen, why = "fp32", f"{why}; but {engine} has no bf16 CPU path"
    if precision is None:
        logger.info("backbone precision %s: %s", chosen, why)
    body = None
    if engine != "eager":
        body = load_portable_features(model_dir, record, engine, chosen, torch.get_num_threads())
    if body is None:
        body = load_eager_body(model_dir, backbone)
        if engine != "eager" and precision is None:
            chosen = "fp32"  # eager bf16 is autocast: slower than fp32 on CPUs without AMX
    network = FeatureClassifier(body, load_classifier(model_dir, info, backbone)).eval()
    head = None
    if info.get("head"):
        head = head_from_state(info["head"]["type"], backbone.feature_dim, info["head"]["num_classes"],
                               read_head_state(model_dir))
    labels = contents.labels()
    for parameter in network.parameters():
        parameter.requires_grad_(False)
    return LoadedModel(Recognizer(network, head, chosen), labels, info, backbone)


def read_head_state(model_dir: str | Path) -> dict[str, np.ndarray]:
    """The head's named arrays: ``HEAD_FILE`` (.npz, no pickle), or in archives made before heads
    were numpy, ``LEGACY_HEAD_FILE``: a torch state_dict whose keys are the same names."""
    model_dir = Path(model_dir)
    if (model_dir / HEAD_FILE).is_file():
        with np.load(model_dir / HEAD_FILE, allow_pickle=False) as saved:
            return {name: saved[name] for name in saved.files}
    legacy = torch.load(model_dir / LEGACY_HEAD_FILE, map_location="cpu", weights_only=True)
    return {name: tensor.numpy() for name, tensor in legacy.items()}
