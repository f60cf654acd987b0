"""What ships beside a built-in model's trained drafter: the drafter folder and its ``bundle_defaults.json``
(the draft tree it was tuned to, and the runtime defaults measured with it)."""

from __future__ import annotations

import json
from pathlib import Path


def drafter_and_tree(folder: Path) -> tuple[Path, dict | None] | None:
    """(folder, default tree from its bundle_defaults.json) when a trained drafter ships in ``folder``."""
    if not (folder / "drafter_config.json").is_file():
        return None
    defaults = folder / "bundle_defaults.json"
    return folder, (json.loads(defaults.read_text()).get("tree") if defaults.is_file() else None)


def defaults_for(drafter_dir: Path, cpu_precision: str) -> tuple[dict | None, dict | None, int | None]:
    """(tree, runtime, max_chains) shipped for bundles at ``cpu_precision``: ``bundle_defaults.json``'s
    "cpu_precision" entry for it where there is one (a quantized CPU target changes what a verify row costs against
    a step, so it was tuned on its own), else its top-level "tree" and "runtime" (and no chain count: the exporter's
    default)."""
    path = Path(drafter_dir) / "bundle_defaults.json"
    if not path.is_file():
        return None, None, None
    data = json.loads(path.read_text())
    own = (data.get("cpu_precision") or {}).get(cpu_precision) or {}
    return own.get("tree", data.get("tree")), own.get("runtime", data.get("runtime")), own.get("max_chains")
