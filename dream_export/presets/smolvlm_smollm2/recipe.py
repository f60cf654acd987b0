"""Train the part of ``smolvlm-smollm2`` that ships: the connector and LoRA factors, on the synthetic scenes.

    python -m dream_export.presets.smolvlm_smollm2.recipe --out artifacts/smollm2-train          # train (or resume)
    python -m dream_export.presets.smolvlm_smollm2.recipe --out artifacts/smollm2-train --ship   # copy into the package

The model is assembled from the wheel's SmolLM2-135M-Instruct and the tiny scene tower (see the package
docstring). The tower and every base weight stay frozen; what learns:
- the connector (pixel shuffle -> 512 x 576 projection), first fitted in closed form (ridge regression)
  so that each image token lands near SmolLM2's embedding of the words for what its cell holds
  ("red circle", "white" for the background); then trained;
- LoRA factors (peft, rank 16, alpha 32) on q/k/v/o/gate/up/down of all 30 layers.
Data: one sequence per scene with the image once and every question type as its own segment over the
shared prefix (``train.scene_training.shared_prefix_batch``: the loss of seven single-question prompts), ChatML
prompts with SmolLM2's default system prompt, loss on answer tokens only (logits computed only there).
Question types are weighted by how often they are still wrong on held-out scenes. Seeded; each step's
data depends only on the step number, so a resumed run is the same run. Checkpoints every
``--ckpt-every`` steps; a rerun with the same ``--out`` resumes.
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
from safetensors.torch import load_file, save_file

from runtime.preprocess import Idefics3Preprocessor

from ...scenes import COLORS, HELDOUT_SEED, NUM_CLASSES, QUESTION_TYPES, SHAPES, class_index, random_scene
from ...targets import adapter_for
from ...train.scene_training import (ScenePool, evaluate_torch, log, question_weights, shared_prefix_batch, text_hidden,
                                     vision_example)
from . import ADAPTER, LORA_TARGETS, TRAINING, build_base, lora_names

TRAIN_SEED = 2_000  # below scenes.HELDOUT_SEED, as every training seed
TEXT_PROBES = ("What is the capital of France?", "Write one sentence about the sea.")


@dataclass
class RecipeConfig:
    out: str
    threads: int = 2
    pool_scenes: int = 6000
    batch: int = 8                 # scenes per step; each carries all 7 question types
    steps: int = 520
    lr_lora: float = 1e-3
    lr_connector: float = 1e-3
    warmup: int = 30
    lora_rank: int = 16
    lora_alpha: int = 32
    init_scenes: int = 300         # scenes for the closed-form connector fit
    eval_every: int = 80
    eval_scenes: int = 8
    ckpt_every: int = 25
    max_minutes: float = 90.0      # the whole run, pool and checks included; resumes count their earlier time
    seed: int = 0


def vision_features(model, tiles: torch.Tensor) -> torch.Tensor:
    """The frozen tower's output before the connector: [tiles, patches, vision_hidden]."""
    return model.model.vision_model(pixel_values=tiles).last_hidden_state


def connector_tokens(model, feats: torch.Tensor) -> torch.Tensor:
    """[tiles, patches, D] -> [tiles * image_seq_len, hidden] through the (trainable) connector."""
    return model.model.connector(feats.float()).reshape(-1, model.config.text_config.hidden_size)


# --- the connector's starting point ---------------------------------------------------------------

@torch.no_grad()
def fit_connector(model, tok, pre, scenes: int, seed: int, ridge: float = 1.0) -> dict:
    """Least squares from pixel-shuffled tower features to SmolLM2's embedding of each cell's class words."""
    emb = model.model.text_model.embed_tokens.weight

    def words(text):
        return emb[tok(text, add_special_tokens=False)["input_ids"]].mean(0)

    targets = torch.zeros(NUM_CLASSES, emb.shape[1])
    targets[0] = words(" white")
    for color in COLORS:
        for kind in SHAPES:
            targets[class_index(color, kind)] = words(f" {color} {kind}")
    conn = model.model.connector
    grid = int(math.isqrt(int(pre.cfg["image_seq_len"])))
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for _ in range(scenes):
        tiles, cells, _ = vision_example(random_scene(rng), pre, grid)
        x = conn.pixel_shuffle(vision_features(model, torch.from_numpy(tiles)), conn.scale_factor)
        xs.append(x.reshape(-1, x.shape[-1]))
        ys.append(targets[torch.from_numpy(cells).reshape(-1)])
    x, y = torch.cat(xs).double(), torch.cat(ys).double()
    w = torch.linalg.solve(x.T @ x + ridge * torch.eye(x.shape[1], dtype=x.dtype), x.T @ y)  # [512, 576]
    conn.modality_projection.proj.weight.copy_(w.T.float())
    fit = x @ w
    cos = F.cosine_similarity(fit, y, dim=1).mean().item()
    return {"tokens": int(x.shape[0]), "mean_cosine_to_target": round(cos, 4)}


# --- LoRA (peft) and what ships -------------------------------------------------------------------

def add_lora(model, rank: int, alpha: int) -> None:
    from peft import LoraConfig, inject_adapter_in_model

    cfg = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=list(LORA_TARGETS), bias="none")
    inject_adapter_in_model(cfg, model.model.text_model)


def trainable_state(model) -> dict[str, torch.Tensor]:
    """connector.* and lora.{layer}.A / .B (A [r, in], B [out, r]): the adapter file's tensors."""
    state = {f"connector.{k}": v for k, v in model.model.connector.state_dict().items()}
    modules = dict(model.model.text_model.named_modules())
    for name in lora_names(model):
        m = modules[name]
        state[f"lora.{name}.A"] = m.lora_A["default"].weight
        state[f"lora.{name}.B"] = m.lora_B["default"].weight
    return state


def load_trainable(model, tensors: dict[str, torch.Tensor]) -> None:
    own = trainable_state(model)
    if set(own) != set(tensors):
        raise RuntimeError(f"checkpoint tensors differ: missing {sorted(set(own) - set(tensors))[:3]}, "
                           f"unexpected {sorted(set(tensors) - set(own))[:3]}")
    with torch.no_grad():
        for k, v in own.items():
            v.copy_(tensors[k])


def save_adapter(model, path: Path, cfg: RecipeConfig, extra: dict) -> None:
    meta = {"lora_rank": str(cfg.lora_rank), "lora_alpha": str(cfg.lora_alpha), "format": "dream-export-lora-v1",
            **{k: json.dumps(v) for k, v in extra.items()}}
    tmp = path.with_suffix(".tmp")
    save_file({k: v.detach().to(torch.float16).contiguous() for k, v in trainable_state(model).items()}, tmp, metadata=meta)
    os.replace(tmp, path)


# --- loop ----------------------------------------------------------------------------------------

def answer_loss(model, x, mask, pos, labels, wt, total_weight: float) -> torch.Tensor:
    """HF's own layers over the shared-prefix mask; the norm and head only where an answer token is predicted."""
    h = text_hidden(model, x, mask, pos)
    sel = labels != -100
    logits = model.lm_head(model.model.text_model.norm(h[sel]))
    tok_loss = F.cross_entropy(logits, labels[sel], reduction="none")
    return (tok_loss * wt[sel]).sum() / total_weight


@torch.no_grad()
def text_probe(model, processor, max_new_tokens: int = 24) -> list[str]:
    answers = []
    for prompt in TEXT_PROBES:
        text = processor.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": prompt}]}],
                                             add_generation_prompt=True)
        enc = processor(text=text, return_tensors="pt")
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)
        answers.append(processor.tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True))
    return answers


class Run:
    """Where a training run stands: OUT, its state (step, elapsed time, held-out accuracy) and the wall clock, which
    a resumed run adds to the time its earlier processes took."""

    def __init__(self, out: Path):
        self.started = time.time()
        self.out = out
        self.state_file, self.ckpt = out / "state.json", out / "ckpt.safetensors"
        fresh = {"step": 0, "elapsed_s": 0.0}
        self.state = json.loads(self.state_file.read_text()) if self.state_file.is_file() and self.ckpt.is_file() else fresh
        self.elapsed_before = self.state["elapsed_s"]

    def elapsed(self) -> float:
        return self.elapsed_before + time.time() - self.started

    def checkpoint(self, model, opt) -> None:
        """The trainable tensors, the optimizer and the state, each replaced atomically."""
        out = self.out
        self.state["elapsed_s"] = self.elapsed()
        save_file({k: v.detach().contiguous() for k, v in trainable_state(model).items()}, out / "ckpt.tmp")
        torch.save(opt.state_dict(), out / "optim.tmp")
        os.replace(out / "ckpt.tmp", self.ckpt)
        os.replace(out / "optim.tmp", out / "optim.pt")
        (out / "state.tmp").write_text(json.dumps(self.state))
        os.replace(out / "state.tmp", self.state_file)


def prepare_model(cfg: RecipeConfig, run: Run):
    """The assembled base model with every base weight frozen, the connector fitted (on a fresh run) and LoRA added:
    (model, processor, preprocessor, connector parameters, LoRA parameters), the last two trainable."""
    model, processor = build_base()
    pre = Idefics3Preprocessor(adapter_for(model, processor).preprocessing())
    for p in model.parameters():
        p.requires_grad_(False)
    if run.state["step"] == 0:
        run.state["connector_fit"] = fit_connector(model, processor.tokenizer, pre, cfg.init_scenes, cfg.seed + 17)
        log(run.out, {"event": "connector fit", **run.state["connector_fit"]})
    add_lora(model, cfg.lora_rank, cfg.lora_alpha)
    for p in model.model.connector.parameters():
        p.requires_grad_(True)
    conn_params = list(model.model.connector.parameters())
    lora_params = [p for n, p in model.model.text_model.named_parameters() if "lora_" in n]
    for p in lora_params:
        p.requires_grad_(True)
    return model, processor, pre, conn_params, lora_params


def resume(run: Run, model, opt) -> None:
    """Load the last checkpoint's trainable tensors and optimizer state into a run past step 0."""
    load_trainable(model, load_file(run.ckpt))
    opt_file = run.out / "optim.pt"
    if opt_file.is_file():
        opt.load_state_dict(torch.load(opt_file, weights_only=True))
    log(run.out, {"event": "resume", "step": run.state["step"], "elapsed_min": round(run.elapsed_before / 60, 1)})


def lr_scale(cfg: RecipeConfig, step: int) -> float:
    """Linear warm-up, then cosine decay to 10% at ``cfg.steps``."""
    warm = min(1.0, (step + 1) / cfg.warmup)
    return warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(step, cfg.steps) / cfg.steps)))


def train_step(cfg: RecipeConfig, model, opt, pool: ScenePool, step: int, acc: dict, params: list) -> torch.Tensor:
    """One optimizer step on ``cfg.batch`` scenes, every question type of each; the data depends only on ``step``."""
    rng = np.random.default_rng(cfg.seed * 1_000_003 + TRAIN_SEED + step)
    model.train()
    weights = question_weights(acc)
    idx = rng.integers(len(pool.items), size=cfg.batch)
    eou = pool.tok.convert_tokens_to_ids("<|im_end|>")
    raw = [pool.sequence(int(i), rng, eou, weights) for i in idx]
    seqs = [(prefix, connector_tokens(model, feats), segs) for prefix, feats, segs in raw]
    x, mask, pos, labels, wt = shared_prefix_batch(model, seqs, model.config.image_token_id)
    total = sum(w for _, _, segs in seqs for _, _, w in segs)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # AVX512-BF16 matmuls: ~1.5x faster than fp32 here
        loss = answer_loss(model, x, mask, pos, labels, wt, total)
    for g, base in zip(opt.param_groups, (cfg.lr_connector, cfg.lr_lora)):
        g["lr"] = base * lr_scale(cfg, step)
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    return loss


def finish(cfg: RecipeConfig, run: Run, model, params: list) -> Path:
    """The last checkpoint, OUT/adapter.safetensors (what ships) and OUT/training.json (its record)."""
    state = run.state
    state["elapsed_s"] = run.elapsed()
    record = {"config": asdict(cfg), "steps": state["step"], "elapsed_min": round(state["elapsed_s"] / 60, 1),
              "heldout_acc_torch": state.get("acc"), "connector_fit": state.get("connector_fit"),
              "trainable_params": sum(p.numel() for p in params),
              "finished": state["step"] >= cfg.steps}
    save_adapter(model, run.out / "adapter.safetensors", cfg, {"steps": state["step"]})
    (run.out / "training.json").write_text(json.dumps(record, indent=1))
    log(run.out, {"event": "done", **{k: record[k] for k in ("steps", "elapsed_min", "finished")}})
    return run.out / "adapter.safetensors"


def train(cfg: RecipeConfig) -> Path:
    out = Path(cfg.out)
    run = Run(out)  # the clock starts here
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    out.mkdir(parents=True, exist_ok=True)
    model, processor, pre, conn_params, lora_params = prepare_model(cfg, run)
    params = conn_params + lora_params
    opt = torch.optim.AdamW([{"params": conn_params, "lr": cfg.lr_connector}, {"params": lora_params, "lr": cfg.lr_lora}],
                            betas=(0.9, 0.98), weight_decay=0.0)
    if run.state["step"] > 0:
        resume(run, model, opt)
    pool = ScenePool(model, processor, pre, TRAIN_SEED, cfg.pool_scenes, "caching tower features",
                     encode=vision_features, answer_prefix="", dtype=torch.float16)
    state = run.state
    acc = state.get("acc") or {t: 0.0 for t in QUESTION_TYPES}
    while state["step"] < cfg.steps and run.elapsed() < cfg.max_minutes * 60:
        loss = train_step(cfg, model, opt, pool, state["step"], acc, params)
        state["step"] += 1
        if state["step"] % 10 == 0:
            log(out, {"step": state["step"], "loss": round(loss.item(), 4), "elapsed_min": round(run.elapsed() / 60, 2)})
        if state["step"] % cfg.eval_every == 0 or state["step"] == cfg.steps:
            model.eval()
            acc = evaluate_torch(model, processor, HELDOUT_SEED, cfg.eval_scenes)
            state["acc"] = acc
            log(out, {"step": state["step"], "heldout_acc": {k: round(v, 3) for k, v in acc.items()},
                      "text": text_probe(model, processor)})
        if state["step"] % cfg.ckpt_every == 0:
            run.checkpoint(model, opt)
    run.checkpoint(model, opt)
    return finish(cfg, run, model, params)


def ship(out: Path) -> Path:
    """Copy the trained adapter and its record into the package, where ``smolvlm-smollm2`` finds them."""
    for src, dst in ((out / "adapter.safetensors", ADAPTER), (out / "training.json", TRAINING)):
        tmp = dst.with_name(dst.name + ".tmp")
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    return ADAPTER


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="artifacts/smollm2-train")
    ap.add_argument("--threads", type=int, default=RecipeConfig.threads)
    ap.add_argument("--steps", type=int, default=RecipeConfig.steps)
    ap.add_argument("--batch", type=int, default=RecipeConfig.batch)
    ap.add_argument("--pool-scenes", type=int, default=RecipeConfig.pool_scenes)
    ap.add_argument("--eval-every", type=int, default=RecipeConfig.eval_every)
    ap.add_argument("--max-minutes", type=float, default=RecipeConfig.max_minutes)
    ap.add_argument("--ship", action="store_true", help="copy OUT/adapter.safetensors into the package")
    args = ap.parse_args(argv)
    if args.ship:
        print(f"shipped to {ship(Path(args.out))}")
        return
    train(RecipeConfig(out=args.out, threads=args.threads, steps=args.steps, batch=args.batch,
                       pool_scenes=args.pool_scenes, eval_every=args.eval_every, max_minutes=args.max_minutes))


if __name__ == "__main__":
    main()
