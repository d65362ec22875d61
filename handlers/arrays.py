"""The few array functions the heads, the rejection rules, the handler and training share, in numpy.

They compute what ``torch.nn.functional``'s functions of the same names computed before the heads
moved to numpy (tests/unit/test_heads.py compares them), in the input's precision (float32 stays
float32). numpy, not torch: a warm train_head never imports torch, whose import alone costs 1.7 s of
its 2 s budget (docs/bench/runtime.md).
"""

from __future__ import annotations

import numpy as np

NORMALISE_EPS = 1e-12  # F.normalize's: rows shorter than this are divided by it instead (no 0/0)


def l2_normalise(rows: np.ndarray) -> np.ndarray:
    """(N, D) -> (N, D) rows of unit length (F.normalize(rows, dim=1))."""
    norms = np.sqrt(np.einsum("ij,ij->i", rows, rows))[:, None]
    return rows / np.maximum(norms, rows.dtype.type(NORMALISE_EPS))


def logsumexp(logits: np.ndarray) -> np.ndarray:
    """(N, C) -> (N,) log of the summed exponentials along the classes (torch.logsumexp(logits, 1))."""
    top = logits.max(axis=1, keepdims=True)
    return (top + np.log(np.exp(logits - top).sum(axis=1, keepdims=True)))[:, 0]


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """(N, C) -> (N, C) log-probabilities along the classes."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def softmax(logits: np.ndarray) -> np.ndarray:
    """(N, C) -> (N, C) probabilities along the classes."""
    exponentials = np.exp(logits - logits.max(axis=1, keepdims=True))
    return exponentials / exponentials.sum(axis=1, keepdims=True)


def cross_entropy(logits: np.ndarray, labels: np.ndarray, weight: np.ndarray | None = None,
                  reduction: str = "mean") -> float:
    """(N, C) logits, (N,) labels [, (C,) class weights] -> negative log-likelihood: summed
    (``reduction="sum"``) or averaged with each row weighted by its class's weight (F.cross_entropy)."""
    picked = -log_softmax(logits)[np.arange(len(labels)), labels]
    if weight is not None:
        picked = picked * weight[labels]
    if reduction == "sum":
        return float(picked.sum())
    return float(picked.sum() / (weight[labels].sum() if weight is not None else len(labels)))
