"""Where bundles live by default: ``$DREAM_EXPORT_HOME`` or ``~/.cache/dream-export``."""

from __future__ import annotations

import os
from pathlib import Path


def store_root() -> Path:
    return Path(os.environ.get("DREAM_EXPORT_HOME") or Path.home() / ".cache" / "dream-export")


def bundles_dir() -> Path:
    return store_root() / "bundles"
