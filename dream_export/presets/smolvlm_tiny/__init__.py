"""The built-in offline model ``smolvlm-tiny``: a 3.2M-parameter SmolVLM trained here on the synthetic scenes.

What ships here: ``model/`` (the trained model, a ``save_pretrained`` folder), ``drafter/`` (its DREAM drafter and the
defaults it was tuned to) and ``tokenizer/`` (the byte-level BPE tokenizer its architecture is built around). How
they are made: ``architecture`` (the model's shape, built from transformers' own classes), ``tokenizer_recipe``,
``recipe`` (the model) and ``drafter_recipe``.

If the trained weights are missing from the package, a randomly initialised model of the same architecture is built
once (seeded, so identical everywhere) into the per-user store. Either way it is loaded through ``from_pretrained``
like any local model.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from runtime.store import store_root

from ..shipped import shipped_folder
from .architecture import TinyVLMSpec, build_tiny_vlm

MODEL_DIR = Path(__file__).with_name("model")      # the trained model (recipe --ship)
DRAFTER_DIR = Path(__file__).with_name("drafter")  # dream-train output + the tree it was tuned to (drafter_recipe --ship)
SPEC = TinyVLMSpec()
BUILD_TAG = "random-v1"


def ensure_smolvlm_tiny() -> Path:
    if (MODEL_DIR / "config.json").is_file():
        return MODEL_DIR
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


def shipped_drafter(source) -> Path | None:
    """The drafter folder when ``source`` is the shipped smolvlm-tiny and its trained drafter ships too;
    dream-export then adds it unless told otherwise."""
    try:
        if Path(source).resolve() != MODEL_DIR.resolve():
            return None
    except OSError:
        return None
    return shipped_folder(DRAFTER_DIR)
