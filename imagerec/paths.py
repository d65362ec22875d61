"""Where things are: the project's own folders, the shared photo sets beside it, the user's caches."""

from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SHIPPED_CONFIG = PROJECT_ROOT / "config.properties"
SHIPPED_LOG_CONFIG = PROJECT_ROOT / "log4j2.xml"  # TorchServe's logging (torchserve --log-config)
DEFAULT_MODEL_STORE = PROJECT_ROOT / "archives"
DEFAULT_RUNTIME_DIR = PROJECT_ROOT / "runtime"  # scripts/serve.py runs TorchServe here (keys, logs, snapshots)
DOCS_DIR = PROJECT_ROOT / "docs"

# Real photo sets and sample photos live beside the checkout, never inside it (../shared/README.md).
SHARED_DIR_VAR = "IMAGEREC_SHARED"
SHARED_DIR = Path(os.environ.get(SHARED_DIR_VAR) or PROJECT_ROOT.parent / "shared")
DATASETS_DIR = SHARED_DIR / "datasets"
SAMPLES_DIR = SHARED_DIR / "samples"


def user_cache_dir(kind: str, env_var: str) -> Path:
    """``$<env_var>`` if set, else ``$XDG_CACHE_HOME/imagerec/<kind>`` (``~/.cache/imagerec/<kind>``)."""
    if os.environ.get(env_var):
        return Path(os.environ[env_var]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "imagerec" / kind
