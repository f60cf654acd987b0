"""benchmarks/agreement.py's teacher forcing reads the right positions: a bundle agrees with its own greedy answers
at every answer token, and an answer shifted by one token does not."""

import importlib.util
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _agreement():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("agreement_benchmark", ROOT / "benchmarks" / "agreement.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_bundle_agrees_with_its_own_greedy_answers(tiny):
    from runtime.pipeline import Pipeline

    agreement = _agreement()
    pipe = Pipeline.from_bundle(tiny[1])
    image = str(ROOT / "examples" / "scene2.png")
    for images, prompt in (([image], "Describe the image."), ([], "What is a circle?")):
        answer = pipe.generate(images, prompt, max_new_tokens=24, speculative=False).token_ids
        assert len(answer) >= 4, answer
        same = agreement.teacher_forced_top1(pipe, images, prompt, answer)
        assert same.shape == (len(answer),) and same.all(), (prompt, same)
        shifted = agreement.teacher_forced_top1(pipe, images, prompt, answer[1:] + answer[-1:])
        assert not np.array_equal(shifted, np.ones_like(shifted)), prompt
