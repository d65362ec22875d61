"""Model names, versions and archive file names (no torch import: management tools use it too)."""

from __future__ import annotations

import re

# TorchServe puts names in URLs (/predictions/NAME/VERSION) and archives in file names: allow
# nothing that could climb out of a directory or need escaping.
NAME_PATTERN = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,63}$")
VERSION_PATTERN = re.compile(r"^[0-9A-Za-z][0-9A-Za-z._-]{0,31}$")


def validate_name(name: str) -> str:
    if not NAME_PATTERN.match(name or ""):
        raise ValueError(f"invalid model name {name!r}: use a letter then letters, digits, '_' or '-' (max 64)")
    return name


def validate_version(version: str) -> str:
    if not VERSION_PATTERN.match(version or "") or ".." in version:
        raise ValueError(f"invalid version {version!r}: use letters, digits, '.', '_' or '-' (e.g. 1.0, 2)")
    return version


def archive_file_name(name: str, version: str) -> str:
    """``resnet18_v1.0.mar``: one file per version, so versions coexist in one model store."""
    return f"{validate_name(name)}_v{validate_version(version)}.mar"


def version_key(version: str) -> tuple:
    """Natural order of versions: 2 < 2-r1 < 10 (numbers compare as numbers, not as text: v9 < v10)."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.findall(r"\d+|\D+", version))
