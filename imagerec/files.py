"""Files written safely: the one implementation, for archives, caches and the model store."""

from __future__ import annotations

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


def link_or_copy(source: str | Path, target: str | Path) -> None:
    """A hard link where the file system allows it (no copy of a photo set), else a copy. Never a
    symbolic link: data folders skip links that lead outside them (training/data.py)."""
    try:
        os.link(source, target)
    except OSError:  # another file system, or links not allowed here
        shutil.copyfile(source, target)
