"""The runtime's preprocessing and tokenization reproduce the HF processor exactly."""

import numpy as np
import pytest

from helpers import PAIRS, PROMPTS, hf_inputs
from runtime.pipeline import Pipeline


@pytest.mark.parametrize("config", ["split_mha", "gqa_nosplit"])
def test_ids_and_pixels_match_hf_processor(zoo, images, config):
    model_dir, bundle = zoo.get(config)
    pipe = Pipeline.from_bundle(bundle)
    for names, prompt_idx in PAIRS:
        paths = [images[n] for n in names]
        prompt = PROMPTS[prompt_idx]
        ours = pipe.prepare([str(p) for p in paths], prompt)
        ref = hf_inputs(str(model_dir), paths, prompt)
        assert ours.input_ids.tolist() == ref["input_ids"][0].tolist(), names
        want = ref["pixel_values"][0].numpy()  # [T,3,S,S] (one sample)
        got = np.concatenate(ours.tiles)
        assert got.shape == want.shape, names
        assert np.max(np.abs(got - want)) <= 1e-5, names


def test_chat_template_matches_apply_chat_template(zoo):
    from helpers import hf_model

    model_dir, bundle = zoo.get("split_mha")
    pipe = Pipeline.from_bundle(bundle)
    _, processor = hf_model(str(model_dir))
    for n in (0, 1, 3):
        messages = [{"role": "user", "content": [{"type": "image"}] * n + [{"type": "text", "text": "Hi {{ there }}!"}]}]
        assert pipe.prompt_text(n, "Hi {{ there }}!") == processor.apply_chat_template(messages, add_generation_prompt=True)
