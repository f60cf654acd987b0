"""Train the built-in ``smolvlm-tiny`` on synthetic scenes, on a CPU, resumably.

    python -m dream_export.presets.smolvlm_tiny.recipe --out artifacts/tiny-train            # from scratch (or resume)
    python -m dream_export.presets.smolvlm_tiny.recipe --out artifacts/tiny-train --ship     # copy the result into the package

Two stages, each moved on by held-out accuracy, never by the clock:
  A. vision: the SigLIP-style tower + connector learn the scene ground truth. Each image token predicts
     what its cell holds (a choice over empty + 12 colour/shape classes; a per-cell choice, not
     independent flags, so "all empty" is not a cheap optimum) and the global image predicts how many
     shapes of each class there are. White maps near 0 (image_mean 0.9), but not to exactly 0, which
     Idefics3 would treat as a padding image.
  B. language: the tower + connector are frozen (their image tokens are cached per scene) and the text
     model, embeddings and head learn the answers (loss on answer tokens only). One sequence per scene
     holds the image once and every question type as its own segment (each sees the image and itself:
     the loss of seven single-question prompts for ~1/3 of the tokens). Question types are weighted by
     how often they are still answered wrongly on held-out scenes.
Everything is seeded; checkpoints (safetensors weights, optimizer state, counters) are written every
``--ckpt-every`` steps and a rerun with the same --out resumes from the last one.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from runtime.preprocess import Idefics3Preprocessor

from ...scenes import HELDOUT_SEED, NUM_CLASSES, QUESTION_TYPES, random_scene
from ...targets import adapter_for
from ...train.scene_training import (ScenePool, evaluate_torch, log, question_weights, shared_prefix_batch, text_logits,
                                     vision_example, vision_tokens)
from . import MODEL_DIR
from .architecture import TinyVLMSpec, build_tiny_vlm

TRAIN_SEED = 1_000  # below scenes.HELDOUT_SEED, as every training seed


# The built-in model's shape: 12 thin text layers (SmolVLM-256M has 30 of 576), hidden 128, GQA 4/2.
TINY_SPEC = TinyVLMSpec(
    text_layers=12, hidden=128, heads=4, kv_heads=2, intermediate=384, max_positions=1024,
    vision_layers=4, vision_hidden=128, vision_heads=4, vision_intermediate=256,
    tile=64, patch=8, scale_factor=2, image_splitting=True, longest_edge=128,
    image_mean=(0.9, 0.9, 0.9), image_std=(0.45, 0.45, 0.45), seed=0,
)


@dataclass
class TrainConfig:
    out: str
    threads: int = 2
    # stage A
    a_batch_scenes: int = 24
    a_lr: float = 2e-3
    a_max_steps: int = 2500
    a_target_cell_acc: float = 0.95      # on non-empty cells, held out
    a_target_count_acc: float = 0.95
    a_eval_every: int = 100
    # stage B
    b_pool_scenes: int = 24000
    b_batch: int = 16                    # scenes per step; every question type of each (shared prefix)
    b_lr: float = 2e-3
    b_warmup: int = 100
    b_max_steps: int = 6000
    b_eval_every: int = 500
    b_eval_scenes: int = 30
    b_target: float = 0.97               # mean held-out exact accuracy that ends stage B early
    ckpt_every: int = 100
    max_hours: float = 2.0


# --- stage A: the tower learns the scenes' ground truth ------------------------------------------------

class VisionProbe(torch.nn.Module):
    """Heads on the connector's image tokens, used only while pretraining the tower."""

    def __init__(self, hidden: int):
        super().__init__()
        self.cell = torch.nn.Linear(hidden, NUM_CLASSES)
        self.count = torch.nn.Sequential(torch.nn.Linear(hidden, hidden), torch.nn.GELU(),
                                         torch.nn.Linear(hidden, (NUM_CLASSES - 1) * 5))

    def forward(self, tokens, global_index):
        cells = self.cell(tokens)                                   # [T, g*g, 13]
        pooled = tokens[global_index].mean(1)                       # [B, H]
        counts = self.count(pooled).view(-1, NUM_CLASSES - 1, 5)    # [B, 12, 0..4]
        return cells, counts


# --- checkpoints ------------------------------------------------------------------------------------

_RUN_START = [time.time(), 0.0]  # wall time this process started, elapsed seconds before it


def save_ckpt(out: Path, model, probe, opt, state: dict) -> None:
    from safetensors.torch import save_file

    state["elapsed_s"] = _RUN_START[1] + time.time() - _RUN_START[0]

    tmp = out / "ckpt.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp / "model.safetensors")
    if probe is not None:
        save_file(probe.state_dict(), tmp / "probe.safetensors")
    if opt is not None:
        torch.save(opt.state_dict(), tmp / "optim.pt")
    (tmp / "state.json").write_text(json.dumps(state))
    final = out / "ckpt"
    if final.exists():
        shutil.rmtree(out / "ckpt.old", ignore_errors=True)
        os.replace(final, out / "ckpt.old")
    os.replace(tmp, final)
    shutil.rmtree(out / "ckpt.old", ignore_errors=True)


def load_ckpt(out: Path, model, probe):
    from safetensors.torch import load_file

    ck = out / "ckpt"
    if not (ck / "state.json").is_file():
        return None, None
    model.load_state_dict(load_file(ck / "model.safetensors"), strict=True)
    if probe is not None and (ck / "probe.safetensors").exists():
        probe.load_state_dict(load_file(ck / "probe.safetensors"), strict=True)
    optim = torch.load(ck / "optim.pt", weights_only=True) if (ck / "optim.pt").exists() else None
    return json.loads((ck / "state.json").read_text()), optim


# --- the stages --------------------------------------------------------------------------------------

def stage_a(cfg: TrainConfig, model, pre, out: Path, state: dict, probe, optim_state, deadline: float):
    grid = TINY_SPEC.tile // TINY_SPEC.patch // TINY_SPEC.scale_factor
    params = list(model.model.vision_model.parameters()) + list(model.model.connector.parameters()) + list(probe.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.a_lr, weight_decay=0.01)
    if optim_state and state.get("stage") == "A":
        opt.load_state_dict(optim_state)
    rng = np.random.default_rng(TRAIN_SEED + state["a_step"])
    held = [vision_example(random_scene(np.random.default_rng(HELDOUT_SEED + i)), pre, grid) for i in range(64)]
    weights = torch.ones(NUM_CLASSES)
    weights[0] = 0.2  # most cells are empty: weight the positives up
    while state["a_step"] < cfg.a_max_steps and time.time() < deadline:
        model.train()
        ex = [vision_example(random_scene(rng), pre, grid) for _ in range(cfg.a_batch_scenes)]
        loss = _vision_loss(model, probe, ex, weights)[0]
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        state["a_step"] += 1
        if state["a_step"] % cfg.a_eval_every == 0:
            model.eval()
            with torch.no_grad():
                _, cell_acc, count_acc = _vision_loss(model, probe, held, weights)
            log(out, {"stage": "A", "step": state["a_step"], "loss": round(loss.item(), 4),
                      "cell_acc": round(cell_acc, 4), "count_acc": round(count_acc, 4)})
            state["a_metrics"] = {"cell_acc": cell_acc, "count_acc": count_acc}
            if cell_acc >= cfg.a_target_cell_acc and count_acc >= cfg.a_target_count_acc:
                break
        if state["a_step"] % cfg.ckpt_every == 0:
            save_ckpt(out, model, probe, opt, state)
    state["stage"] = "B"
    save_ckpt(out, model, probe, None, state)


def _vision_loss(model, probe, examples, weights):
    tiles = torch.from_numpy(np.concatenate([t for t, _, _ in examples]))
    cells = torch.from_numpy(np.concatenate([c for _, c, _ in examples]))
    counts = torch.from_numpy(np.stack([n for _, _, n in examples]))
    global_index = torch.tensor(np.cumsum([len(t) for t, _, _ in examples]) - 1)
    tokens = vision_tokens(model, tiles)
    cell_logits, count_logits = probe(tokens, global_index)
    loss = F.cross_entropy(cell_logits.reshape(-1, NUM_CLASSES), cells.reshape(-1), weight=weights)
    loss = loss + 0.5 * F.cross_entropy(count_logits.reshape(-1, 5), counts.clamp(max=4).reshape(-1))
    pos = cells > 0
    cell_acc = (cell_logits.argmax(-1)[pos] == cells[pos]).float().mean().item()
    count_acc = (count_logits.argmax(-1) == counts).all(-1).float().mean().item()
    return loss, cell_acc, count_acc


def stage_b(cfg: TrainConfig, model, processor, pre, out: Path, state: dict, optim_state, deadline: float):
    for p in list(model.model.vision_model.parameters()) + list(model.model.connector.parameters()):
        p.requires_grad_(False)
    pool = ScenePool(model, processor, pre, TRAIN_SEED + 7, cfg.b_pool_scenes, "caching image tokens")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.b_lr, betas=(0.9, 0.98), weight_decay=0.01)
    if optim_state and state.get("stage") == "B" and state["b_step"] > 0:
        opt.load_state_dict(optim_state)
    elif state["b_step"] > 0:
        state["b_warm_from"] = state["b_step"]  # resumed without optimizer moments: warm up again
    warm_from = state.get("b_warm_from", 0)
    sched = lambda s: min(1.0, (s - warm_from + 1) / cfg.b_warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s, cfg.b_max_steps) / cfg.b_max_steps)))  # noqa: E731
    eou = processor.tokenizer.convert_tokens_to_ids("<end_of_utterance>")
    image_token_id = model.config.image_token_id
    rng = np.random.default_rng(TRAIN_SEED + 11 + state["b_step"])
    acc = state.get("b_acc") or {t: 0.0 for t in QUESTION_TYPES}
    while state["b_step"] < cfg.b_max_steps and time.time() < deadline:
        model.train()
        weights = question_weights(acc)  # every question type of each scene, weighted by how often it is still wrong
        idx = rng.integers(len(pool.items), size=cfg.b_batch)
        seqs = [pool.sequence(int(i), rng, eou, weights) for i in idx]
        x, mask, pos, labels, wt = shared_prefix_batch(model, seqs, image_token_id)
        logits = text_logits(model, x, mask, pos)
        tok_loss = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="none")  # [B,L]
        loss = (tok_loss * wt).sum() / sum(w for _, _, segs in seqs for _, _, w in segs)
        for g in opt.param_groups:
            g["lr"] = cfg.b_lr * sched(state["b_step"])
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        state["b_step"] += 1
        if state["b_step"] % 25 == 0:
            log(out, {"stage": "B", "step": state["b_step"], "loss": round(loss.item(), 4)})
        if state["b_step"] % cfg.b_eval_every == 0:
            acc = evaluate_torch(model, processor, HELDOUT_SEED, cfg.b_eval_scenes)
            state["b_acc"] = acc
            log(out, {"stage": "B", "step": state["b_step"], "heldout_acc": {k: round(v, 3) for k, v in acc.items()}})
            if np.mean(list(acc.values())) >= cfg.b_target:
                save_ckpt(out, model, None, opt, state)
                break
        if state["b_step"] % cfg.ckpt_every == 0:
            save_ckpt(out, model, None, opt, state)
    state["stage"] = "done"
    save_ckpt(out, model, None, None, state)


def train(cfg: TrainConfig) -> Path:
    from transformers import AutoProcessor, Idefics3ForConditionalGeneration

    torch.set_num_threads(cfg.threads)
    torch.manual_seed(0)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    init = out / "init"
    if not (init / "config.json").exists():
        build_tiny_vlm(init, TINY_SPEC)
    model = Idefics3ForConditionalGeneration.from_pretrained(init).float()
    processor = AutoProcessor.from_pretrained(init)
    pre = Idefics3Preprocessor(adapter_for(model, processor).preprocessing())  # the manifest's own preprocessing
    probe = VisionProbe(TINY_SPEC.hidden)
    state, optim_state = load_ckpt(out, model, probe)
    state = state or {"stage": "A", "a_step": 0, "b_step": 0, "elapsed_s": 0.0, "config": asdict(cfg)}
    if state["stage"] == "done" and state["b_step"] < cfg.b_max_steps:
        state["stage"] = "B"  # a longer schedule was asked for: go on from the finished model
    state["config"] = asdict(cfg)
    _RUN_START[:] = [time.time(), state["elapsed_s"]]
    started = time.time() - state["elapsed_s"]
    deadline = started + cfg.max_hours * 3600
    log(out, {"event": "start", "stage": state["stage"], "a_step": state["a_step"], "b_step": state["b_step"]})

    def tick():
        state["elapsed_s"] = _RUN_START[1] + time.time() - _RUN_START[0]

    if state["stage"] == "A":
        stage_a(cfg, model, pre, out, state, probe, optim_state, deadline)
        tick()
        optim_state = None
    if state["stage"] == "B":
        stage_b(cfg, model, processor, pre, out, state, optim_state, deadline)
        tick()
    final = out / "final"
    shutil.rmtree(final, ignore_errors=True)
    model.save_pretrained(final)
    processor.save_pretrained(final)
    (final / "training.json").write_text(json.dumps({"state": state, "spec": asdict(TINY_SPEC)}, indent=1))
    log(out, {"event": "done", "elapsed_min": round(state["elapsed_s"] / 60, 1), "final": str(final)})
    return final


def ship(final: Path) -> Path:
    """Copy the trained model into the package, where ``smolvlm-tiny`` finds it."""
    tmp = MODEL_DIR.with_name(MODEL_DIR.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(final, tmp)
    shutil.rmtree(MODEL_DIR, ignore_errors=True)
    os.replace(tmp, MODEL_DIR)
    return MODEL_DIR


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="artifacts/tiny-train")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-hours", type=float, default=2.0)
    ap.add_argument("--b-max-steps", type=int, default=TrainConfig.b_max_steps)
    ap.add_argument("--ship", action="store_true", help="copy out/final into dream_export/presets/smolvlm_tiny/model")
    args = ap.parse_args(argv)
    if args.ship:
        print(f"shipped to {ship(Path(args.out) / 'final')}")
        return
    cfg = TrainConfig(out=args.out, threads=args.threads, max_hours=args.max_hours, b_max_steps=args.b_max_steps)
    train(cfg)


if __name__ == "__main__":
    main()
