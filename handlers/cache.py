"""Where derived files are cached on a user's machine (backbone features, compiled backbones)."""

from __future__ import annotations

import os
from pathlib import Path


def user_cache_dir(kind: str, env_var: str) -> Path:
    """``$<env_var>`` if set, else ``$XDG_CACHE_HOME/imagerec/<kind>`` (``~/.cache/imagerec/<kind>``)."""
    if os.environ.get(env_var):
        return Path(os.environ[env_var]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "imagerec" / kind
