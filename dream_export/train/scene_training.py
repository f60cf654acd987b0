"""Teaching a target the synthetic scenes: the steps both built-in models' recipes share.

The drafter is trained elsewhere in this package (``trainer``); here the target itself learns: per-cell ground truth
for a vision tower, one training sequence per scene that holds the image once and every question type as its own
segment (``ScenePool`` + ``shared_prefix_batch``), question weights from held-out accuracy, greedy held-out accuracy
through transformers' ``generate``, and the JSON-lines log a recipe writes.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..scenes import QUESTION_TYPES, Scene, cell_labels, class_counts, grade, label_map, qa_pairs, random_scene, scene_examples


def vision_example(scene: Scene, pre, grid: int):
    """(tiles [T,3,S,S], cell labels [T, grid*grid], class counts) of a scene through an ``Idefics3Preprocessor``: the
    labels are the class map cut into the same tiles as the pixels."""
    frames, _, _ = pre.frames(np.array(scene.render()), int(pre.cfg["resample"]))
    labels, _, _ = pre.frames(label_map(scene)[..., None].repeat(3, -1), Image.NEAREST)
    tiles = np.stack([pre.normalize(f) for f in frames])
    cells = np.stack([cell_labels(lab[..., 0], grid) for lab in labels])
    return tiles, cells, class_counts(scene)


def vision_tokens(model, tiles: torch.Tensor) -> torch.Tensor:
    """[tiles, image_seq_len, hidden]: the connector's image tokens of an Idefics3 model."""
    return model.model.get_image_features(pixel_values=tiles[None]).pooler_output[0].view(tiles.shape[0], -1, model.config.text_config.hidden_size)


class ScenePool:
    """Scenes with their frozen image tokens cached, and the chat template split around the question.

    One training sequence per scene holds the shared prefix (the user turn up to the end of the image)
    once and then one segment per question (question, assistant header, answer), each segment seeing
    only the prefix and itself (``shared_prefix_batch``): the same loss as one sequence per question,
    for a fraction of the tokens, because the image tokens are most of every sequence."""

    MARK = "\ue000"  # a private-use character where the question goes

    def __init__(self, model, processor, pre, seed: int, count: int, desc: str, encode=None, answer_prefix: str = " ",
                 dtype=torch.float32):
        """``encode(model, tiles) -> [tokens, D]`` is what gets cached per scene (default: the frozen connector's
        image tokens); ``answer_prefix`` is what the template puts between the assistant header and the answer."""
        from rich.progress import track

        from runtime.chat import render, user_turn

        rng = np.random.default_rng(seed)
        encode = encode or (lambda m, tiles: vision_tokens(m, tiles).reshape(-1, m.config.text_config.hidden_size))
        self.answer_prefix = answer_prefix
        self.items = []
        self.tok = processor.tokenizer
        self.template = processor.chat_template
        self.pre = pre
        text = render(self.template, user_turn(1, self.MARK))
        if text.count(self.MARK) != 1:
            raise ValueError("the chat template must place the question text exactly once")
        self.head, self.tail = text.split(self.MARK)
        model.eval()
        for _ in track(range(count), description=desc, transient=True):
            scene = random_scene(rng)
            img = pre.image(scene.render())
            with torch.no_grad():
                emb = encode(model, torch.from_numpy(img.tiles))
            image_text = pre.image_text(img)
            prefix = self.tok(self.head.replace(pre.cfg["image_token"], image_text, 1), add_special_tokens=True)["input_ids"]
            self.items.append((scene, image_text, emb.to(dtype), prefix))
        # the split must tokenize exactly as the whole prompt does (it ends on a special token)
        scene, image_text, _, prefix = self.items[0]
        for qa in qa_pairs(scene, rng):
            if prefix + self.segment(qa.prompt) != self.prompt_ids(image_text, qa.prompt):
                raise RuntimeError("the chat template does not tokenize the same when split before the question")

    def prompt_ids(self, image_text: str, prompt: str) -> list[int]:
        from runtime.chat import render, user_turn

        text = render(self.template, user_turn(1, prompt)).replace(self.pre.cfg["image_token"], image_text, 1)
        return self.tok(text, add_special_tokens=True)["input_ids"]

    def segment(self, prompt: str) -> list[int]:
        return self.tok(prompt + self.tail, add_special_tokens=False)["input_ids"]

    def answer(self, text: str, eou: int) -> list[int]:
        return self.tok(self.answer_prefix + text, add_special_tokens=False)["input_ids"] + [eou]

    def sequence(self, i: int, rng: np.random.Generator, eou: int, weights: dict[str, float]):
        """The scene's prefix ids, its image tokens, and one (question ids, answer ids, weight) per question type."""
        scene, _, emb, prefix = self.items[i]
        segs = [(self.segment(qa.prompt), self.answer(qa.answer, eou), weights[qa.qtype]) for qa in qa_pairs(scene, rng)]
        return prefix, emb, segs


def question_weights(acc: dict[str, float]) -> dict[str, float]:
    """Every question type's loss weight, by how often it is still answered wrongly on held-out scenes (floor 0.3),
    normalised to mean 1."""
    need = {t: 1.0 - acc.get(t, 0.0) + 0.3 for t in QUESTION_TYPES}
    mean_need = sum(need.values()) / len(need)
    return {t: v / mean_need for t, v in need.items()}


def shared_prefix_batch(model, seqs, image_token_id: int):
    """inputs_embeds [B,L,H], additive mask [B,1,L,L], position ids [B,L], labels [B,L] and per-token
    loss weights [B,L] for sequences of a shared prefix and independent question segments.

    A segment attends to the prefix and causally to itself, and its positions continue from the end of
    the prefix, so each answer is predicted exactly as from the single-question prompt. Each answer's
    tokens share its weight equally (an answer's loss is its mean over tokens)."""
    embed = model.model.text_model.embed_tokens
    lengths = [len(p) + sum(len(q) + len(a) for q, a, _ in segs) for p, _, segs in seqs]
    B, L, H = len(seqs), max(lengths), embed.weight.shape[1]
    x = torch.zeros(B, L, H)
    allowed = torch.zeros(B, L, L, dtype=torch.bool)
    pos = torch.zeros(B, L, dtype=torch.long)
    labels = torch.full((B, L), -100, dtype=torch.long)
    wt = torch.zeros(B, L)
    for b, (prefix, emb, segs) in enumerate(seqs):
        ids = list(prefix)
        n = len(prefix)
        allowed[b, :n, :n] = torch.ones(n, n, dtype=torch.bool).tril()
        pos[b, :n] = torch.arange(n)
        start = n
        for q, a, w in segs:
            m = len(q) + len(a)
            ids += q + a
            allowed[b, start:start + m, :n] = True
            allowed[b, start:start + m, start:start + m] = torch.ones(m, m, dtype=torch.bool).tril()
            pos[b, start:start + m] = n + torch.arange(m)
            first = start + len(q) - 1  # the question's last token predicts the answer's first
            labels[b, first:first + len(a)] = torch.tensor(a)
            wt[b, first:first + len(a)] = w / len(a)
            start += m
        ids_t = torch.tensor(ids)
        e = embed(ids_t)
        slots = (ids_t == image_token_id).nonzero().squeeze(1)
        x[b, :start] = e.index_put((slots,), emb)
        pad = torch.arange(start, L)
        allowed[b, pad, pad] = True  # padding rows see themselves only (no empty softmax)
    mask = torch.zeros(B, 1, L, L).masked_fill_(~allowed[:, None], torch.finfo(torch.float32).min)
    return x, mask, pos, labels, wt


def text_hidden(model, x, mask, pos):
    """The text model's decoder layers over a custom 4-D mask and explicit positions (HF's layers, unchanged), before
    the final norm."""
    tm = model.model.text_model
    position_embeddings = tm.rotary_emb(x, pos)
    h = x
    for layer in tm.layers:
        h = layer(h, attention_mask=mask, position_ids=pos, position_embeddings=position_embeddings)
        h = h[0] if isinstance(h, tuple) else h
    return h


def text_logits(model, x, mask, pos):
    """The text model and head over a custom 4-D mask and explicit positions."""
    return model.lm_head(model.model.text_model.norm(text_hidden(model, x, mask, pos)))


@torch.no_grad()
def evaluate_torch(model, processor, seed: int, scenes: int, max_new_tokens: int = 48) -> dict:
    """Greedy exact-answer accuracy per question type, through transformers' generate."""
    model.eval()
    hits: dict[str, list[bool]] = {t: [] for t in QUESTION_TYPES}
    for scene, qa in scene_examples(seed, scenes):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": qa.prompt}]}]
        text = processor.apply_chat_template(messages, add_generation_prompt=True)
        enc = processor(text=text, images=[[scene.render()]], return_tensors="pt")
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)
        answer = processor.tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        hits[qa.qtype].append(grade(qa, scene, answer))
    return {t: float(np.mean(v)) for t, v in hits.items() if v}


def log(out: Path, record: dict) -> None:
    """Print one progress record as JSON and append it to OUT/log.jsonl."""
    record = {"time": time.strftime("%H:%M:%S"), **record}
    print(json.dumps(record), flush=True)
    with open(out / "log.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
