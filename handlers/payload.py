"""What one TorchServe batch carries between the handler's steps, and the bytes of one request."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from handlers.imaging import ImageError


class RequestError(ValueError):
    """A request the model cannot answer as asked (e.g. a bad header); ``status`` is the HTTP code,
    ``kind`` its short fixed name for metrics (handlers/handler_metrics.py)."""

    def __init__(self, message: str, status: int = 400, kind: str = "bad_request"):
        super().__init__(message)
        self.status = status
        self.kind = kind


@dataclass
class Batch:
    """What flows through preprocess -> inference -> postprocess for one TorchServe batch."""

    size: int  # number of requests in the batch
    images: np.ndarray | None = None  # (M, 3, H, W) float32 for the M requests that decoded
    rows: list[int] = field(default_factory=list)  # request index of each image row
    errors: dict[int, ImageError | RequestError] = field(default_factory=dict)  # request index -> its error
    probabilities: np.ndarray | None = None  # (M, C)
    known_scores: np.ndarray | None = None  # (M,) rejection scores; None when the model has no rule
    thresholds: dict[int, float | None] = field(default_factory=dict)  # request index -> its rejection threshold


def request_bytes(row: dict) -> bytes:
    """The image bytes of one request: a raw body (``curl -T``) or a multipart file (``-F data=@``)."""
    if "data" in row or "body" in row:
        value = row.get("data", row.get("body"))
    else:
        files = [v for v in row.values() if isinstance(v, (bytes, bytearray))]
        if len(files) > 1:
            # TorchServe hands over every multipart part by name; which one is the image is a guess.
            raise ImageError(
                f"multipart request with {len(row)} parts ({', '.join(sorted(map(str, row)))}) and none named "
                "'data': send the image as the part named data (curl -F data=@photo.jpg)",
            )
        value = files[0] if files else None
    if value is None:
        return b""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    raise ImageError(
        f"expected image bytes but the request carried {type(value).__name__}; send the file with "
        "an image or application/octet-stream Content-Type (curl -T photo.jpg) or as multipart "
        "(curl -F data=@photo.jpg)",
        status=415,
        kind="wrong_content_type",
    )
