"""The built-in offline model ``smolvlm-tiny``.

If trained weights ship with the package (``presets/smolvlm_tiny/``), they are used; otherwise a
randomly initialised model of the same architecture is built once (seeded, so identical everywhere)
into the per-user store. Either way it is loaded through ``from_pretrained`` like any local model.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from runtime.store import store_root

from .shipped import drafter_and_tree
from .tiny import TinyVLMSpec, build_tiny_vlm

SHIPPED = Path(__file__).with_name("smolvlm_tiny")
SHIPPED_DRAFTER = Path(__file__).with_name("smolvlm_tiny_drafter")  # dream-train output + the tree it was tuned to
SPEC = TinyVLMSpec()
BUILD_TAG = "random-v1"


def ensure_smolvlm_tiny() -> Path:
    if (SHIPPED / "config.json").is_file():
        return SHIPPED
    target = store_root() / "models" / f"smolvlm-tiny-{BUILD_TAG}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".smolvlm-tiny-", dir=target.parent))
    try:
        build_tiny_vlm(tmp, SPEC)
        os.replace(tmp, target)
    except OSError:
        if not (target / "config.json").is_file():  # another process may have won the rename
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def shipped_drafter(source) -> tuple[Path, dict | None] | None:
    """(drafter folder, default tree as JSON or None) when ``source`` is the shipped smolvlm-tiny and its
    trained drafter ships too; dream-export then adds it unless told otherwise."""
    try:
        if Path(source).resolve() != SHIPPED.resolve():
            return None
    except OSError:
        return None
    return drafter_and_tree(SHIPPED_DRAFTER)
