"""One BLAS thread for the head fits.

Head fits multiply and decompose matrices of a few hundred rows (the rejection rule's 42 SVDs of
about 100 x 1280 are most of a warm train_head's fit): there one thread is faster than two, the
hand-offs cost more than they save, and worse on a busy machine (rule fit, 5 classes x 20 photos:
0.40 s on one thread against 0.77 s on this machine's two). numpy has no switch for its BLAS
threads; threadpoolctl (the library scikit-learn uses for the same purpose) finds the BLAS numpy
loaded and sets its threads for the duration of a block.
"""

from __future__ import annotations

import contextlib

from threadpoolctl import threadpool_info, threadpool_limits


def blas_threads() -> int | None:
    """The thread count of the BLAS numpy loaded, or None when threadpoolctl finds none."""
    import numpy  # noqa: F401  (the BLAS is found among the loaded libraries)

    counts = [pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"]
    return counts[0] if counts else None


@contextlib.contextmanager
def single_thread():
    """numpy's BLAS on one thread inside the block (the module docstring says why)."""
    with threadpool_limits(limits=1, user_api="blas"):
        yield
