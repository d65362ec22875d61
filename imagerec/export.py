"""Exporting a backbone's feature body to ONNX once, at build time, for handlers/runtime.py to run.

The graph is portable: plain ONNX operators, no code compiled for the build machine, so an archive
built here runs its fast path on any x86 CPU (ONNX Runtime and OpenVINO pick their kernels when the
worker loads). One export per backbone weights and exporter version, cached like the feature cache
(``~/.cache/imagerec/onnx`` or ``$IMAGEREC_ONNX_CACHE``): few-shot heads on one backbone reuse it.

Layout of an export (``FEATURES_GRAPH_FILE`` + ``FEATURES_DATA_FILE`` + ``FEATURES_INDEX_FILE``):
the graph keeps its batch norms unfused and its weights as ONNX external data in one raw file, named
by the body's ``state_dict`` keys. Both runtimes fuse the batch norms themselves when they load the
graph, and the same raw file is the eager fallback's weights (read through the index): an archive
carries the backbone's weights once.

Runs in the build environment (torch with ``torch.onnx`` and onnxscript); the worker never imports it.
torch itself is imported only to export: finding a cached export (a warm train_head) must not pay
the 1.7 s its import costs.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from handlers.backbones import get_backbone
from handlers.layout import FEATURES_DATA_FILE, FEATURES_GRAPH_FILE, FEATURES_INDEX_FILE, file_sha256
from handlers.machine import torch_version
from imagerec.paths import user_cache_dir

logger = logging.getLogger(__name__)

CACHE_DIR_VAR = "IMAGEREC_ONNX_CACHE"
# Bump when the export's layout or meaning changes (old cache entries are then never read).
EXPORT_FORMAT = 2
EXPORT_FILES = (FEATURES_GRAPH_FILE, FEATURES_DATA_FILE, FEATURES_INDEX_FILE)
INPUT_NAME, OUTPUT_NAME = "images", "features"
MAX_BATCH = 1024  # the graph's dynamic batch dimension runs from 1 to this


def default_cache_dir() -> Path:
    return user_cache_dir("onnx", CACHE_DIR_VAR)


def exporter_version() -> dict:
    """What an export depends on besides the weights: the exporter's packages and our format."""
    # torch's version from its package metadata: the cache key must be computable without importing torch.
    versions = {"format": EXPORT_FORMAT, "torch": torch_version()}
    for package in ("onnxscript", "onnx_ir"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return versions


def _export(backbone_name: str, weights: Path, target_dir: Path) -> None:
    """Export the feature body of ``weights`` into ``target_dir`` (graph + raw weights + index)."""
    import onnx
    import onnx_ir
    import torch  # here, not at the top: only an actual export needs it (module docstring)
    from onnx import external_data_helper, numpy_helper
    from onnxscript import optimizer

    backbone = get_backbone(backbone_name)
    body = backbone.load(weights).body
    size = backbone.preprocessing.crop_size  # the backbone says its input size
    example = torch.zeros(1, 3, size, size)
    # The exporter prints its progress to stdout, where CLIs print their one result line.
    with torch.inference_mode(False), torch.no_grad(), contextlib.redirect_stdout(sys.stderr):
        # optimize=False: the exporter's optimiser would fold batch norms into the convolutions and
        # rename the weights, which would then no longer be the body's state_dict.
        program = torch.onnx.export(
            body, (example,), dynamo=True, optimize=False, verbose=False, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=MAX_BATCH)},),
        )
    model = program.model
    # Fold what depends on constants only (padding sizes, shapes): ONNX Runtime runs an unfolded
    # export about 5x slower here. Batch norms stay: they are weights, not constants to fold.
    optimizer.fold_constants(model)
    optimizer.remove_unused_nodes(model)
    proto = onnx_ir.to_proto(model)

    # The body's weights go to one raw file, in the graph's order, each at a 64-byte aligned offset;
    # everything else (folded shapes and paddings) stays inline, where both runtimes read it at load.
    wanted = {key: value for key, value in body.state_dict().items() if value.is_floating_point()}
    tensors, offset = {}, 0
    with open(target_dir / FEATURES_DATA_FILE, "wb") as data:
        for initializer in proto.graph.initializer:
            if initializer.name not in wanted or initializer.data_type != onnx.TensorProto.FLOAT:
                continue
            array = numpy_helper.to_array(initializer)
            if not torch.equal(torch.from_numpy(array.copy()), wanted[initializer.name].float()):
                raise RuntimeError(f"exported {backbone_name} graph: weight {initializer.name} differs from the state_dict")
            padding = -offset % 64
            data.write(b"\0" * padding)
            offset += padding
            raw = array.astype("<f4").tobytes()
            data.write(raw)
            initializer.ClearField("float_data")
            initializer.raw_data = raw  # set_external_data wants it present; cleared just after
            external_data_helper.set_external_data(initializer, FEATURES_DATA_FILE, offset, len(raw))
            initializer.ClearField("raw_data")
            tensors[initializer.name] = {"offset": offset, "length": len(raw), "shape": list(array.shape)}
            offset += len(raw)
    missing = sorted(set(wanted) - set(tensors))
    if missing:
        raise RuntimeError(f"exported {backbone_name} graph lacks weights {missing[:5]}: the exporter renamed them")
    onnx.save_model(proto, str(target_dir / FEATURES_GRAPH_FILE))
    index = {"backbone": backbone_name, "dtype": "float32", "tensors": tensors}
    (target_dir / FEATURES_INDEX_FILE).write_text(json.dumps(index))


def exported_graph_dir(backbone_name: str, weights: str | Path, cache_dir: str | Path | None = None) -> Path:
    """The cache directory holding the feature graph of these weights, exported first if need be."""
    weights = Path(weights)
    key_text = json.dumps({"backbone": backbone_name, "weights": file_sha256(weights), **exporter_version()},
                          sort_keys=True)
    key = hashlib.sha256(key_text.encode()).hexdigest()[:24]
    cached = Path(cache_dir or default_cache_dir()) / f"{backbone_name}-{key}"
    if all((cached / name).is_file() for name in EXPORT_FILES):
        logger.info("ONNX graph of %s from the cache: %s", backbone_name, cached)
    else:
        started = time.perf_counter()
        logger.info("exporting %s to ONNX: once per backbone weights, about 10-20 s", backbone_name)
        cached.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cached.parent, prefix=".export-") as tmp:
            _export(backbone_name, weights, Path(tmp))
            shutil.rmtree(cached, ignore_errors=True)
            os.replace(tmp, cached)  # atomic: a concurrent build never sees half an export
            Path(tmp).mkdir()  # for TemporaryDirectory's own cleanup
        logger.info("exported %s in %.1f s", backbone_name, time.perf_counter() - started)
    return cached


def export_features(backbone_name: str, weights: str | Path, out_dir: str | Path,
                    cache_dir: str | Path | None = None) -> dict:
    """Export (or take from the cache) the feature graph into ``out_dir``; return its manifest record."""
    cached = exported_graph_dir(backbone_name, weights, cache_dir)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in EXPORT_FILES:
        shutil.copyfile(cached / name, out_dir / name)
    return {"format": "onnx", "exporter": exporter_version(), "input": INPUT_NAME, "output": OUTPUT_NAME,
            "graph": FEATURES_GRAPH_FILE, "data": FEATURES_DATA_FILE, "index": FEATURES_INDEX_FILE,
            "graph_sha256": file_sha256(out_dir / FEATURES_GRAPH_FILE),
            "data_sha256": file_sha256(out_dir / FEATURES_DATA_FILE)}
