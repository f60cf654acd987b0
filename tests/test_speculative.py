"""Greedy speculative decoding is lossless: token ids equal plain decoding and transformers generate."""

import pytest

from helpers import PAIRS, PROMPTS, hf_generate
from runtime.pipeline import Pipeline
from runtime.tree import TreeSpec

MAX_NEW = 24
TREES = [TreeSpec(1, 1, 1), TreeSpec(8, 3, 2), TreeSpec(6, 6, 1), TreeSpec(32, 6, 4), TreeSpec(8, 3, 2, 8)]
COMBOS = [("split_mha", "random"), ("gqa_nosplit", "random"), ("tied_loop", "copy"), ("split_mha", "concat")]


@pytest.mark.parametrize("draft", ["stepwise", "unrolled"])
@pytest.mark.parametrize("combo", COMBOS, ids=lambda c: "+".join(c))
@pytest.mark.parametrize("tree", TREES, ids=lambda t: f"N{t.total_tokens}D{t.depth}K{t.top_k}L{t.lookup}")
def test_speculative_greedy_is_lossless(zoo, images, combo, tree, draft):
    """Both drafting paths: depth-by-depth drafter calls, and the one-call draft_tree graph exported for the tree."""
    if draft == "unrolled":
        model_dir, bundle = zoo.with_tree(*combo, tree)
    else:
        model_dir, bundle = zoo.with_drafter(*combo)
    pipe = Pipeline.from_bundle(bundle)
    pipe.tree_spec = tree
    pipe.unrolled_draft = draft == "unrolled"
    accepted = 0
    for pair, (names, prompt_idx) in enumerate(PAIRS):
        paths = [str(images[n]) for n in names]
        prompt = PROMPTS[prompt_idx]
        spec = pipe.generate(paths, prompt, max_new_tokens=MAX_NEW)
        plain = pipe.generate(paths, prompt, max_new_tokens=MAX_NEW, speculative=False)
        assert spec.token_ids == plain.token_ids, (pair, names)
        assert spec.token_ids == hf_generate(str(model_dir), [images[n] for n in names], prompt, MAX_NEW), (pair, names)
        assert sum(spec.accept_lengths) >= len(spec.token_ids) - 1  # every target call emits >= 1 token
        accepted += sum(a - 1 for a in spec.accept_lengths)
    if combo[1] == "copy" and tree.total_tokens > 1:
        assert accepted > 0  # the acceptance path really ran


@pytest.mark.parametrize("draft", ["stepwise", "unrolled"])
def test_context_fills_mid_tree(zoo, images, draft):
    for tree in (TreeSpec(8, 3, 2), TreeSpec(32, 6, 4)):
        _, bundle = zoo.with_tree("ctx_small", "copy", tree)
        pipe = Pipeline.from_bundle(bundle)
        pipe.tree_spec = tree
        pipe.unrolled_draft = draft == "unrolled"
        for name in ("chelsea", "wide_strip"):
            spec = pipe.generate([str(images[name])], "Describe the image.", max_new_tokens=500)
            plain = pipe.generate([str(images[name])], "Describe the image.", max_new_tokens=500, speculative=False)
            assert spec.stop_reason == plain.stop_reason == "context_full"
            assert spec.token_ids == plain.token_ids


def test_json_reports_acceptance(zoo, images, capsys):
    import json

    from runtime import cli

    _, bundle = zoo.with_drafter("tied_loop", "copy")
    capsys.readouterr()
    assert cli.main([str(images["coffee"]), "Describe the image.", "--bundle", str(bundle), "--json", "--max-new-tokens", "20"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["num_new_tokens"] == 20
    assert sum(out["accept_lengths"]) >= 19 and out["mean_accept_length"] >= 1.0
    assert cli.main([str(images["coffee"]), "hi", "--bundle", str(bundle), "--json", "--no-speculative", "--max-new-tokens", "5"]) == 0
    assert "accept_lengths" not in json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("tree", [TreeSpec(8, 3, 2), TreeSpec(12, 4, 3), TreeSpec(6, 6, 1)], ids=str)
def test_unrolled_draft_graph_builds_the_stepwise_tree(zoo, images, tree):
    """The one-call graph's EAGLE-2 search equals the depth-by-depth search: the same verified trees, step
    after step, and the same drafter caches afterwards."""
    import numpy as np

    from runtime.sampling import SamplingConfig
    from runtime.speculative import SpeculativeDecoder

    _, bundle = zoo.with_tree("split_mha", "random", tree)
    pipe = Pipeline.from_bundle(bundle)
    prep = pipe.prepare([str(images["astronaut"])], "Describe the image.")
    embeds = pipe.prompt_embeds(prep)
    runs = {}
    for unrolled in (False, True):
        sd = SpeculativeDecoder(pipe, tree, SamplingConfig(), np.random.default_rng(0), unrolled=unrolled)
        sd.start(embeds, prep.input_ids)
        trees, steps = [], []
        original = sd._draft_unrolled if unrolled else sd._draft_stepwise

        def record(*args, original=original, trees=trees):
            t = original(*args)
            trees.append((t.tokens.tolist(), t.parents.tolist(), t.depth.tolist()))
            return t

        sd._draft_unrolled = sd._draft_stepwise = record
        for _ in range(5):
            steps.append(sd.step().tokens)
        runs[unrolled] = (trees, steps, {n: g.view().copy() for n, g in sd.drafter.kv.items()})
    (t0, s0, kv0), (t1, s1, kv1) = runs[False], runs[True]
    assert s0 == s1
    for a, b in zip(t0, t1):
        # the stepwise tree lists nodes depth by depth, the graph lists candidates level by level: compare as sets of paths
        assert _paths(*a) == _paths(*b)
    assert len(t0[0][0]) > 1
    for name in kv0:
        np.testing.assert_allclose(kv0[name], kv1[name], atol=1e-4)


def _paths(tokens, parents, depth):
    out = set()
    for i in range(len(tokens)):
        path, u = [], i
        while u >= 0:
            path.append(tokens[u])
            u = parents[u]
        out.add(tuple(reversed(path)))
    return out


def test_set_draft_tree_keeps_the_bundle_valid(zoo, tmp_path):
    import json
    import shutil

    from dream_export.export.exporter import load_target, set_draft_tree
    from runtime.bundle import Bundle

    model_dir, bundle = zoo.with_drafter("tied_loop", "copy")
    ddir = zoo._built["tied_loop+copy"][2]
    dst = tmp_path / "b"
    shutil.copytree(bundle, dst)
    old = json.loads((dst / "manifest.json").read_text())["graphs"]["draft_tree"]["file"]
    model, processor = load_target(str(model_dir))
    set_draft_tree(dst, model, processor, ddir, TreeSpec(10, 5, 2))
    m = Bundle.load(dst).manifest  # every hash still matches
    assert m["tree"] == {"total_tokens": 10, "depth": 5, "top_k": 2}
    assert (m["graphs"]["draft_tree"]["depth"], m["graphs"]["draft_tree"]["top_k"]) == (5, 2)
    assert not (dst / old).exists() and old not in m["files"]


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_quantized_draft_graph_is_lossless_and_runs_on_ort_cpu(zoo, images, tmp_path, precision):
    """--draft-precision: an ORT-CPU twin of the draft graph with MatMulNBits weights. The runtime uses it on
    ORT-CPU; greedy output still equals plain decoding (the target verifies every proposal); re-exporting
    the tree keeps the precision and leaves no stale file."""
    import json

    from dream_export.export.exporter import ExportOptions, export_bundle, load_target, set_draft_tree
    from runtime.bundle import Bundle
    from runtime.drafter import tree_graph_for

    model_dir, _ = zoo.with_drafter("tied_loop", "copy")
    ddir = zoo._built["tied_loop+copy"][2]
    model, processor = load_target(str(model_dir))
    tree = TreeSpec(8, 3, 2)
    bundle = export_bundle(model, processor, {"model": "q"}, ExportOptions(out=tmp_path / "b", drafter=ddir, tree=tree,
                                                                             draft_precision=precision), quiet=True)
    m = json.loads((bundle / "manifest.json").read_text())
    q = m["graphs"]["draft_tree_ort_cpu"]
    assert m["drafter"]["draft_precision"] == precision and m["drafter"]["tree_graph_ort_cpu"] == "draft_tree_ort_cpu"
    assert "com.microsoft::MatMulNBits" in q["non_standard"] and q["file"].endswith(f"_{precision}.onnx")
    assert not m["graphs"]["draft_tree"]["non_standard"]  # the TensorRT graph stays float and standard
    pipe = Pipeline.from_bundle(bundle)
    pipe.tree_spec = tree
    assert tree_graph_for(pipe.backend, pipe.bundle.manifest) == "draft_tree_ort_cpu"
    accepted = 0
    for names, prompt_idx in PAIRS[:10]:
        paths = [str(images[n]) for n in names]
        spec = pipe.generate(paths, PROMPTS[prompt_idx], max_new_tokens=MAX_NEW)
        plain = pipe.generate(paths, PROMPTS[prompt_idx], max_new_tokens=MAX_NEW, speculative=False)
        assert spec.token_ids == plain.token_ids, names
        accepted += sum(a - 1 for a in spec.accept_lengths)
    assert accepted > 0
    assert "draft_tree_ort_cpu" in pipe.backend._sessions and "draft_tree" not in pipe.backend._sessions

    old = q["file"]
    set_draft_tree(bundle, model, processor, ddir, TreeSpec(6, 5, 1))
    m = Bundle.load(bundle).manifest  # every hash still matches
    assert (m["graphs"]["draft_tree_ort_cpu"]["depth"], m["graphs"]["draft_tree_ort_cpu"]["top_k"]) == (5, 1)
    assert m["graphs"]["draft_tree_ort_cpu"]["file"].endswith(f"_{precision}.onnx")
    assert not (bundle / old).exists() and old not in m["files"]


def test_unknown_draft_precision_is_refused(zoo, tmp_path):
    from dream_export.errors import DreamExportError
    from dream_export.export.exporter import ExportOptions, export_bundle, load_target

    model_dir, _ = zoo.with_drafter("tied_loop", "copy")
    model, processor = load_target(str(model_dir))
    with pytest.raises(DreamExportError, match="int16.*fp32, int8, int4"):
        export_bundle(model, processor, {"model": "q"}, ExportOptions(out=tmp_path / "b", drafter=zoo._built["tied_loop+copy"][2],
                                                                       draft_precision="int16"), quiet=True)
    assert not (tmp_path / "b").exists()


def test_lookup_continuation_copies_what_followed_the_latest_longest_match():
    from runtime.lookup import lookup_continuation

    seq = [5, 1, 2, 3, 9, 9, 1, 2, 4, 7, 8, 1, 2]
    # "1 2" occurred twice before the end: the latest one (followed by 4 7 8 ...) wins
    assert lookup_continuation(seq, 3) == [4, 7, 8]
    assert lookup_continuation(seq, 10) == [4, 7, 8, 1, 2]  # up to the end of the sequence
    # the longest suffix that occurs decides: "3 1 2" does not occur, "9 9 1" does not end the sequence
    assert lookup_continuation([0, 3, 4, 9, 1, 3, 4, 5, 0, 3, 4], 2) == [9, 1]  # trigram "0 3 4" beats the later "3 4"
    assert lookup_continuation([1, 2, 8, 5, 2, 6, 1, 2], 2) == [8, 5]  # "1 2" (bigram) beats the later "2" -> 6
    assert lookup_continuation([1, 2, 8, 5, 2, 6, 1, 2], 2, max_ngram=1) == [6, 1]  # unigram only: the latest "2"
    assert lookup_continuation([1, 2, 3, 4], 3) == []  # nothing repeats
    assert lookup_continuation([4, 4], 3) == [4]
    assert lookup_continuation([3, 1, 99, 99, 5, 3, 1], 4, image_token_id=99) == []  # stops before an image token
    assert lookup_continuation([3, 1, 6, 99, 5, 3, 1], 4, image_token_id=99) == [6]
    assert lookup_continuation([3, 1, 6, 3, 1], 0) == [] and lookup_continuation([3], 4) == []


def test_lookup_continuation_equals_a_direct_search_on_random_sequences():
    """Against the definition written out plainly: for g from the longest down, the latest start s (s + g < len)
    with seq[s:s+g] == the last g tokens; what follows, cut before an image token; the next g when that is empty."""
    import numpy as np

    from runtime.lookup import lookup_continuation

    def direct(seq, n, image, max_ngram=3, min_ngram=1):
        if n <= 0 or len(seq) < 2:
            return []
        for g in range(min(max_ngram, len(seq) - 1), min_ngram - 1, -1):
            starts = [s for s in range(len(seq) - g) if seq[s:s + g] == seq[-g:]]
            if starts:
                out = seq[starts[-1] + g: starts[-1] + g + n]
                out = out[: out.index(image)] if image in out else out
                if out:
                    return out
        return []

    rng = np.random.default_rng(0)
    checked = 0
    for _ in range(3000):
        seq = [int(t) for t in rng.integers(0, int(rng.integers(2, 8)), int(rng.integers(0, 40)))]
        n, image, hi = int(rng.integers(0, 6)), int(rng.integers(0, 8)), int(rng.integers(1, 5))
        expected = direct(seq, n, image, hi)
        assert lookup_continuation(seq, n, image, max_ngram=hi) == expected, (seq, n, image, hi)
        checked += bool(expected)
    assert checked > 1000  # most cases found something to copy


def test_tree_spec_lookup_parses_and_old_manifests_read_the_same():
    assert TreeSpec.parse("8,3,2") == TreeSpec(8, 3, 2) == TreeSpec.from_json({"total_tokens": 8, "depth": 3, "top_k": 2})
    assert TreeSpec.parse("8,3,2,6") == TreeSpec(8, 3, 2, 6)
    assert TreeSpec(8, 3, 2).to_json() == {"total_tokens": 8, "depth": 3, "top_k": 2}  # no new key without lookup
    assert TreeSpec.from_json(TreeSpec(8, 3, 2, 6).to_json()) == TreeSpec(8, 3, 2, 6)
    assert TreeSpec.parse("8,3,2,8,-1.5") == TreeSpec(8, 3, 2, 8, -1.5)
    assert TreeSpec.from_json(TreeSpec(8, 3, 2, 8, -1.5).to_json()) == TreeSpec(8, 3, 2, 8, -1.5)
    for bad in ("8,3", "8,3,2,1,1", "8,3,2,1,-1,2", "8,x,2", "0,3,2", "8,3,2,-1", "8,3,2,8,x"):
        with pytest.raises(ValueError, match="expected N,D,K, N,D,K,L or N,D,K,L,P"):
            TreeSpec.parse(bad)


def test_select_verifies_only_candidates_above_min_logp():
    import numpy as np

    from runtime.speculative import SpeculativeDecoder
    from runtime.tree import DraftTree

    #            root  a     b     a1    a2    b1
    tree = DraftTree(np.arange(6), np.array([0.0, -0.2, -1.0, -0.5, -2.5, -1.2]), np.array([-1, 0, 0, 1, 1, 2]),
                     np.array([0, 1, 1, 2, 2, 2]))
    select = SpeculativeDecoder._select
    assert select(tree, 6).tolist() == [0, 1, 3, 2, 5, 4]
    assert select(tree, 6, min_logp=-1.1).tolist() == [0, 1, 3, 2]
    assert select(tree, 6, min_logp=-0.1).tolist() == [0]            # nothing likely enough: a plain step
    assert select(tree, 6, max_leaves=1, min_logp=-3).tolist() == [0, 1, 3]


def test_lookup_adds_the_copied_chain_to_the_tree_and_it_is_accepted(zoo, images):
    """With a drafter that rarely guesses right (random weights) on a target that repeats itself, the copied
    chain is what gets accepted: more tokens per target call than the drafter's tree alone, same tokens. The
    chain is ranked with the drafter's nodes (reusing a node that drafts the same token), the verify size
    stays N, and every node's children stay distinct (what sampled acceptance needs)."""
    import numpy as np

    from runtime.sampling import SamplingConfig
    from runtime.lookup import LOOKUP_LOGP, lookup_continuation
    from runtime.speculative import SpeculativeDecoder

    _, bundle = zoo.with_drafter("tied_loop", "random")
    pipe = Pipeline.from_bundle(bundle)
    paths = [str(images["coffee"])]
    runs = {}
    for tree in (TreeSpec(8, 3, 2), TreeSpec(8, 3, 2, 8)):
        pipe.tree_spec = tree
        r = pipe.generate(paths, "Describe the image.", max_new_tokens=60)
        runs[tree.lookup] = (r.token_ids, float(np.mean(r.accept_lengths)))
    plain = pipe.generate(paths, "Describe the image.", max_new_tokens=60, speculative=False).token_ids
    assert runs[0][0] == runs[8][0] == plain
    assert runs[8][1] > runs[0][1] + 0.5, runs  # the loop is copied, not guessed

    prep = pipe.prepare(paths, "Describe the image.")
    sd = SpeculativeDecoder(pipe, TreeSpec(8, 3, 2, 8), SamplingConfig(), np.random.default_rng(0), unrolled=False)
    sd.start(pipe.prompt_embeds(prep), prep.input_ids)
    original = sd._with_lookup
    calls = []

    def record(tree, n):
        seq = np.append(sd.ctx.ids[: sd.dec.length], sd.root)
        out = original(tree, n)
        calls.append((tree, n, lookup_continuation(seq, n, pipe.image_token_id), out))
        return out

    sd._with_lookup = record
    for _ in range(6):
        sd.step()
    seen = 0
    for base, n, chain, tree in calls:
        assert n == 7  # at most N - 1 copied tokens
        assert len(tree.tokens) >= len(base.tokens) and (tree.tokens[: len(base.tokens)] == base.tokens).all()
        at = 0
        for tok in chain:  # the chain hangs below the root, node by node
            kids = [i for i in range(len(tree.tokens)) if tree.parents[i] == at and tree.tokens[i] == tok]
            assert len(kids) == 1
            at = kids[0]
            assert tree.depth[at] == tree.depth[tree.parents[at]] + 1
            assert tree.scores[at] >= tree.depth[at] * LOOKUP_LOGP - 1e-9
        assert len(tree.tokens) - len(base.tokens) <= len(chain)  # new nodes only where the drafter had none
        pairs = [(int(p), int(t)) for p, t in zip(tree.parents, tree.tokens)]
        assert len(set(pairs)) == len(pairs)  # distinct children everywhere
        assert len(sd._select(tree, 8)) <= 8
        seen += len(chain)
    assert seen > 0
