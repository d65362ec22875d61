"""Helpers the tests share (not tests): small data folders made from the shared photos, the build CLI."""

from __future__ import annotations

import subprocess
import sys

from imagerec.files import link_or_copy
from imagerec.paths import PROJECT_ROOT

BUILD = [sys.executable, str(PROJECT_ROOT / "scripts" / "build_archive.py")]


def run_build(*args, env=None) -> subprocess.CompletedProcess:
    """``scripts/build_archive.py ARGS`` as a user runs it."""
    return subprocess.run(BUILD + list(args), capture_output=True, text=True, timeout=300, env=env)


def make_subset(datasets_dir, root, classes=("ants", "bees"), train=8, val=4, layout="folders", dataset="hymenoptera"):
    """A small ImageFolder of the shared photos in a temporary folder: ``layout`` "train/val" gives
    ``root/train/<class>`` and ``root/val/<class>``, "folders" gives ``root/<class>`` with train+val
    photos. Hard links where the file system allows, else copies (never symbolic links: those leave
    the data folder, which load_dataset skips)."""
    for cls in classes:
        source = sorted((datasets_dir / dataset / "train" / cls).iterdir())
        held = sorted((datasets_dir / dataset / "val" / cls).iterdir())[:val]
        splits = {"train": source[:train], "val": held} if layout == "train/val" else {"": source[:train] + held}
        for split, photos in splits.items():
            folder = root / split / cls if split else root / cls
            folder.mkdir(parents=True, exist_ok=True)
            for photo in photos:
                link_or_copy(photo, folder / photo.name)
    return root
