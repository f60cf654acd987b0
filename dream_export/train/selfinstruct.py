"""Prompts and answers written by the target itself, in batches (no dataset needed).

- ``self_instructions``: Magpie-style (Xu et al. 2024, arXiv 2406.08464): an instruct model given only its chat
  template up to the start of a user turn writes a user request; sampled many times, that is a varied prompt set
  drawn from the model's own idea of what users ask. Requests that did not end with an end-of-turn token within
  ``max_new_tokens``, that are too short, or that repeat one already kept are dropped.
- ``greedy_answers``: the target's greedy answers to text-only prompts, generated in left-padded batches (one
  ``generate`` call per batch instead of per prompt; on this CPU ~10x the tokens per second at batch 32), a batch
  stopping once most of its answers have ended, the rest carried into later batches (2.1x again on SmolLM2).

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
from .data import chat_text

_MARK = "\x00dream-export-user-text\x00"

# Common first words of user requests (questions and instructions). ``self_instructions(openers=OPENERS)`` starts
# each batch's requests with one of them, in turn: without them a small model's requests are mostly "I need ..."
# statements, with them the set also holds the questions and tasks that instruction sets are made of.
OPENERS = ("What", "How", "Why", "Explain", "Describe", "Write", "List", "Give", "Tell me", "Can you", "Which",
           "Who", "When", "Where", "Compare", "Summarize", "Name", "Is", "Do", "Suggest")


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
                      progress=None, openers: tuple[str, ...] | None = None) -> list[str]:
    """``n`` distinct user requests sampled from the target's pre-query template (seeded, deterministic).
    ``openers``: round r's requests begin with ``openers[r % len(openers)]`` (the model writes the rest)."""
    tok = processor.tokenizer
    prefix = pre_query_prefix(processor)
    ends = _end_ids(model, tok)
    kept, seen = [], set()
    rounds = max_rounds if max_rounds is not None else 4 * ((n + batch - 1) // batch) + 4
    for r in range(rounds):
        if len(kept) >= n:
            break
        torch.manual_seed(seed * 1_000_003 + r)
        opener = openers[r % len(openers)] if openers else ""
        ids = tok([prefix + opener], return_tensors="pt", add_special_tokens=False)["input_ids"].repeat(batch, 1)
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=True, temperature=temperature, top_p=top_p, top_k=0,
                             eos_token_id=sorted(ends), pad_token_id=_pad_id(tok, ends))
        for row in out[:, ids.shape[1]:].tolist():
            cut = next((i for i, t in enumerate(row) if t in ends), None)
            if cut is None:  # ran out of tokens mid-request
                continue
            text = (opener + tok.decode(row[:cut], skip_special_tokens=True)).strip()
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
                             max_new_tokens: int = 64, openers: tuple[str, ...] | None = None) -> list[str]:
    """``self_instructions`` written once to ``path`` (JSON: settings and requests; temp file, then rename) and read
    back on later runs with the same settings, so a resumed training sees the same prompts."""
    path = Path(path)
    settings = {"n": n, "seed": seed, "batch": batch, "max_new_tokens": max_new_tokens}
    if openers:
        settings["openers"] = list(openers)
    if path.is_file():
        have = json.loads(path.read_text())
        if isinstance(have, dict) and have.get("settings") == settings:
            return have["requests"]
    t0 = time.time()
    requests = self_instructions(model, processor, n, seed=seed, batch=batch, max_new_tokens=max_new_tokens,
                                 openers=openers, progress=lambda k: print(f"self-instructions: {k}/{n} ({time.time() - t0:.0f} s)", flush=True))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"settings": settings, "requests": requests}, indent=0))
    os.replace(tmp, path)
    return requests


def _pad_id(tok, ends: set[int]) -> int:
    return int(tok.pad_token_id) if tok.pad_token_id is not None else min(ends)


class _Drain:
    """A ``generate`` stopping criterion for one batch: row r stops at an end id or after ``budgets[r]`` new
    tokens; the whole batch stops once at most ``keep`` rows are still running (their partial answers are
    carried into a later batch)."""

    def __init__(self, width: int, budgets: list[int], stops: set[int], keep: int):
        self.width, self.keep = width, keep
        self.budgets = torch.tensor(budgets)
        self.stops = torch.tensor(sorted(stops)) if stops else torch.empty(0, dtype=torch.long)
        self.done = torch.zeros(len(budgets), dtype=torch.bool)

    def __call__(self, input_ids, scores, **kwargs):
        n = input_ids.shape[1] - self.width
        self.done |= torch.isin(input_ids[:, -1], self.stops) | (n >= self.budgets)
        if int((~self.done).sum()) <= self.keep:
            return torch.ones_like(self.done)
        return self.done.clone()


@torch.no_grad()
def greedy_answers(model, processor, prompts: list[str], max_new_tokens: int, batch: int = 32,
                   suppress: list[int] | None = None, drain: float = 0.25) -> list[list[int]]:
    """The target's greedy answer ids to each text-only prompt (its end token included when reached, as
    ``generate`` returns it), generated in left-padded batches. The prompts are tokenized exactly as
    ``features.target_features`` tokenizes them (the processor on the chat template's text) and batched by length,
    so little padding is computed.

    A batch of ``generate`` runs until its longest answer ends, and a small model's answers vary a lot in length
    (most end within ~20 tokens, a few run to the limit), so most rows would idle. So a batch stops once no more
    than ``drain`` of its rows are still running while other prompts wait; the running rows go back in the queue
    with their answer so far appended to the prompt and continue greedily from there in a later batch (the same
    tokens in exact arithmetic: greedy decoding of a prefix continues it). ``drain=0`` runs each batch to its end."""
    from transformers import StoppingCriteriaList

    tok = processor.tokenizer
    stops = _config_eos(model)
    pad = _pad_id(tok, stops or _end_ids(model, tok))
    rows = [processor(text=chat_text(processor, p), return_tensors="pt")["input_ids"][0] for p in prompts]
    queue = [(i, []) for i in sorted(range(len(rows)), key=lambda i: len(rows[i]))]  # (prompt, answer so far)
    answers: list[list[int] | None] = [None] * len(rows)
    while queue:
        take, queue = queue[:batch], queue[batch:]
        seqs = [torch.cat([rows[i], torch.tensor(a, dtype=rows[i].dtype)]) for i, a in take]
        width = max(len(q) for q in seqs)
        ids = torch.full((len(take), width), pad, dtype=torch.long)
        mask = torch.zeros((len(take), width), dtype=torch.long)
        for r, q in enumerate(seqs):
            ids[r, width - len(q):] = q
            mask[r, width - len(q):] = 1
        budgets = [max_new_tokens - len(a) for _, a in take]
        keep = int(drain * len(take)) if queue else 0  # nothing waits: finish this batch
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max(budgets), do_sample=False,
                             pad_token_id=pad, suppress_tokens=suppress,
                             stopping_criteria=StoppingCriteriaList([_Drain(width, budgets, stops, keep)]))
        for (i, a), budget, row in zip(take, budgets, out[:, width:].tolist()):
            row = row[:budget]
            cut = next((j for j, t in enumerate(row) if t in stops), None)
            if cut is not None:
                answers[i] = a + row[: cut + 1]
            elif len(row) >= budget:
                answers[i] = a + row
            else:  # stopped with the batch: continue later
                queue.append((i, a + row))
    return answers
