"""The built-in model's training recipe: the shared-prefix batch (one sequence per scene, one segment
per question) must give exactly the loss and gradients of one sequence per question."""

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AutoProcessor, Idefics3ForConditionalGeneration

from dream_export.presets.smolvlm_tiny.architecture import build_tiny_vlm
from dream_export.presets.smolvlm_tiny.recipe import TINY_SPEC
from dream_export.targets import adapter_for
from dream_export.train.scene_training import ScenePool, shared_prefix_batch, text_logits
from runtime.preprocess import Idefics3Preprocessor


def _setup(tmp_path):
    from dataclasses import replace

    spec = replace(TINY_SPEC, text_layers=2, vision_layers=1)
    build_tiny_vlm(tmp_path / "init", spec)
    model = Idefics3ForConditionalGeneration.from_pretrained(tmp_path / "init").float()
    processor = AutoProcessor.from_pretrained(tmp_path / "init")
    pre = Idefics3Preprocessor(adapter_for(model, processor).preprocessing())
    return model, processor, pre


def batch_embeds(model, examples, image_token_id: int):
    """The reference: one right-padded sequence per question (inputs_embeds, attention mask, labels -100
    outside the answers), run through transformers' own causal-mask path."""
    embed = model.model.text_model.embed_tokens
    L = max(len(p) + len(a) for p, a, _ in examples)
    x = torch.zeros(len(examples), L, embed.weight.shape[1])
    mask = torch.zeros(len(examples), L, dtype=torch.long)
    labels = torch.full((len(examples), L), -100, dtype=torch.long)
    for b, (p, a, emb) in enumerate(examples):
        ids = torch.tensor(p + a)
        slots = (ids == image_token_id).nonzero().squeeze(1)
        x[b, : len(ids)] = embed(ids).index_put((slots,), emb)
        mask[b, : len(ids)] = 1
        labels[b, len(p) - 1: len(ids) - 1] = torch.tensor(a)  # position t predicts token t+1
    return x, mask, labels


def test_shared_prefix_batch_equals_one_sequence_per_question(tmp_path):
    torch.manual_seed(0)
    model, processor, pre = _setup(tmp_path)
    pool = ScenePool(model, processor, pre, seed=3, count=3, desc="pool")
    eou = processor.tokenizer.convert_tokens_to_ids("<end_of_utterance>")
    weights = {"caption": 2.0, "count": 0.5, "color_count": 1.0, "color": 1.5, "shape": 1.0, "yesno": 0.7, "where": 1.2}
    seqs = [pool.sequence(i, np.random.default_rng(i), eou, weights) for i in range(3)]
    image_token_id = model.config.image_token_id

    x, mask, pos, labels, wt = shared_prefix_batch(model, seqs, image_token_id)
    model.zero_grad()
    tok = F.cross_entropy(text_logits(model, x, mask, pos).transpose(1, 2), labels, ignore_index=-100, reduction="none")
    shared = (tok * wt).sum()
    shared.backward()
    g_shared = [p.grad.clone() for p in model.parameters() if p.grad is not None]

    # reference: each question as its own single-turn sequence through transformers' own causal path
    examples, ws = [], []
    for prefix, emb, segs in seqs:
        for q, a, w in segs:
            examples.append((prefix + q, a, emb))
            ws.append(w)
    x, am, labels = batch_embeds(model, examples, image_token_id)
    model.zero_grad()
    out = model.model.text_model(inputs_embeds=x, attention_mask=am).last_hidden_state
    tok = F.cross_entropy(model.lm_head(out).transpose(1, 2), labels, ignore_index=-100, reduction="none")
    n = (labels != -100).sum(1)
    ref = (tok.sum(1) / n * torch.tensor(ws)).sum()
    ref.backward()
    g_ref = [p.grad.clone() for p in model.parameters() if p.grad is not None]

    assert len(examples) == 3 * 7
    torch.testing.assert_close(shared, ref, rtol=1e-5, atol=1e-5)
    assert len(g_shared) == len(g_ref)
    for a, b in zip(g_shared, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_split_template_matches_the_whole_prompt(tmp_path):
    model, processor, pre = _setup(tmp_path)
    pool = ScenePool(model, processor, pre, seed=5, count=2, desc="pool")
    for scene, image_text, _, prefix in pool.items:
        for prompt in ("Describe the image.", "What color is the circle?"):
            assert prefix + pool.segment(prompt) == pool.prompt_ids(image_text, prompt)
