"""What ships beside a built-in model's trained drafter: the drafter folder and its ``bundle_defaults.json``
(the draft tree it was tuned to, and the runtime defaults measured with it)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from runtime.tree import TreeSpec


@dataclass(frozen=True)
class ShippedDrafter:
    """A built-in model's trained drafter and what dream-export exports it with at one CPU precision, unless told
    otherwise: the tree it was tuned to, the manifest's runtime defaults measured with that tree, and the chains one
    verify call holds (None: the exporter's default)."""

    folder: Path
    tree: TreeSpec | None
    runtime: dict | None
    max_chains: int | None


def shipped_folder(folder: Path) -> Path | None:
    """``folder`` when a trained drafter ships in it."""
    return folder if (folder / "drafter_config.json").is_file() else None


def shipped_for(drafter_dir: Path, cpu_precision: str) -> ShippedDrafter:
    """What ships for bundles at ``cpu_precision``: ``bundle_defaults.json``'s "cpu_precision" entry for it where
    there is one (a quantized CPU target changes what a verify row costs against a step, so it was tuned on its
    own), else its top-level "tree" and "runtime" (and no chain count: the exporter's default)."""
    path = Path(drafter_dir) / "bundle_defaults.json"
    data = json.loads(path.read_text()) if path.is_file() else {}
    own = (data.get("cpu_precision") or {}).get(cpu_precision) or {}
    tree = own.get("tree", data.get("tree"))
    return ShippedDrafter(Path(drafter_dir), TreeSpec.from_json(tree) if tree else None,
                          own.get("runtime", data.get("runtime")), own.get("max_chains"))
