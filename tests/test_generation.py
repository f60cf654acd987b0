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
