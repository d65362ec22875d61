"""TorchServe handler (TorchServe wants exactly one class in this module): image bytes in, Top-3 ``[{"label", "index", "probability"}]`` out.

A head with a rejection rule (handlers/rejection.py) answers a photo that fits none of its classes
with ``{"label": "unknown", ...}`` first, then its Top-3 classes (README "Unknown photos"); the
``X-Keep`` request header asks for another strictness for that request.

Serves both kinds of archive (ImageNet backbone, few-shot head); ``model_info.json`` says which.
``handle()`` is TorchServe's BaseHandler orchestration; this class overrides only the three steps,
each ``@timed`` as BaseHandler's are (``handler: profile: true`` in model-config.yaml reports them).
Each request of a batch succeeds or fails on its own: a bad image gets its own 4xx JSON error while
the other images of the same batch are answered.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http import HTTPStatus

import numpy as np
import torch

# TorchServe's BaseHandler imports openvino.torch (OpenVINO's torch.compile backend) whenever
# OpenVINO is installed: about 140 MB more per worker, for a feature we never use (the backbone runs
# through OpenVINO's own runtime, handlers/runtime.py). Mark it absent before that import.
sys.modules.setdefault("openvino.torch", None)
from ts.handler_utils.timer import timed  # noqa: E402
from ts.torch_handler.base_handler import BaseHandler  # noqa: E402

from handlers.arrays import softmax
from handlers.constants import KEEP_HEADER, TOP_K, UNKNOWN_LABEL, VERSION_HEADER
from handlers.handler_metrics import HandlerMetrics
from handlers.imaging import ImageError, ImagePreprocessor
from handlers.machine import worker_threads
from handlers.payload import Batch, RequestError, request_bytes
from handlers.recognizer import load_recognizer
from handlers.rejection import validate_keep

logger = logging.getLogger(__name__)

# After this many seconds without a batch, hand the freed activation memory back to the OS: glibc
# keeps a batch's peak (about 80 MB at batch 8) otherwise, in every worker, for ever.
IDLE_TRIM_S = 2.0
_LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
_MALLOC_TRIM = getattr(_LIBC, "malloc_trim", None)  # glibc only


class RecognitionHandler(BaseHandler):
    def initialize(self, context):
        properties = context.system_properties
        model_dir = properties["model_dir"]
        self.model_yaml_config = getattr(context, "model_yaml_config", None) or {}
        self._set_threads(self.model_yaml_config)
        loaded = load_recognizer(model_dir)
        self.model = loaded.recognizer
        self.labels = loaded.labels
        self.info = loaded.info
        self.preprocessor = ImagePreprocessor(loaded.backbone.preprocessing)
        # Decoding, resizing (Pillow) and scaling (numpy) run with the GIL released: spread a batch's
        # images over as many threads as the worker has cores (the backbone's threads are idle then).
        self.decode_pool = ThreadPoolExecutor(max_workers=torch.get_num_threads(), thread_name_prefix="decode")
        self.version = str(context.manifest.get("model", {}).get("modelVersion", self.info.get("version", "")))
        self.top_k = min(TOP_K, len(self.labels))
        self.device = torch.device("cpu")
        self.manifest = context.manifest
        self.handler_metrics = HandlerMetrics(str(context.model_name), self.version)
        self.initialized = True
        self._last_batch = time.monotonic()
        self._trim_timer = None
        self._warm_up()
        logger.info(
            "loaded %s v%s: backbone %s (%s, %s), %d classes, %d threads",
            self.info.get("name"), self.version, self.info["backbone"], self.model.precision,
            self.model.runtime, len(self.labels), torch.get_num_threads(),
        )

    @staticmethod
    def _set_threads(model_yaml_config: dict):
        """One worker per model by default: give it the cores, never more (no oversubscription)."""
        options = model_yaml_config.get("handler") or {}
        # The backbone's runtime (handlers/runtime.py) takes the same thread count.
        torch.set_num_threads(worker_threads(int(model_yaml_config.get("minWorkers") or 1),
                                             int(options.get("torch_threads") or 0)))
        try:
            torch.set_num_interop_threads(1)
        except RuntimeError:  # only settable before the first parallel op; fine if already set
            pass

    def _warm_up(self):
        # The first forward allocates and picks kernels; do it now, not in a user's request. One image
        # only: warming a full batch too left ONNX Runtime's arena holding that batch's activations in
        # every idle worker (idle PSS 261-273 MB against 199-220 MB: docs/bench/runtime.md).
        size = self.preprocessor.preprocessing.crop_size
        self.model(np.zeros((1, 3, size, size), np.float32))
        self._batch_done()

    def _batch_done(self):
        """Arm the idle trim (one timer at a time; off the request path)."""
        self._last_batch = time.monotonic()
        if _MALLOC_TRIM is not None and (self._trim_timer is None or not self._trim_timer.is_alive()):
            self._schedule_trim(IDLE_TRIM_S)

    def _schedule_trim(self, delay: float):
        self._trim_timer = threading.Timer(delay, self._trim_if_idle)
        self._trim_timer.daemon = True
        self._trim_timer.start()

    def _trim_if_idle(self):
        idle = time.monotonic() - self._last_batch
        if idle < IDLE_TRIM_S:  # batches came in meanwhile: look again when the latest one is old enough
            self._schedule_trim(IDLE_TRIM_S - idle)
        else:
            _MALLOC_TRIM(0)

    @timed
    def preprocess(self, data):
        batch = Batch(size=len(data))
        for index in range(batch.size):
            try:
                batch.thresholds[index] = self._threshold(index)
            except RequestError as error:
                logger.info("request %d of a batch of %d refused: %s", index, batch.size, error)
                batch.errors[index] = error
        wanted = [index for index in range(batch.size) if index not in batch.errors]
        results = self._map_rows(self._prepare, [(index, data[index]) for index in wanted])
        images = []
        for index, result in zip(wanted, results):
            if isinstance(result, ImageError):
                logger.info("request %d of a batch of %d refused: %s", index, batch.size, result)
                batch.errors[index] = result
            else:
                images.append(result)
                batch.rows.append(index)
        if images:
            batch.images = np.stack(images)
        return batch

    def _prepare(self, item) -> np.ndarray | ImageError:
        """One (index, request) -> float32 (3, crop, crop), or its ImageError (never raised: it answers only that request)."""
        index, row = item
        # The frontend marks requests to /explanations/NAME with this header.
        if self.context.get_request_header(index, "explain") == "True":
            return ImageError("this model has no explanations; send the image to /predictions/NAME for its Top-3",
                              status=HTTPStatus.NOT_IMPLEMENTED, kind="no_explanations")
        try:
            return self.preprocessor(request_bytes(row))
        except ImageError as error:
            return error

    def _header(self, index: int, name: str) -> str | None:
        """A request header by name, any case (TorchServe passes names as the client spelled them)."""
        headers = self.context.get_all_request_header(index) or {}
        for key, value in headers.items():
            if isinstance(key, str) and isinstance(value, str) and key.lower() == name.lower():
                return value
        return None

    def _threshold(self, index: int) -> float | None:
        """Request ``index``'s rejection threshold: the archive's, or the one its X-Keep header asks
        for; None answers without rejecting. Raises RequestError (400) for a value that is not a
        share in (0, 1], and for a share below 1 on a model without a rule (the ImageNet classifier):
        a client asking for strictness is told it cannot have it rather than silently not getting it."""
        rule = self.model.rejection
        value = self._header(index, KEEP_HEADER)
        if value is None:
            return None if rule is None else float(rule.threshold)
        try:
            keep = validate_keep(value.strip())
        except ValueError as error:
            raise RequestError(f"{KEEP_HEADER}: {error}", kind="bad_keep_header") from None
        if rule is None:
            if keep < 1.0:
                raise RequestError(f"{KEEP_HEADER}: this model has no rejection rule (it answers a class for "
                                   f"every photo); send {KEEP_HEADER}: 1 or no {KEEP_HEADER} header",
                                   kind="bad_keep_header")
            return None
        return rule.threshold_for(keep)

    def _map_rows(self, function, rows) -> list:
        if not rows:
            return []
        if len(rows) == 1:
            return [function(rows[0])]  # no thread hand-off for a lone request
        return list(self.decode_pool.map(function, rows))

    @timed
    def inference(self, batch, *args, **kwargs):
        if batch.images is not None:
            logits, batch.known_scores = self.model.predict(batch.images)
            batch.probabilities = softmax(logits)
        return batch

    def explain_handle(self, data_preprocess, raw_data):
        """TorchServe calls this instead of inference + postprocess when the batch's first request came
        to /explanations. This model has no explanations: preprocess already refused every
        explanation request of the batch (501); the predictions in it are answered as usual."""
        return self.postprocess(self.inference(data_preprocess))

    @timed
    def postprocess(self, batch):
        responses = [None] * batch.size
        for index, error in batch.errors.items():
            self.context.set_response_status(code=error.status, phrase=HTTPStatus(error.status).phrase, idx=index)
            responses[index] = {"error": str(error), "code": error.status}
        if batch.probabilities is not None:
            # Most probable first; among equal probabilities the lower class index first.
            top_i = np.argsort(-batch.probabilities, axis=1, kind="stable")[:, : self.top_k]
            top_p = np.take_along_axis(batch.probabilities, top_i, axis=1)
            scores = None if batch.known_scores is None else batch.known_scores.tolist()
            for row, index in enumerate(batch.rows):
                answer = [
                    {"label": self.labels[i], "index": i, "probability": round(p, 6)}
                    for p, i in zip(top_p[row].tolist(), top_i[row].tolist())
                ]
                threshold = batch.thresholds.get(index)
                if scores is not None and threshold is not None and scores[row] < threshold:
                    # First, so a client reading only the first label sees it; the closest classes follow.
                    answer.insert(0, {"label": UNKNOWN_LABEL, "index": None, "probability": None,
                                      "score": round(scores[row], 6), "threshold": round(threshold, 6)})
                responses[index] = answer
        for index in range(batch.size):
            self.context.set_response_content_type(index, "application/json")
            self.context.set_response_header(index, VERSION_HEADER, self.version)
        self.handler_metrics.record(
            getattr(self.context, "metrics", None),
            top1_labels=[responses[index][0]["label"] for index in batch.rows if responses[index]],
            bad_input_kinds=[error.kind for error in batch.errors.values()],
        )
        self._batch_done()
        return responses
