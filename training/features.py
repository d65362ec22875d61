"""Frozen-backbone features, computed once in batches and cached on disk.

The backbone runs as it is served: its exported ONNX graph (imagerec/export.py, cached per weights)
on the worker's runtime (handlers/runtime.py), several times faster than eager torch here; ``engine=
"eager"`` runs torch instead. fp32 features of both agree within 1e-5.

Cache key: backbone weights sha256 / transform description / image content sha256. The plain view
uses the served eval transform (``handlers.imaging``), so a cached feature is what the served model
computes for the same file. Augmented views (random resized crop, flip, colour jitter, small
rotation, built from the backbone's ``preprocessing``) are seeded per image and view index, so view
``i`` of an image is the same array on every run and can be cached too.

Features are numpy float32 arrays. torch (and torchvision) are imported only when a feature must be
computed with them: augmenting a photo, or the eager backbone. A warm run (every feature cached)
never imports torch, whose import alone costs 1.7 s of its 2 s budget.

Layout: ``<cache>/<weights sha[:16]>/<transform key>/<image sha[:2]>/<image sha>.npy`` holding a
(V, D) float32 array: the plain view (V = 1), or augmented views 0..V-1 of that image. numpy's
format, not torch.save's: a warm train_head reads hundreds of these, and np.load takes about a
third of torch.load's time per file (700 files of (3, 1280): 0.04 s against 0.13 s, quiet machine).
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from handlers.backbones import Preprocessing, get_backbone
from handlers.imaging import GEOMETRY_VERSION, decode_image, eval_transform
from handlers.layout import FEATURES_GRAPH_FILE, file_sha256
from handlers.runtime import PortableFeatures, default_engine
from imagerec.files import atomic_write
from imagerec.paths import user_cache_dir

logger = logging.getLogger(__name__)

CACHE_ENV_VAR = "IMAGEREC_FEATURE_CACHE"
CACHE_VERSION = "v2"  # bump when the file format or the meaning of a key changes (v2: .npy files)


def default_cache_dir() -> Path:
    """``$IMAGEREC_FEATURE_CACHE``, else ``$XDG_CACHE_HOME/imagerec/features`` (``~/.cache/...``)."""
    return user_cache_dir("features", CACHE_ENV_VAR)


@dataclass(frozen=True)
class Augmentation:
    """Training-time views. Geometry comes from the backbone's preprocessing, never re-typed."""

    # Defaults measured on clothing10/hymenoptera (docs/BENCHMARKS.md): mild crops + flips helped the
    # linear head as much as stronger views (crops down to 35% area, jitter 0.2, 10 degree rotation)
    # at half the views; jitter and rotation stay available for photos that need them.
    min_scale: float = 0.6  # smallest crop area of a random resized crop, as a fraction of the image
    jitter: float = 0.0  # brightness/contrast/saturation jitter
    rotation: float = 0.0  # degrees, either way

    def transform(self, preprocessing: Preprocessing):
        """RGB PIL image -> a randomly augmented, normalised float tensor (3, crop, crop), drawn from
        torch's global generator (``FeatureExtractor`` seeds it per image and view)."""
        # Imported here: a warm run (every feature cached) never augments, and importing torch and
        # torchvision costs more than its whole 2 s budget.
        import torch
        from torchvision.transforms import v2 as T

        return T.Compose(
            [
                # Resize first as the eval path does: crops then see the same detail scale.
                T.Resize(preprocessing.resize_size, interpolation=T.InterpolationMode.BILINEAR, antialias=True),
                *([T.RandomRotation(self.rotation, interpolation=T.InterpolationMode.BILINEAR)] if self.rotation else []),
                T.RandomResizedCrop(preprocessing.crop_size, scale=(self.min_scale, 1.0), antialias=True),
                T.RandomHorizontalFlip(),
                *([T.ColorJitter(brightness=self.jitter, contrast=self.jitter, saturation=self.jitter)] if self.jitter else []),
                T.PILToTensor(),
                T.ToDtype(torch.float32, scale=True),
                T.Normalize(preprocessing.mean, preprocessing.std),
            ]
        )

    def describe(self, preprocessing: Preprocessing, seed: int) -> str:
        return f"aug:{self.min_scale}:{self.jitter}:{self.rotation}:seed{seed}:{_describe(preprocessing)}"


def _save_array(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as file:  # a file object: np.save would append ".npy" to a partial file's name
        np.save(file, np.asarray(array, np.float32), allow_pickle=False)


def _describe(preprocessing: Preprocessing) -> str:
    return (f"resize{preprocessing.resize_size}:crop{preprocessing.crop_size}:"
            f"mean{preprocessing.mean}:std{preprocessing.std}:{GEOMETRY_VERSION}")


@dataclass
class ExtractionStats:
    images: int = 0  # images asked for
    cached: int = 0  # served from the cache
    extracted: int = 0  # images decoded and run through the backbone
    failed: int = 0  # images that could not be decoded (they were listed)
    forward_passes: int = 0  # backbone inputs computed (images x views)
    seconds: float = 0.0

    def add(self, other: "ExtractionStats") -> None:
        for name in ("images", "cached", "extracted", "failed", "forward_passes", "seconds"):
            setattr(self, name, getattr(self, name) + getattr(other, name))


class FeatureExtractor:
    """Features of image files for one backbone + weights, with an on-disk cache.

    ``extract(paths)`` -> (N, D) plain-view features; ``extract(paths, views=V, seed=S)`` ->
    (N, V, D) augmented views; float32 numpy arrays. ``hashes`` (sha256 of each file) may be given
    to skip rehashing. ``engine``: "onnxruntime", "openvino" or "eager" (default: the served one);
    ``precision``: "fp32" or "bf16" (the accuracy guard's reduced-precision features; cached apart
    from fp32); ``threads``: the backbone's threads (0: all cores).
    """

    def __init__(self, backbone_name: str, weights_path: str | Path | None = None,
                 cache_dir: str | Path | None = None, batch_size: int = 32,
                 augmentation: Augmentation | None = None, progress: bool = True, use_cache: bool = True,
                 engine: str | None = None, precision: str = "fp32", export_cache: str | Path | None = None,
                 threads: int = 0):
        self.backbone = get_backbone(backbone_name)
        self.weights_path = Path(weights_path) if weights_path else self.backbone.resolve_weights()
        self.weights_sha256 = file_sha256(self.weights_path)
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
        self.batch_size = batch_size
        self.augmentation = augmentation or Augmentation()
        self.progress = progress
        self.use_cache = use_cache
        self.preprocessing = self.backbone.preprocessing
        self.eval_transform = eval_transform(self.preprocessing)
        self._train_transform = None  # built on the first augmented cache miss
        self.stats = ExtractionStats()
        self.engine = engine or default_engine(precision)
        self.precision = precision
        self.export_cache = export_cache
        self.threads = threads or os.cpu_count() or 1
        self._network = None  # loaded on the first cache miss: a warm run never pays for it
        # Called with the number of views just finished (from the cache or the backbone): a caller's
        # machine-readable progress (train_head --progress-file), beside the human progress bar.
        self.on_progress = None

    @property
    def train_transform(self):
        if self._train_transform is None:
            self._train_transform = self.augmentation.transform(self.preprocessing)
        return self._train_transform

    @property
    def features(self):
        """numpy (N, 3, H, W) -> (N, D) float32: the exported graph on ``engine``, else eager torch."""
        if self._network is None:
            if self.engine != "eager":
                from imagerec.export import exported_graph_dir  # build-time code: only on a cache miss

                graph = exported_graph_dir(self.backbone.name, self.weights_path, self.export_cache)
                self._network = PortableFeatures(graph / FEATURES_GRAPH_FILE, self.engine, self.precision,
                                                 self.threads)
            else:
                self._network = self._eager_features()
        return self._network

    def _eager_features(self):
        """The backbone in torch, numpy in and out."""
        import torch  # here: only eager extraction runs torch (its import is most of a warm run's budget)

        torch.set_num_threads(self.threads)
        network = self.backbone.load(self.weights_path)
        for parameter in network.parameters():
            parameter.requires_grad_(False)
        bf16 = self.precision == "bf16"

        def eager(images: np.ndarray) -> np.ndarray:
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                return network.features(torch.from_numpy(images)).float().numpy()

        return eager

    def _key_dir(self, description: str) -> Path:
        if self.precision != "fp32":  # fp32 features agree across engines within 1e-5; bf16 ones do not
            description = f"{description}:{self.precision}"
        key = hashlib.sha256(f"{CACHE_VERSION}|{description}".encode()).hexdigest()[:16]
        return self.cache_dir / self.weights_sha256[:16] / key

    def _cache_file(self, key_dir: Path, image_sha: str) -> Path:
        return key_dir / image_sha[:2] / f"{image_sha}.npy"

    def _load_cached(self, path: Path, views: int) -> np.ndarray | None:
        if not self.use_cache or not path.is_file():
            return None
        try:
            array = np.load(path, allow_pickle=False)
        except Exception:  # a torn write from a killed run: recompute it
            return None
        if array.ndim != 2 or array.shape[0] < views or array.shape[1] != self.backbone.feature_dim:
            return None
        return array[:views]

    def _store(self, path: Path, array: np.ndarray) -> None:
        if not self.use_cache:
            return
        # Atomic: concurrent runs never read half a file.
        atomic_write(path, lambda partial: _save_array(partial, array))

    def extract(self, paths: list[Path], hashes: list[str] | None = None, views: int = 0, seed: int = 0,
                description: str = "features") -> np.ndarray:
        """Plain features (N, D) when ``views == 0``, else augmented views (N, views, D).

        A file that cannot be decoded raises ImageError naming it (data loading lists and drops
        unreadable files beforehand, so this means the file changed underneath us).
        """
        started = time.perf_counter()
        hashes = list(hashes) if hashes is not None else [file_sha256(p) for p in paths]
        n_views = views or 1
        transform_key = self.augmentation.describe(self.preprocessing, seed) if views else f"eval:{_describe(self.preprocessing)}"
        key_dir = self._key_dir(transform_key)
        out, missing = self._read_cache(key_dir, hashes, n_views)
        stats = ExtractionStats(images=len(paths), cached=len(paths) - len(missing), extracted=len(missing))
        if self.on_progress and stats.cached:
            self.on_progress(stats.cached * n_views)
        stats.forward_passes = self._compute(paths, hashes, missing, out, key_dir, views, seed, description)
        stats.seconds = time.perf_counter() - started
        self.stats.add(stats)
        if missing:
            logger.info("%s: %d images from cache, %d extracted (%d backbone passes) in %.1fs",
                        description, stats.cached, stats.extracted, stats.forward_passes, stats.seconds)
        else:
            logger.info("%s: all %d images from cache", description, stats.cached)
        return out if views else out[:, 0]

    def _read_cache(self, key_dir: Path, hashes: list[str], n_views: int) -> tuple[np.ndarray, list[int]]:
        """(N, n_views, D) with the cached rows filled in, and the indices still to compute."""
        out = np.empty((len(hashes), n_views, self.backbone.feature_dim), np.float32)
        missing = []
        for index, digest in enumerate(hashes):
            cached = self._load_cached(self._cache_file(key_dir, digest), n_views)
            if cached is None:
                missing.append(index)
            else:
                out[index] = cached
        return out, missing

    def _inputs(self, path: Path, digest: str, views: int, seed: int) -> list[np.ndarray]:
        """The backbone inputs of one image: its eval view, or its ``views`` augmented views."""
        image = decode_image(Path(path).read_bytes(), min_side=self.preprocessing.resize_size)
        if not views:
            return [self.eval_transform(image)]
        import torch  # the augmentations draw from torch's generator: only when views are computed

        inputs = []
        for view in range(views):
            # One seed per (run seed, image content, view): reproducible and independent of the
            # image's position in the list, so cached views stay valid.
            view_seed = int(hashlib.sha256(f"{seed}:{digest}:{view}".encode()).hexdigest()[:15], 16)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(view_seed)
                inputs.append(self.train_transform(image).numpy())
        return inputs

    def _compute(self, paths: list[Path], hashes: list[str], missing: list[int], out: np.ndarray, key_dir: Path,
                 views: int, seed: int, description: str) -> int:
        """Fill ``out[missing]`` in backbone batches, caching each image once all its views are done.
        Returns the number of backbone inputs computed."""
        bar = tqdm(total=len(missing) * (views or 1), desc=description, unit="view" if views else "img",
                   disable=not self.progress or not missing, leave=False)
        pending_inputs, pending_slots, finished = [], [], []
        passes = 0

        def flush():
            nonlocal passes
            if pending_inputs:
                features = self.features(np.stack(pending_inputs))
                for (index, view), feature in zip(pending_slots, features):
                    out[index, view] = feature
                passes += len(pending_inputs)
                bar.update(len(pending_inputs))
                if self.on_progress:
                    self.on_progress(len(pending_inputs))
                pending_inputs.clear()
                pending_slots.clear()
            for done in finished:
                self._store(self._cache_file(key_dir, hashes[done]), out[done])
            finished.clear()

        for index in missing:
            inputs = self._inputs(paths[index], hashes[index], views, seed)
            pending_inputs.extend(inputs)
            pending_slots.extend((index, view) for view in range(len(inputs)))
            finished.append(index)
            if len(pending_inputs) >= self.batch_size:
                flush()
        flush()
        bar.close()
        return passes
