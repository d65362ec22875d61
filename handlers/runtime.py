"""The backbone's fast path: the archive's portable ONNX graph run by ONNX Runtime or OpenVINO.

The graph (imagerec/export.py writes it at build time) holds plain ONNX operators: nothing in it is
specific to the machine that built it. The runtime picks its kernels for this CPU when the worker
loads it, with the worker's thread count, so an archive is fast on every x86 CPU.

Precision is chosen first, on the machine that serves (``choose_precision``): bf16 only where the
archive's accuracy guard allowed it (model_info.json ``precision_guard``, judged by task accuracy
at build time) and this CPU makes it pay: AMX. With AVX-512 bf16 alone (no AMX) bf16 ran 1.3-1.7x
slower than fp32 here (docs/bench/runtime.md); ``$IMAGEREC_BACKBONE_PRECISION=bf16`` takes it there
anyway, ``=fp32`` never. The log says what was chosen and why.

Then the engine (``$IMAGEREC_BACKBONE_RUNTIME`` overrides; docs/bench/runtime.md has the
measurements behind the defaults):
- ``onnxruntime`` for fp32: the fastest fp32 peer here at batch 1 and 8, and the lighter worker;
- ``openvino`` for bf16: ONNX Runtime has no bf16 CPU path;
- ``eager``: torch, the reference; also what runs when the graph is missing or cannot be loaded.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np

from handlers.layout import FEATURES_DATA_FILE, FEATURES_GRAPH_FILE, FEATURES_INDEX_FILE, file_sha256
from handlers.machine import cpu_flags

logger = logging.getLogger(__name__)

ENGINES = ("onnxruntime", "openvino", "eager")
ENGINE_VAR = "IMAGEREC_BACKBONE_RUNTIME"
PRECISION_VAR = "IMAGEREC_BACKBONE_PRECISION"  # operators: fp32, or bf16 (still only where the guard allowed it)
# Tests and operators can hide CPU flags (comma-separated, as in /proc/cpuinfo), as on a CPU without them.
HIDE_FLAGS_VAR = "IMAGEREC_HIDE_CPU_FLAGS"
REDUCED_PRECISIONS = ("bf16",)
NATIVE_BF16_FLAGS = {"avx512_bf16", "amx_bf16"}  # bf16 computed in hardware
FAST_BF16_FLAGS = {"amx_bf16"}  # ... and faster than fp32 (measured)
_OPENVINO_PRECISION = {"fp32": "f32", "bf16": "bf16"}


def _visible_flags() -> set[str]:
    hidden = {flag.strip().lower() for flag in os.environ.get(HIDE_FLAGS_VAR, "").split(",") if flag.strip()}
    return cpu_flags() - hidden


def cpu_precisions() -> set[str]:
    """Precisions this CPU computes natively (what the accuracy guard can judge here)."""
    return {"fp32"} | ({"bf16"} if _visible_flags() & NATIVE_BF16_FLAGS else set())


def engine_override() -> str | None:
    engine = os.environ.get(ENGINE_VAR) or None
    if engine is not None and engine not in ENGINES:
        raise ValueError(f"{ENGINE_VAR}={engine!r}: choose one of {', '.join(ENGINES)}")
    return engine


def default_engine(precision: str) -> str:
    """The engine for ``precision`` unless ``$IMAGEREC_BACKBONE_RUNTIME`` says otherwise."""
    return engine_override() or ("openvino" if precision == "bf16" else "onnxruntime")


def choose_precision(info: dict, requested: str | None = None) -> tuple[str, str]:
    """(precision, why) the backbone runs in on this machine.

    ``requested`` ("fp32", "bf16") forces one (benchmarks, tests). Otherwise the archive's policy
    (model_info.json ``precision``: "fp32" never reduces; "auto" or "bf16" may), its guard's verdict,
    this CPU and ``$IMAGEREC_BACKBONE_PRECISION`` decide.
    """
    if requested is not None:
        return requested, "requested by the caller"
    if info.get("precision", "fp32") == "fp32":
        return "fp32", "the archive asks for fp32"
    verdict = (info.get("precision_guard") or {}).get("bf16")
    if not verdict or not verdict.get("allowed"):
        reason = verdict.get("reason") if verdict else "not judged when the archive was built"
        return "fp32", f"bf16 refused by the accuracy guard: {reason}"
    override = os.environ.get(PRECISION_VAR)
    if override == "fp32":
        return "fp32", f"{PRECISION_VAR}=fp32"
    if "bf16" not in cpu_precisions():
        return "fp32", "this CPU has no native bf16"
    if override != "bf16" and not _visible_flags() & FAST_BF16_FLAGS:
        return "fp32", (f"this CPU has no AMX: bf16 on AVX-512 bf16 alone ran slower than fp32 "
                        f"(set {PRECISION_VAR}=bf16 to use it anyway)")
    return "bf16", f"bf16 allowed by the accuracy guard ({verdict.get('reason')}) and fast here"


def read_weights(model_dir: str | Path) -> dict:
    """The backbone body's state_dict (torch tensors), read from the graph's raw weights file through
    its index: for the eager fallback."""
    import torch  # only the eager fallback runs torch; the ONNX path and training never import it here

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


class PortableFeatures:
    """The feature body run by an ONNX engine: ``body(images)``, numpy (N, 3, H, W) float32 -> (N, D)
    float32, any N. numpy in and out: no torch on this path (a warm train_head never imports it)."""

    def __init__(self, graph: Path, engine: str, precision: str, threads: int):
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
            # Threads sleep while they wait: spinning ones steal the cores that decoding, the frontend and
            # other workers need. Served efficientnet_lite0 with ONNX Runtime's default spinning: 1-client
            # p50 17.0 against 13.1 ms, 16 clients 111 against 123 img/s; spinning only within a forward
            # pass (force_spinning_stop) changed nothing measurable (docs/bench/runtime.md, run 4).
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            options.log_severity_level = 3
            # The memory arena stays on: off, a worker holds about 100 MB less after batches but
            # batch 8 ran 40% slower (docs/bench/runtime.md).
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

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return self._run(np.ascontiguousarray(images, dtype=np.float32))


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
