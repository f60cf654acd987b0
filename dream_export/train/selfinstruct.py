"""Prompts and answers written by the target itself, in batches (no dataset needed).

- ``self_instructions``: Magpie-style (Xu et al. 2024, arXiv 2406.08464): an instruct model given only its chat
  template up to the start of a user turn writes a user request; sampled many times, that is a varied prompt set
  drawn from the model's own idea of what users ask. Requests that did not end with an end-of-turn token within
  ``max_new_tokens``, that are too short, or that repeat one already kept are dropped.
- ``greedy_answers``: the target's greedy answers to text-only prompts, generated in left-padded batches (one
  ``generate`` call per batch instead of per prompt; on this CPU ~10x the tokens per second at batch 32).

Both go through the target's own processor and chat template, so they hold for any family whose template takes
a text-only user turn.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import torch

from ..errors import DreamExportError
from .features import chat_text

_MARK = "\x00dream-export-user-text\x00"


def pre_query_prefix(processor) -> str:
    """The chat template's text up to where a user's request begins (system prompt and user header included)."""
    full = chat_text(processor, _MARK, generation_prompt=False)
    if _MARK not in full:
        raise DreamExportError("the chat template does not place the user's text verbatim; self-instructions need it")
    return full[: full.index(_MARK)]


def _config_eos(model) -> set[int]:
    """The end ids ``generate`` stops at by default (the generation config's)."""
    eos = model.generation_config.eos_token_id
    return set() if eos is None else {int(i) for i in torch.atleast_1d(torch.tensor(eos))}


def _end_ids(model, tokenizer) -> set[int]:
    ids = _config_eos(model)
    for name in ("<|im_end|>", "<end_of_utterance>", "<end_of_turn>", "<|eot_id|>", "</s>"):
        tid = tokenizer.convert_tokens_to_ids(name)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id and tid >= 0:
            ids.add(tid)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return ids


@torch.no_grad()
def self_instructions(model, processor, n: int, seed: int = 0, batch: int = 32, max_new_tokens: int = 64,
                      temperature: float = 1.0, top_p: float = 0.95, min_words: int = 3, max_rounds: int | None = None,
                      progress=None) -> list[str]:
    """``n`` distinct user requests sampled from the target's pre-query template (seeded, deterministic)."""
    tok = processor.tokenizer
    prefix = pre_query_prefix(processor)
    enc = tok([prefix], return_tensors="pt", add_special_tokens=False)
    ends = _end_ids(model, tok)
    kept, seen = [], set()
    rounds = max_rounds if max_rounds is not None else 4 * ((n + batch - 1) // batch) + 4
    for r in range(rounds):
        if len(kept) >= n:
            break
        torch.manual_seed(seed * 1_000_003 + r)
        ids = enc["input_ids"].repeat(batch, 1)
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=True, temperature=temperature, top_p=top_p, top_k=0,
                             eos_token_id=sorted(ends), pad_token_id=_pad_id(tok, ends))
        for row in out[:, ids.shape[1]:].tolist():
            cut = next((i for i, t in enumerate(row) if t in ends), None)
            if cut is None:  # ran out of tokens mid-request
                continue
            text = tok.decode(row[:cut], skip_special_tokens=True).strip()
            key = re.sub(r"\W+", " ", text.lower()).strip()
            if len(text.split()) < min_words or key in seen or _MARK in text:
                continue
            seen.add(key)
            kept.append(text)
            if len(kept) >= n:
                break
        if progress is not None:
            progress(len(kept))
    if len(kept) < n:
        raise DreamExportError(f"the target wrote only {len(kept)} of {n} distinct requests that end its turn within "
                               f"{max_new_tokens} tokens in {rounds} rounds of {batch}; self-instructions need an "
                               f"instruct model (one that ends its turns)")
    return kept


def cached_self_instructions(model, processor, n: int, seed: int, path: Path, batch: int = 40,
                             max_new_tokens: int = 64) -> list[str]:
    """``self_instructions`` written once to ``path`` (JSON: settings and requests; temp file, then rename) and read
    back on later runs with the same settings, so a resumed training sees the same prompts."""
    path = Path(path)
    settings = {"n": n, "seed": seed, "batch": batch, "max_new_tokens": max_new_tokens}
    if path.is_file():
        have = json.loads(path.read_text())
        if isinstance(have, dict) and have.get("settings") == settings:
            return have["requests"]
    t0 = time.time()
    requests = self_instructions(model, processor, n, seed=seed, batch=batch, max_new_tokens=max_new_tokens,
                                 progress=lambda k: print(f"self-instructions: {k}/{n} ({time.time() - t0:.0f} s)", flush=True))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"settings": settings, "requests": requests}, indent=0))
    os.replace(tmp, path)
    return requests


def _pad_id(tok, ends: set[int]) -> int:
    return int(tok.pad_token_id) if tok.pad_token_id is not None else min(ends)


@torch.no_grad()
def greedy_answers(model, processor, prompts: list[str], max_new_tokens: int, batch: int = 32,
                   suppress: list[int] | None = None) -> list[list[int]]:
    """The target's greedy answer ids to each text-only prompt (its end token included when reached, as
    ``generate`` returns it), generated in left-padded batches. The prompts are tokenized exactly as
    ``features.target_features`` tokenizes them (the processor on the chat template's text) and batched by length,
    so little padding is computed."""
    tok = processor.tokenizer
    stops = _config_eos(model)
    pad = _pad_id(tok, stops or _end_ids(model, tok))
    rows = [processor(text=chat_text(processor, p), return_tensors="pt")["input_ids"][0] for p in prompts]
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    answers: list[list[int] | None] = [None] * len(rows)
    for s in range(0, len(order), batch):
        idx = order[s:s + batch]
        width = max(len(rows[i]) for i in idx)
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for r, i in enumerate(idx):
            ids[r, width - len(rows[i]):] = rows[i]
            mask[r, width - len(rows[i]):] = 1
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=pad, suppress_tokens=suppress)
        for i, row in zip(idx, out[:, width:].tolist()):
            cut = next((j for j, t in enumerate(row) if t in stops), None)
            answers[i] = row if cut is None else row[: cut + 1]
    return answers
