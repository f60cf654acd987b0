"""Stop reasons, sampling controls and streaming of the plain (non-speculative) decoder."""

import numpy as np
import pytest

from helpers import hf_generate
from runtime.pipeline import Pipeline
from runtime.sampling import SamplingConfig, probabilities


def test_context_full_stops_like_transformers(zoo, images):
    model_dir, bundle = zoo.get("ctx_small")
    pipe = Pipeline.from_bundle(bundle)
    prompt = "Describe the image."
    res = pipe.generate([str(images["chelsea"])], prompt, max_new_tokens=500)
    assert res.stop_reason == "context_full"
    assert res.prompt_tokens + res.num_new_tokens == pipe.max_positions
    assert res.token_ids == hf_generate(str(model_dir), [images["chelsea"]], prompt, pipe.max_positions - res.prompt_tokens)


def test_stop_token_is_reported_and_included(zoo, images):
    _, bundle = zoo.get("split_mha")
    pipe = Pipeline.from_bundle(bundle)
    first = pipe.generate([str(images["rocket"])], "Describe the image.", max_new_tokens=6).token_ids
    pipe.stop_ids = {first[2]}  # make the third greedy token a stop token
    res = pipe.generate([str(images["rocket"])], "Describe the image.", max_new_tokens=6)
    assert res.stop_reason == "stop_token"
    stop_at = first.index(first[2])
    assert res.token_ids == first[: stop_at + 1]


def test_stream_pieces_join_to_text(zoo, images):
    _, bundle = zoo.get("gqa_nosplit")
    pipe = Pipeline.from_bundle(bundle)
    events = list(pipe.stream([str(images["coffee"])], "Describe the image.", max_new_tokens=16))
    final = events[-1].final
    assert final is not None and all(e.final is None for e in events[:-1])
    assert "".join(e.text for e in events) == final.text
    assert final.num_new_tokens == 16 and final.stop_reason == "max_new_tokens"


def test_sampling_is_seeded_and_varies(zoo, images):
    _, bundle = zoo.get("split_mha")
    pipe = Pipeline.from_bundle(bundle)
    path = [str(images["astronaut"])]
    a = pipe.generate(path, "Describe the image.", max_new_tokens=12, temperature=1.0, top_p=0.9, seed=7).token_ids
    b = pipe.generate(path, "Describe the image.", max_new_tokens=12, temperature=1.0, top_p=0.9, seed=7).token_ids
    others = {tuple(pipe.generate(path, "Describe the image.", max_new_tokens=12, temperature=1.0, seed=s).token_ids)
              for s in range(4)}
    assert a == b
    assert len(others) > 1


def test_top_p_keeps_the_smallest_nucleus():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    p = probabilities(logits, SamplingConfig(temperature=1.0, top_p=0.79))
    assert np.allclose(p, [0.5 / 0.8, 0.3 / 0.8, 0, 0])
    p = probabilities(logits, SamplingConfig(temperature=1.0, top_p=0.81))
    assert np.count_nonzero(p) == 3
    with pytest.raises(ValueError):
        SamplingConfig(temperature=-1)


@pytest.mark.parametrize("config", ["split_mha", "gqa_nosplit"])
def test_fused_and_standard_graphs_agree(zoo, images, config):
    _, bundle = zoo.get(config)
    fused = Pipeline.from_bundle(bundle, fused=True)
    plain = Pipeline.from_bundle(bundle, fused=False)
    assert type(fused.new_decoder()).__name__ == "FusedOrtDecoder"
    for name in ("astronaut", "tall_strip", "grace_hopper"):
        a = fused.generate([str(images[name])], "Describe the image.", max_new_tokens=20)
        b = plain.generate([str(images[name])], "Describe the image.", max_new_tokens=20)
        assert a.token_ids == b.token_ids


def test_decoders_commit_subsets_identically(zoo):
    """A 'tree' call followed by committing a subset leaves both caches in the same state."""
    from runtime.tree import depths, random_tree, tree_mask

    _, bundle = zoo.get("gqa_nosplit")
    pipes = [Pipeline.from_bundle(bundle, fused=f) for f in (True, False)]
    rng = np.random.default_rng(0)
    prefix = rng.standard_normal((1, 9, pipes[0].text["hidden_size"])).astype(np.float32)
    tree = rng.standard_normal((1, 8, pipes[0].text["hidden_size"])).astype(np.float32)
    nxt = rng.standard_normal((1, 1, pipes[0].text["hidden_size"])).astype(np.float32)
    parents = random_tree(8, rng)
    results = []
    for pipe in pipes:
        dec = pipe.new_decoder(slack=8)
        pipe.step(dec, prefix)
        dec.run(tree, tree_mask(parents, dec.length, pipe.mask_min), dec.length + depths(parents))
        path = [0]
        while True:
            kids = [i for i in range(8) if parents[i] == path[-1]]
            if not kids:
                break
            path.append(kids[0])
        dec.commit(path)
        results.append((dec.length, pipe.step(dec, nxt)["logits"]))
    assert results[0][0] == results[1][0]
    assert np.max(np.abs(results[0][1] - results[1][1])) < 1e-4


@pytest.mark.parametrize("parents", ([-1, 0, 1, 2], [-1, 0, 0, 1, 2, 3], [-1, 0, 1, 1, 2, 0]))
def test_standard_graph_verify_rows_equal_plain_steps_bitwise(zoo, parents):
    """On ONNX Runtime's CPU the standard graph's runner pads 1-row calls to 2 rows and verifies a tree chain by
    chain, so every verify row equals plain decoding of its path bit for bit (the INT8 graphs rely on it)."""
    from helpers import assert_tree_rows_are_plain_steps

    _, bundle = zoo.get("gqa_nosplit")
    pipe = Pipeline.from_bundle(bundle, fused=False)
    assert type(pipe.new_decoder()).__name__ == "PlainDecoder"
    assert_tree_rows_are_plain_steps(pipe, "Describe the image.", list(range(10, 10 + len(parents))), parents)
