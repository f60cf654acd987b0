"""``dream-export --tune``: run runtime.tune on calibration scenes and record the choice in the manifest."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from runtime.bundle import MANIFEST


def tune_bundle(bundle_dir: Path, scenes: int = 4, seed: int = 20_000_000) -> dict:
    import numpy as np

    from runtime.pipeline import Pipeline
    from runtime.tune import tune

    from .scenes import qa_pairs, random_scene

    rng = np.random.default_rng(seed)
    with tempfile.TemporaryDirectory() as tmp:
        samples = []
        for i in range(scenes):
            scene = random_scene(rng)
            path = Path(tmp) / f"calib{i}.png"
            scene.render().save(path)
            qa = qa_pairs(scene, rng)[i % 7]
            samples.append(([str(path)], qa.prompt))
        result = tune(Pipeline.from_bundle(bundle_dir), samples)
    mpath = Path(bundle_dir) / MANIFEST
    manifest = json.loads(mpath.read_text())
    manifest["tree"] = result["chosen"]
    manifest["tuning"] = result
    tmp_path = mpath.with_suffix(".json.part")
    tmp_path.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp_path, mpath)
    return result["chosen"]
