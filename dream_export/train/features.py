"""Self-distillation data and the features DREAM's losses need, cached on disk in safetensors shards.

For each (images, prompt): the target's own greedy answer; then one target forward over prompt+answer
(eager attention) gives, per position, the last-layer normed hidden state (the drafter's memory and
regression target), the entropy-selected intermediate feature (DESIGN §4: the candidate layer whose
attention distribution has the lowest entropy, averaged over heads, chosen per token), and, per
position, the last-layer attention it receives (mean over heads and queries: visual token compression).
Shards are written to a temp name and renamed, so an interrupted run resumes at the next shard.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .data import Sample, chat_text, open_images
from .selfinstruct import greedy_answers


def entropy_select(attentions, hidden_states, candidates: list[int]):
    """Per token, the candidate layer with the lowest mean-over-heads attention entropy, and its output feature.

    attentions[l]: [1,heads,S,S] of layer l; hidden_states[l+1] is that layer's output."""
    ents = []
    for layer in candidates:
        p = attentions[layer][0].float().clamp_min(1e-12)           # [heads,S,S]
        ents.append(-(p * p.log()).sum(-1).mean(0))                 # [S]
    ents = torch.stack(ents)                                        # [C,S]
    choice = ents.argmin(0)                                         # [S]
    feats = torch.stack([hidden_states[layer + 1][0] for layer in candidates])  # [C,S,H]
    selected = feats[choice, torch.arange(feats.shape[1])]
    return selected, torch.tensor(candidates)[choice]


@torch.no_grad()
def target_features(model, processor, sample: Sample, candidates: list[int], max_new_tokens: int = 64) -> dict:
    images = open_images(sample)
    text = chat_text(processor, sample.prompt, len(images))
    enc = processor(text=text, images=[images] if images else None, return_tensors="pt")
    # an answer never holds the image token (an untrained target can emit it; the forward below would then expect
    # image features for it)
    no_image = {"suppress_tokens": [int(model.config.image_token_id)]}
    if sample.answer is not None:  # generated beforehand, in a batch (greedy_answers)
        out = torch.cat([enc["input_ids"], torch.tensor([sample.answer], dtype=enc["input_ids"].dtype)], dim=1)
    elif sample.temperature > 0:
        torch.manual_seed(sample.seed)
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=True, temperature=sample.temperature,
                             top_p=0.95, top_k=0, **no_image)
    else:
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, **no_image)
    ids = out[:, :]                                                  # prompt + the target's own answer
    prompt_len = enc["input_ids"].shape[1]
    vision_inputs = {k: v for k, v in enc.items() if k not in ("input_ids", "attention_mask")}  # the family's own
    for k in ("token_type_ids", "mm_token_type_ids"):  # per prompt token (Gemma 3's image blocks): answer tokens are text
        if k in vision_inputs:
            v = vision_inputs[k]
            vision_inputs[k] = torch.cat([v, v.new_zeros(v.shape[0], ids.shape[1] - v.shape[1])], dim=1)
    fwd = model(input_ids=ids, **vision_inputs, output_hidden_states=True, output_attentions=True, return_dict=True)
    hs = fwd.hidden_states                                           # embeddings, then each layer (last one normed)
    embeds = model.get_input_embeddings()(ids)
    if enc.get("pixel_values") is not None:
        from ..targets import adapter_for

        img = adapter_for(model, processor).hf_image_features(**vision_inputs)
        slots = ids[0] == model.config.image_token_id
        embeds[0, slots] = img.reshape(-1, embeds.shape[-1]).to(embeds.dtype)
    mid, mid_layer = entropy_select(fwd.attentions, hs, candidates)
    received = fwd.attentions[-1][0].float().mean(dim=(0, 1))        # [S]
    return {
        "input_ids": ids[0].to(torch.int64),
        "prompt_len": torch.tensor([prompt_len]),
        "embeds": embeds[0].float(),
        "features": hs[-1][0].float(),
        "mid": mid.float(),
        "mid_layer": mid_layer.to(torch.int64),
        "received": received,
    }


def build_cache(model, processor, samples: list[Sample], out: Path, candidates: list[int], shard_size: int = 64,
                max_new_tokens: int = 64, fingerprint: dict | None = None, answer_batch: int = 32) -> list[Path]:
    """Write shards out/shard_XXXXX.safetensors; existing complete shards are kept (resume). ``fingerprint``
    (target, data, settings) is stored in out/cache.json: a folder made for anything else is refused, so
    several trainings (e.g. ablations) can share one cache without ever mixing targets or data.
    Greedy answers to a shard's text-only prompts are generated ``answer_batch`` at a time (``greedy_answers``);
    1 generates each alone."""
    from rich.progress import Progress
    from safetensors.torch import save_file

    from ..errors import DreamExportError

    out.mkdir(parents=True, exist_ok=True)
    stamp = {**(fingerprint or {}), "candidates": list(candidates), "max_new_tokens": max_new_tokens,
             "shard_size": shard_size, "samples": len(samples), "answer_batch": answer_batch}
    meta = out / "cache.json"
    if meta.is_file():
        have = json.loads(meta.read_text())
        if have != stamp:
            diff = sorted(k for k in set(have) | set(stamp) if have.get(k) != stamp.get(k))
            raise DreamExportError(f"{out}: feature cache was built for different settings ({', '.join(diff)}); "
                                   f"use another --features folder or delete this one")
    elif any(out.glob("shard_*.safetensors")):
        raise DreamExportError(f"{out}: shards without cache.json (an older or foreign cache); delete the folder")
    else:
        tmp_meta = meta.with_suffix(".json.tmp")
        tmp_meta.write_text(json.dumps(stamp))
        os.replace(tmp_meta, meta)
    model.set_attn_implementation("eager")
    shards = []
    n_shards = (len(samples) + shard_size - 1) // shard_size
    with Progress(transient=True) as progress:
        task = progress.add_task("self-distillation features", total=len(samples))
        for s in range(n_shards):
            path = out / f"shard_{s:05d}.safetensors"
            chunk = samples[s * shard_size:(s + 1) * shard_size]
            if not path.exists():
                chunk = _batch_answers(model, processor, chunk, max_new_tokens, answer_batch)
                tensors = {}
                for i, sample in enumerate(chunk):
                    for k, v in target_features(model, processor, sample, candidates, max_new_tokens).items():
                        tensors[f"{i}.{k}"] = v.contiguous()
                    progress.advance(task)
                tmp = path.with_suffix(".tmp")
                save_file(tensors, tmp, metadata={"count": str(len(chunk)), "candidates": json.dumps(candidates)})
                os.replace(tmp, path)
            else:
                progress.advance(task, len(chunk))
            shards.append(path)
    return shards


def _batch_answers(model, processor, chunk: list[Sample], max_new_tokens: int, batch: int) -> list[Sample]:
    """``chunk`` with the greedy answers of its text-only samples filled in, generated in batches."""
    from dataclasses import replace

    todo = [i for i, s in enumerate(chunk) if not s.images and s.temperature == 0 and s.answer is None]
    if batch <= 1 or len(todo) < 2:
        return chunk
    answers = greedy_answers(model, processor, [chunk[i].prompt for i in todo], max_new_tokens, batch,
                             suppress=[int(model.config.image_token_id)])
    chunk = list(chunk)
    for i, a in zip(todo, answers):
        chunk[i] = replace(chunk[i], answer=a)
    return chunk


def load_examples(shards: list[Path]) -> list[dict]:
    from safetensors import safe_open

    out = []
    for path in shards:
        with safe_open(path, "pt") as f:
            count = int(f.metadata()["count"])
            for i in range(count):
                out.append({k: f.get_tensor(f"{i}.{k}") for k in
                            ("input_ids", "prompt_len", "embeds", "features", "mid", "mid_layer", "received")})
    return out
