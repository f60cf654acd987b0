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
    asked = []
    chosen = tune_bundle(dst, scenes=2, set_tree=asked.append)
    manifest = json.loads((dst / "manifest.json").read_text())
    tuning = manifest["tuning"]
    table = tuning["candidates"]
    assert len(table) >= 4 and all(r["verify_ms"] > 0 and r["draft_ms"] > 0 and r["accept_len"] >= 1
                                   and r["measured_tokens_per_s"] > 0 for r in table)
    best = max(table, key=lambda r: r["measured_tokens_per_s"])  # the real loop decides, not the cost model
    assert manifest["tree"] == chosen == best["tree"]
    assert tuning["speculation_pays"] == (best["measured_speedup"] > 1.0)
    assert manifest["runtime"]["threads"] == tuning["threads"] and str(tuning["threads"]) in tuning["plain_tokens_per_s"]
    # the bundle's one-call draft graph is (3, 2): every candidate with another depth / top-k asks for its own
    # graph before it is measured (grouped by depth and top-k), and the chosen one once more at the end (this
    # set_tree only records the request, so the graph stays (3, 2) and the table says which trees had it)
    from runtime.tune import CANDIDATES

    other = [t for t in sorted(CANDIDATES, key=lambda t: (t.depth, t.top_k)) if (t.depth, t.top_k) != (3, 2)]
    assert asked == other + ([] if (chosen["depth"], chosen["top_k"]) == (3, 2) else [TreeSpec(**chosen)])
    assert [(r["tree"]["depth"], r["tree"]["top_k"]) for r in table] == sorted(
        (r["tree"]["depth"], r["tree"]["top_k"]) for r in table)
    assert [r["one_call_draft"] for r in table] == [(r["tree"]["depth"], r["tree"]["top_k"]) == (3, 2) for r in table]
    # the verdict lands where the runtime reads it: plain decoding by default when speculation measured slower
    assert manifest["runtime"]["speculative"] == tuning["speculation_pays"]
    assert (manifest["runtime"]["speculative_note"] is None) == tuning["speculation_pays"]
    assert Pipeline.from_bundle(dst).speculative_default == tuning["speculation_pays"]
    pipe = Pipeline.from_bundle(dst)  # still verifies: the manifest is not among the hashed files
    assert TreeSpec.from_json(pipe.bundle.manifest["tree"]) == TreeSpec(**chosen)
    # a repetitive target with a copy drafter accepts long paths: deeper trees must measure longer acceptance
    by_tree = {TreeSpec.from_json(r["tree"]): r["accept_len"] for r in table}
    assert by_tree[TreeSpec(32, 6, 4)] > by_tree[TreeSpec(4, 3, 1)] > 1.0
    assert any(t.lookup for t in by_tree)  # prompt-lookup trees are measured too


def test_tune_data_reads_dream_train_sources(tmp_path):
    """--tune-data takes what dream-train --data takes: text-only JSONL rows and scenes (written as files)."""
    from dream_export.cli import tune_samples

    data = tmp_path / "prompts.jsonl"
    data.write_text('{"prompt": "What is a robot?"}\n{"prompt": "Name a colour.", "image": []}\n')
    assert tune_samples(str(data), 5, tmp_path) == [([], "What is a robot?"), ([], "Name a colour.")]
    pairs = tune_samples("scenes:3", 2, tmp_path)
    assert len(pairs) == 2 and all(len(p) == 1 and p[0].endswith(".png") for p, _ in pairs)


def test_tune_times_every_tree_with_its_own_one_call_graph(zoo, tmp_path):
    """With dream-export's real set_tree, each candidate is measured after its depth / top-k got a one-call draft
    graph, so no tree is timed at a disadvantage; the bundle ends with the chosen tree's graph and still verifies."""
    from dream_export.export.exporter import load_target, set_draft_tree
    from dream_export.tuning import tune_bundle

    model_dir, bundle = zoo.with_drafter("tied_loop", "copy")
    ddir = zoo._built["tied_loop+copy"][2]
    dst = tmp_path / "bundle"
    shutil.copytree(bundle, dst)
    model, processor = load_target(str(model_dir))
    chosen = tune_bundle(dst, scenes=1, set_tree=lambda tree: set_draft_tree(dst, model, processor, ddir, tree))
    manifest = json.loads((dst / "manifest.json").read_text())
    table = manifest["tuning"]["candidates"]
    assert len(table) >= 4 and all(r["one_call_draft"] for r in table)
    graph = manifest["graphs"]["draft_tree"]
    assert (graph["depth"], graph["top_k"]) == (chosen["depth"], chosen["top_k"])
    pipe = Pipeline.from_bundle(dst)  # verifies every listed file; graphs of the other trees are gone
    assert TreeSpec.from_json(pipe.bundle.manifest["tree"]) == TreeSpec(**chosen)
    assert sum(p.name.startswith("draft_tree") for p in dst.iterdir()) == 1
