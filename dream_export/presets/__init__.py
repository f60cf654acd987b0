"""Named, built-in model presets: the offline ``smolvlm-tiny`` and the real-weight ``smolvlm-smollm2``."""

from __future__ import annotations

from pathlib import Path

from .smolvlm_smollm2 import shipped_drafter as _smollm2_drafter
from .smolvlm_tiny import shipped_drafter as _tiny_drafter


def shipped_drafter(source) -> tuple[Path, dict | None] | None:
    """(drafter folder, default tree) when ``source`` is a built-in model whose trained drafter ships with the
    package; dream-export adds it unless told otherwise."""
    return _tiny_drafter(source) or _smollm2_drafter(source)
