"""``dream-export --tune``: run runtime.tune on calibration scenes and record the choice in the manifest."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from runtime.bundle import MANIFEST


def tune_bundle(bundle_dir: Path, scenes: int = 4, seed: int = 20_000_000, set_tree=None, samples=None,
                max_new_tokens: int = 48) -> dict:
    """Measure on calibration scenes (runtime.tune), then record the tree, the ORT thread count and the
    table in the manifest. ``set_tree(TreeSpec)`` re-exports the one-call draft graph for a depth / top-k
    other than the exported one (dream-export passes it): before each such candidate is measured, so every
    tree is timed with its own one-call graph, and once more for the chosen tree at the end. Without it the
    runtime drafts depth by depth for any other tree, and the table says so (``one_call_draft``). ``samples`` ((image paths, prompt) pairs, e.g. from ``--tune-data``)
    replace the scenes: tune on what the bundle will answer."""
    import numpy as np

    from runtime.pipeline import Pipeline
    from runtime.tune import tune

    from .scenes import qa_pairs, random_scene

    def prepare(tree) -> bool:  # the bundle's one-call draft graph for tree's depth and top-k, when it has another
        graph = json.loads((Path(bundle_dir) / MANIFEST).read_text())["graphs"].get("draft_tree", {})
        if set_tree is None or (graph.get("depth"), graph.get("top_k")) == (tree.depth, tree.top_k):
            return False
        set_tree(tree)
        return True

    rng = np.random.default_rng(seed)
    with tempfile.TemporaryDirectory() as tmp:
        if samples is None:
            samples = []
            for i in range(scenes):
                scene = random_scene(rng)
                path = Path(tmp) / f"calib{i}.png"
                scene.render().save(path)
                qa = qa_pairs(scene, rng)[i % 7]
                samples.append(([str(path)], qa.prompt))
        result = tune(lambda threads: Pipeline.from_bundle(bundle_dir, threads=threads), samples,
                      max_new_tokens=max_new_tokens, prepare=prepare if set_tree is not None else None)
    from runtime.tree import TreeSpec

    mpath = Path(bundle_dir) / MANIFEST
    prepare(TreeSpec.from_json(result["chosen"]))
    manifest = json.loads(mpath.read_text())
    manifest["tree"] = result["chosen"]
    manifest["tuning"] = result
    manifest["runtime"] = {**manifest.get("runtime", {}), "threads": result["threads"],
                           "speculative": bool(result["speculation_pays"]),
                           "speculative_note": None if result["speculation_pays"] else (
                               f"dream-export --tune measured speculative decoding at {result['measured_speedup']:.2f}x "
                               f"of plain decoding on this machine")}
    tmp_path = mpath.with_suffix(".json.part")
    tmp_path.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp_path, mpath)
    return result["chosen"]
