"""The backbone's fast path: the archive's portable ONNX graph run by OpenVINO or ONNX Runtime.

The graph (imagerec/export.py writes it at build time) holds plain ONNX operators: nothing in it is
specific to the machine that built it. The runtime picks its kernels for this CPU when the worker
loads it, with the worker's thread count, so an archive is fast on every x86 CPU.

Engines (``$IMAGEREC_BACKBONE_RUNTIME`` chooses; ``DEFAULT_ENGINE`` otherwise):
- ``openvino`` (default): fastest at batch 8 here and the only one of the two with a bf16 CPU path
  (AVX-512 bf16 / AMX); docs/bench/runtime.md has the in-worker measurements behind the choice.
- ``onnxruntime``: the same graph and answers; the peer it was chosen against.
- ``eager``: torch, the reference; also what runs when the graph is missing or cannot be loaded.

Reduced precision is chosen here, on the machine that serves: bf16 only where the archive's guard
verdict allows it (model_info.json ``precision_guard``, judged by task accuracy at build time) and
this CPU runs bf16 natively; otherwise fp32, and the log says why.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from handlers.constants import FEATURES_DATA_FILE, FEATURES_GRAPH_FILE, FEATURES_INDEX_FILE
from handlers.manifest import file_sha256

logger = logging.getLogger(__name__)

ENGINES = ("openvino", "onnxruntime", "eager")
DEFAULT_ENGINE = "openvino"
ENGINE_VAR = "IMAGEREC_BACKBONE_RUNTIME"
# Tests and operators can hide this CPU's reduced-precision units (as on a CPU without them).
HIDE_CAPABILITIES_VAR = "IMAGEREC_HIDE_CPU_CAPABILITIES"
REDUCED_PRECISIONS = ("bf16",)
_OPENVINO_PRECISION = {"fp32": "f32", "bf16": "bf16"}


def worker_threads(workers: int, torch_threads: int = 0) -> int:
    """Threads of each worker: ``torch_threads`` if set, else the machine's cores divided among the
    workers, never fewer than one (no oversubscription)."""
    if torch_threads > 0:
        return torch_threads
    return max(1, (os.cpu_count() or 1) // max(1, workers))


def selected_engine() -> str:
    engine = os.environ.get(ENGINE_VAR, DEFAULT_ENGINE)
    if engine not in ENGINES:
        raise ValueError(f"{ENGINE_VAR}={engine!r}: choose one of {', '.join(ENGINES)}")
    return engine


def _hidden_capabilities() -> set[str]:
    return {item.strip().upper() for item in os.environ.get(HIDE_CAPABILITIES_VAR, "").split(",") if item.strip()}


def cpu_precisions(engine: str) -> set[str]:
    """Precisions this CPU runs natively with ``engine``, as the engine itself reports them."""
    if engine != "openvino":
        return {"fp32"}  # ONNX Runtime's CPU kernels have no bf16 path; eager bf16 is autocast, slower here
    import openvino as ov

    capabilities = set(ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")) - _hidden_capabilities()
    return {"fp32"} | ({"bf16"} if "BF16" in capabilities else set())


def choose_precision(info: dict, engine: str, requested: str | None = None) -> tuple[str, str]:
    """(precision, why) the backbone runs in on this machine.

    ``requested`` ("fp32", "bf16") forces one (benchmarks, tests). Otherwise the archive's policy
    decides (model_info.json ``precision``): "fp32" never reduces; "auto" or "bf16" take bf16 where
    the archive's accuracy guard allowed it and this CPU runs it natively with ``engine``.
    """
    if requested is not None:
        return requested, "requested by the caller"
    policy = info.get("precision", "fp32")
    if policy == "fp32":
        return "fp32", "the archive asks for fp32"
    verdicts = info.get("precision_guard") or {}
    reasons = []
    for precision in REDUCED_PRECISIONS if policy == "auto" else (policy,):
        verdict = verdicts.get(precision)
        if not verdict or not verdict.get("allowed"):
            reasons.append(f"{precision} refused by the accuracy guard: "
                           f"{verdict.get('reason') if verdict else 'not judged when the archive was built'}")
        elif engine == "eager":
            reasons.append(f"{precision} would be autocast in eager torch, slower than fp32 here")
        elif precision not in cpu_precisions(engine):
            reasons.append(f"this CPU has no native {precision} for {engine}")
        else:
            return precision, f"{precision} allowed by the accuracy guard ({verdict.get('reason')}), native here"
    return "fp32", "; ".join(reasons)


def read_weights(model_dir: str | Path) -> dict[str, torch.Tensor]:
    """The backbone body's state_dict, read from the graph's raw weights file through its index."""
    model_dir = Path(model_dir)
    index = json.loads((model_dir / FEATURES_INDEX_FILE).read_text())
    raw = np.fromfile(model_dir / FEATURES_DATA_FILE, dtype=np.uint8)
    state = {}
    for key, entry in index["tensors"].items():
        chunk = raw[entry["offset"]: entry["offset"] + entry["length"]]
        if chunk.size != entry["length"]:
            raise ValueError(f"{FEATURES_DATA_FILE} is truncated: {key} lies beyond its end")
        state[key] = torch.from_numpy(chunk.view(np.float32).reshape(entry["shape"]).copy())
    return state


class PortableFeatures(nn.Module):
    """The feature body run by an ONNX engine: (N, 3, H, W) float32 -> (N, D) float32, any N."""

    def __init__(self, graph: Path, engine: str, precision: str, threads: int):
        super().__init__()
        self.engine, self.precision, self.threads = engine, precision, threads
        if engine == "openvino":
            import openvino as ov

            config = {
                "INFERENCE_NUM_THREADS": threads,
                "INFERENCE_PRECISION_HINT": _OPENVINO_PRECISION[precision],
                "PERFORMANCE_HINT": "LATENCY",  # one stream: the worker runs one batch at a time
                "NUM_STREAMS": 1,
            }
            compiled = ov.Core().compile_model(str(graph), "CPU", config)
            self._request = compiled.create_infer_request()
            self._run = self._run_openvino
        elif engine == "onnxruntime":
            import onnxruntime as ort

            options = ort.SessionOptions()
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
            # Workers share the cores: threads that spin while waiting steal them from the others.
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            options.log_severity_level = 3
            self._session = ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
            self._input = self._session.get_inputs()[0].name
            self._run = self._run_onnxruntime
        else:
            raise ValueError(f"unknown engine {engine!r}")

    def _run_openvino(self, images: np.ndarray) -> np.ndarray:
        self._request.infer({0: images})
        return self._request.get_output_tensor(0).data.copy()  # the request reuses its output buffer

    def _run_onnxruntime(self, images: np.ndarray) -> np.ndarray:
        return self._session.run(None, {self._input: images})[0]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        array = np.ascontiguousarray(images.detach().to(torch.float32).numpy())
        return torch.from_numpy(self._run(array))


def load_portable_features(model_dir: str | Path, record: dict, engine: str, precision: str,
                           threads: int) -> PortableFeatures | None:
    """The fast body, or None (the caller runs eager, with this warning) when the graph is missing,
    is not the one the archive was built with, or the engine cannot load it.

    ``record``: the manifest's ``features`` entry (graph file name and its sha256).
    """
    graph = Path(model_dir) / record.get("graph", FEATURES_GRAPH_FILE)
    try:
        if not graph.is_file():
            raise FileNotFoundError(f"{graph.name} is missing")
        if record.get("graph_sha256") and file_sha256(graph) != record["graph_sha256"]:
            raise ValueError(f"{graph.name} is damaged (its sha256 is not the one recorded at build time)")
        return PortableFeatures(graph, engine, precision, threads)
    except Exception as error:  # any failure of the fast path: still serve, eager
        message = str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__
        logger.warning("backbone graph not used, running the eager backbone instead (%s: %s)", engine, message)
        return None
