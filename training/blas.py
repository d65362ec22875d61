"""One BLAS thread for the head fits: numpy's OpenBLAS, switched through its own C functions.

Head fits multiply and decompose matrices of a few hundred rows (the rejection rule's 42 SVDs of
about 100 x 1280 are most of a warm train_head's fit): there one thread is faster than two, the
hand-offs cost more than they save, and worse on a busy machine (rule fit, 5 classes x 20 photos:
0.40 s on one thread against 0.77 s on this machine's two). numpy has no switch for its BLAS
threads, so this calls the set/get functions of the OpenBLAS library numpy loaded, found among the
process's mapped libraries (Linux). Elsewhere, or with another BLAS, it changes nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
from pathlib import Path

import numpy as np  # noqa: F401  (loads the BLAS library this module looks for)

# (set, get) symbol pairs, as OpenBLAS builds name them: numpy's wheels bundle scipy-openblas
# (64-bit integers, "scipy_" prefix, "64_" suffix); a system OpenBLAS has the plain names.
_SYMBOLS = (("scipy_openblas_set_num_threads64_", "scipy_openblas_get_num_threads64_"),
            ("scipy_openblas_set_num_threads", "scipy_openblas_get_num_threads"),
            ("openblas_set_num_threads64_", "openblas_get_num_threads64_"),
            ("openblas_set_num_threads", "openblas_get_num_threads"))


@functools.cache
def _openblas_threads():
    """(set, get) of the loaded OpenBLAS, or None when there is none to find."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    libraries = sorted({line.split()[-1] for line in maps.splitlines() if "openblas" in line.lower()})
    for library in libraries:
        try:
            handle = ctypes.CDLL(library)
        except OSError:
            continue
        for set_name, get_name in _SYMBOLS:
            if hasattr(handle, set_name) and hasattr(handle, get_name):
                return getattr(handle, set_name), getattr(handle, get_name)
    return None


def blas_threads() -> int | None:
    """The OpenBLAS thread count now, or None when this process has no OpenBLAS to switch."""
    found = _openblas_threads()
    return None if found is None else int(found[1]())


@contextlib.contextmanager
def single_thread():
    """numpy's BLAS on one thread inside the block (the module docstring says why)."""
    found = _openblas_threads()
    if found is None:
        yield
        return
    set_threads, get_threads = found
    previous = int(get_threads())
    set_threads(1)
    try:
        yield
    finally:
        set_threads(previous)
