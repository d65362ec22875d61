"""Files written safely and hashed: the one implementation of each, for archives, caches and stores."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def atomic_write(target: str | Path, write: Callable[[Path], object], suffix: str = ".part") -> Path:
    """Call ``write(partial_path)``, then rename the partial file onto ``target``.

    The partial file lives beside the target (same file system, so the rename is atomic) under a
    unique hidden name: readers (TorchServe scanning its model store, a concurrent run reading a
    cache) never see half a file, and concurrent writers never share a partial file. ``suffix``:
    the partial file's ending, for writers that insist on one (a ``.pt2`` package).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=suffix)
    os.close(fd)
    partial = Path(name)
    try:
        write(partial)
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    return target


def atomic_copy(source: str | Path, target: str | Path) -> Path:
    """Copy ``source`` to ``target`` atomically (see ``atomic_write``)."""
    return atomic_write(target, lambda partial: shutil.copyfile(source, partial))


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file (weights_sha256 in the manifests, feature cache keys)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
