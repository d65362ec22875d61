"""The handler's own metrics: answers by top-1 label and refused inputs by kind.

Recorded through TorchServe's metrics API (``context.metrics``): with ``metrics_mode=prometheus``
the frontend exports them at ``<metrics_address>/metrics`` as ``PredictionsByLabel`` and
``BadInputs`` counters (declared in the project's ``metrics.yaml``; undeclared metrics are dropped).
Each call writes one log line from the worker to the frontend, so a batch is counted with one call
per distinct label and per distinct error kind, never one per request.
"""

from __future__ import annotations

from collections import Counter

from ts.metrics.dimension import Dimension

PREDICTIONS_METRIC = "PredictionsByLabel"
BAD_INPUTS_METRIC = "BadInputs"


class HandlerMetrics:
    """Counts for one model version; ``record`` is called once per batch."""

    def __init__(self, model_name: str, version: str):
        self.model_name = model_name
        self.version = version

    def _dimensions(self, name: str, value: str) -> list[Dimension]:
        # Same names, same order as metrics.yaml: the frontend matches them to the declaration.
        return [Dimension("ModelName", self.model_name), Dimension("ModelVersion", self.version),
                Dimension(name, value), Dimension("Level", "Model")]

    def record(self, metrics, top1_labels: list[str], bad_input_kinds: list[str]) -> None:
        """metrics: TorchServe's metrics cache of this batch (``context.metrics``); None outside TorchServe."""
        if metrics is None:
            return
        for label, count in Counter(top1_labels).items():
            metrics.add_counter(PREDICTIONS_METRIC, count, None, self._dimensions("Label", label))
        for kind, count in Counter(bad_input_kinds).items():
            metrics.add_counter(BAD_INPUTS_METRIC, count, None, self._dimensions("Kind", kind))
