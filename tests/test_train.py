"""Drafter training: features are cached and resumable, training lowers held-out loss and raises acceptance."""

import json

import pytest
import torch

from dream_export.train.features import build_cache, entropy_select, load_examples
from dream_export.train.trainer import TrainOptions, chain_acceptance, sequence_loss, train_drafter
from dream_export.train.data import load_samples


@pytest.fixture(scope="module")
def cached(zoo, tmp_path_factory):
    from dream_export.export.exporter import load_target
    from dream_export.drafter.model import DrafterConfig

    model_dir, _ = zoo.get("learnable")
    model, processor = load_target(str(model_dir))
    out = tmp_path_factory.mktemp("train")
    samples = load_samples("scenes:36", seed=3)
    cfg = DrafterConfig.for_target(model.config.text_config)
    shards = build_cache(model, processor, samples, out / "features", cfg.mid_layer_candidates, shard_size=12, max_new_tokens=16)
    return model, processor, out, shards, cfg


def _heldout_loss(drafter, held, opts, image_token_id):
    drafter.eval()
    with torch.no_grad():
        return sum(sequence_loss(drafter, ex, opts, image_token_id)[0].item() for ex in held) / len(held)


def test_training_lowers_loss_and_raises_acceptance(cached):
    from dream_export.drafter.model import DreamDrafter

    model, _, out, shards, cfg = cached
    examples = load_examples(shards)
    assert len(examples) == 36 and len(shards) == 3
    train, held = examples[:-6], examples[-6:]
    opts = TrainOptions(out=out / "run", steps=150, lr=3e-3, batch=4, eval_every=75, ckpt_every=75)
    image_token_id = model.config.image_token_id
    torch.manual_seed(0)
    untrained = DreamDrafter(cfg, model.lm_head.weight)
    before_loss = _heldout_loss(untrained, held, opts, image_token_id)
    before_acc = chain_acceptance(untrained, held, image_token_id, opts.keep_visual)
    final = train_drafter(model, train, held, opts, cfg)
    trained = DreamDrafter.load(final, model.lm_head.weight)
    after_loss = _heldout_loss(trained, held, opts, image_token_id)
    after_acc = chain_acceptance(trained, held, image_token_id, opts.keep_visual)
    assert after_loss < 0.95 * before_loss
    assert after_acc > before_acc + 0.2
    history = json.loads((final / "training.json").read_text())["state"]["history"]
    assert [h["step"] for h in history] == [75, 150]


def test_training_resumes_from_checkpoint(cached):
    model, _, out, shards, cfg = cached
    examples = load_examples(shards)
    opts = TrainOptions(out=out / "resume", steps=6, lr=1e-3, batch=2, eval_every=100, ckpt_every=3)
    train_drafter(model, examples, [], opts, cfg)
    state = json.loads((out / "resume" / "checkpoint" / "state.json").read_text())
    assert state["step"] == 6
    opts.steps = 9
    train_drafter(model, examples, [], opts, cfg)
    assert json.loads((out / "resume" / "checkpoint" / "state.json").read_text())["step"] == 9


def test_stop_step_ends_early_on_the_same_schedule(cached):
    """Ablations stop at the step a timed run reached: same schedule, same steps, a held-out score at the end."""
    model, _, out, shards, cfg = cached
    examples = load_examples(shards)
    opts = TrainOptions(out=out / "stop", steps=40, stop_step=7, lr=1e-3, batch=2, eval_every=100, ckpt_every=100)
    final = train_drafter(model, examples[:-4], examples[-4:], opts, cfg)
    state = json.loads((final / "training.json").read_text())["state"]
    assert state["step"] == 7 and [h["step"] for h in state["history"]] == [7]
    assert json.loads((out / "stop" / "checkpoint" / "state.json").read_text())["step"] == 7


def test_feature_cache_resumes(cached, monkeypatch):
    model, processor, out, shards, cfg = cached
    before = [p.stat().st_mtime_ns for p in shards]
    samples = load_samples("scenes:36", seed=3)
    again = build_cache(model, processor, samples, out / "features", cfg.mid_layer_candidates, shard_size=12, max_new_tokens=16)
    assert [p.stat().st_mtime_ns for p in again] == before  # nothing recomputed


def test_feature_cache_refuses_other_settings(cached):
    from dream_export.errors import DreamExportError

    model, processor, out, shards, cfg = cached
    samples = load_samples("scenes:36", seed=3)
    with pytest.raises(DreamExportError, match="max_new_tokens"):
        build_cache(model, processor, samples, out / "features", cfg.mid_layer_candidates, shard_size=12, max_new_tokens=20)
    with pytest.raises(DreamExportError, match="model"):
        build_cache(model, processor, samples, out / "features", cfg.mid_layer_candidates, shard_size=12,
                    max_new_tokens=16, fingerprint={"model": "another"})


def test_entropy_selection_picks_the_sharpest_layer():
    s, h = 4, 3
    flat = torch.full((1, 2, s, s), 1.0 / s)                  # maximal entropy
    sharp = torch.zeros(1, 2, s, s)
    sharp[..., 0] = 1.0                                     # zero entropy
    attentions = [flat, sharp, flat]
    hidden = [torch.full((1, s, h), float(i)) for i in range(4)]  # hidden[l+1] = output of layer l
    feats, layers = entropy_select(attentions, hidden, [0, 1, 2])
    assert layers.tolist() == [1] * s
    assert torch.all(feats == 2.0)


def test_data_sources(tmp_path):
    from dream_export.errors import DreamExportError

    (tmp_path / "a.png").write_bytes(b"")
    (tmp_path / "d.jsonl").write_text('{"image": "a.png", "prompt": "hi"}\n{"image": ["a.png", "a.png"], "prompt": "two"}\n')
    s = load_samples(str(tmp_path / "d.jsonl"))
    assert [len(x.images) for x in s] == [1, 2] and s[1].prompt == "two" and s[0].images[0] == tmp_path / "a.png"
    (tmp_path / "l.json").write_text(json.dumps([{"image": "a.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "x"}]}]))
    s = load_samples(str(tmp_path / "l.json"))
    assert s[0].prompt == "What is it?"
    (tmp_path / "text.jsonl").write_text('{"prompt": "no image"}\n')  # a text-only prompt, as SmolVLM allows
    s = load_samples(str(tmp_path / "text.jsonl"))
    assert s[0].images == [] and s[0].prompt == "no image"
    for bad in ('{"image": "a.png"}', '{"image": "a.png", "prompt": "  "}', '["a.png", "hi"]'):
        (tmp_path / "bad.jsonl").write_text(bad + "\n")
        with pytest.raises(DreamExportError, match="bad.jsonl:1"):
            load_samples(str(tmp_path / "bad.jsonl"))
    with pytest.raises(DreamExportError, match="scenes:N"):
        load_samples("scenes:many")


def test_agreement_is_the_drafters_next_token_guess_position_by_position(cached):
    """``agreement`` (teacher-forced top-k over whole sequences, draft vocabulary mapped to target ids) equals
    running the drafter on each answer prefix alone and comparing its last guess with the target's next token."""
    from dream_export.drafter.model import DrafterConfig, DreamDrafter, full_sequence_masks
    from dream_export.train.trainer import keep_mask, agreement

    model, _, out, shards, cfg = cached
    examples = load_examples(shards)[:4]
    image = model.config.image_token_id
    vocab = list(range(0, model.config.text_config.vocab_size, 2))  # odd ids cannot be drafted
    cfg2 = DrafterConfig.for_target(model.config.text_config, draft_vocab=vocab)
    trained = train_drafter(model, examples, [], TrainOptions(out=out / "agree", steps=30, lr=3e-3, batch=2), cfg2)
    drafter = DreamDrafter.load(trained, model.lm_head.weight)
    got = agreement(drafter, examples, image, 0.75, ks=(1, 3))
    hits1 = hits3 = n = even = 0
    with torch.no_grad():
        for ex in examples:
            ids, p0 = ex["input_ids"], int(ex["prompt_len"][0])
            keep = keep_mask(ex, image, 0.75)
            for i in range(p0 - 1, len(ids) - 1):  # the query at i (token x_i) guesses x_{i+1}
                sm, cm = full_sequence_masks(i + 1, keep[: i + 1])
                logits = drafter(ex["embeds"][None, : i + 1], torch.arange(i + 1)[None], sm,
                                 ex["features"][None, : i + 1], cm, *drafter.empty_past())[0][0, -1]
                top = [vocab[j] for j in logits.topk(3).indices.tolist()]
                truth = int(ids[i + 1])
                hits1 += truth == top[0]
                hits3 += truth in top
                even += truth % 2 == 0
                n += 1
    assert got["tokens"] == n and got["in_vocab"] == round(even / n, 4)
    assert got["top1"] == round(hits1 / n, 4) and got["top3"] == round(hits3 / n, 4)
    assert 0 < got["top1"] <= got["top3"] <= got["in_vocab"] < 1
