"""dream-export --tune: measured costs and acceptance pick the tree, which lands in the manifest."""

import json
import shutil

from runtime.pipeline import Pipeline
from runtime.tree import TreeSpec


def test_tune_writes_the_best_tree(zoo, tmp_path):
    from dream_export.tuning import tune_bundle

    _, bundle = zoo.with_drafter("tied_loop", "copy")
    dst = tmp_path / "bundle"
    shutil.copytree(bundle, dst)
    chosen = tune_bundle(dst, scenes=2)
    manifest = json.loads((dst / "manifest.json").read_text())
    table = manifest["tuning"]["candidates"]
    assert len(table) >= 4 and all(r["verify_ms"] > 0 and r["draft_ms"] > 0 and r["accept_len"] >= 1 for r in table)
    best = max(table, key=lambda r: r["expected_tokens_per_s"])
    assert manifest["tree"] == chosen == best["tree"]
    pipe = Pipeline.from_bundle(dst)  # still verifies: the manifest is not among the hashed files
    assert TreeSpec.from_json(pipe.bundle.manifest["tree"]) == TreeSpec(**chosen)
    # a repetitive target with a copy drafter accepts long paths: deeper trees must measure longer acceptance
    by_tree = {(r["tree"]["total_tokens"], r["tree"]["depth"]): r["accept_len"] for r in table}
    assert by_tree[(32, 6)] > by_tree[(4, 3)] > 1.0
