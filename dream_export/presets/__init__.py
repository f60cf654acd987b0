"""Named, built-in model presets: the offline ``smolvlm-tiny`` and the real-weight ``smolvlm-smollm2``."""

from __future__ import annotations

import json
from pathlib import Path


def shipped_drafter(source) -> tuple[Path, dict | None] | None:
    """(drafter folder, default tree) when ``source`` is a built-in model whose trained drafter ships with the
    package; dream-export adds it unless told otherwise."""
    from .smolvlm_smollm2 import shipped_drafter as smollm2
    from .smolvlm_tiny import shipped_drafter as tiny

    return tiny(source) or smollm2(source)


def drafter_and_tree(folder: Path) -> tuple[Path, dict | None] | None:
    """(folder, default tree from its bundle_defaults.json) when a trained drafter ships in ``folder``."""
    if not (folder / "drafter_config.json").is_file():
        return None
    defaults = folder / "bundle_defaults.json"
    return folder, (json.loads(defaults.read_text()).get("tree") if defaults.is_file() else None)


def runtime_defaults(drafter_dir: Path) -> dict | None:
    """The measured runtime defaults shipped beside a built-in drafter (``bundle_defaults.json`` "runtime": whether
    speculation paid on the machine it was tuned on, with a note saying where and by how much)."""
    path = Path(drafter_dir) / "bundle_defaults.json"
    return json.loads(path.read_text()).get("runtime") if path.is_file() else None
