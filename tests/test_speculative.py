"""Greedy speculative decoding is lossless: token ids equal plain decoding and transformers generate."""

import pytest

from helpers import PAIRS, PROMPTS, hf_generate
from runtime.pipeline import Pipeline
from runtime.tree import TreeSpec

MAX_NEW = 24
TREES = [TreeSpec(1, 1, 1), TreeSpec(8, 3, 2), TreeSpec(6, 6, 1), TreeSpec(32, 6, 4)]
COMBOS = [("split_mha", "random"), ("gqa_nosplit", "random"), ("tied_loop", "copy"), ("split_mha", "concat")]


@pytest.mark.parametrize("combo", COMBOS, ids=lambda c: "+".join(c))
@pytest.mark.parametrize("tree", TREES, ids=lambda t: f"N{t.total_tokens}D{t.depth}K{t.top_k}")
def test_speculative_greedy_is_lossless(zoo, images, combo, tree):
    model_dir, bundle = zoo.with_drafter(*combo)
    pipe = Pipeline.from_bundle(bundle)
    pipe.tree_spec = tree
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


def test_context_fills_mid_tree(zoo, images):
    model_dir, bundle = zoo.with_drafter("ctx_small", "copy")
    pipe = Pipeline.from_bundle(bundle)
    for tree in (TreeSpec(8, 3, 2), TreeSpec(32, 6, 4)):
        pipe.tree_spec = tree
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
