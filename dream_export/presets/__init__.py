"""Named, built-in models, one folder each: the offline ``smolvlm_tiny`` and the real-weight ``smolvlm_smollm2``. Each
holds how the model is made (its recipes and data) and what ships (trained weights, tokenizer, drafter)."""

from __future__ import annotations

from pathlib import Path

from .shipped import ShippedDrafter, shipped_for
from .smolvlm_smollm2 import shipped_drafter as _smollm2_drafter
from .smolvlm_tiny import shipped_drafter as _tiny_drafter


def shipped_drafter(source) -> Path | None:
    """The drafter folder when ``source`` is a built-in model whose trained drafter ships with the package;
    dream-export adds it unless told otherwise."""
    return _tiny_drafter(source) or _smollm2_drafter(source)


def shipped_defaults(source, cpu_precision: str = "fp32") -> ShippedDrafter | None:
    """The trained drafter that ships with the built-in model ``source`` and what dream-export exports it with at
    ``cpu_precision``; None for any other model."""
    found = shipped_drafter(source)
    return shipped_for(found, cpu_precision) if found is not None else None
