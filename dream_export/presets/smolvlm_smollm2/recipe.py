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
shared prefix (``train_tiny.shared_prefix_batch``: the loss of seven single-question prompts), ChatML
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

from . import ADAPTER, LORA_TARGETS, TRAINING, build_base, lora_names

TRAIN_SEED, HELDOUT_SEED = 2_000, 9_000_000   # evaluation seeds (dream-eval) start at 10,000_000
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
    from ...scenes import COLORS, SHAPES, random_scene
    from ...train_tiny import NUM_CLASSES, class_index, vision_example

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
    from safetensors.torch import save_file

    meta = {"lora_rank": str(cfg.lora_rank), "lora_alpha": str(cfg.lora_alpha), "format": "dream-export-lora-v1",
            **{k: json.dumps(v) for k, v in extra.items()}}
    tmp = path.with_suffix(".tmp")
    save_file({k: v.detach().to(torch.float16).contiguous() for k, v in trainable_state(model).items()}, tmp, metadata=meta)
    os.replace(tmp, path)


# --- loop ----------------------------------------------------------------------------------------

def answer_loss(model, x, mask, pos, labels, wt, total_weight: float) -> torch.Tensor:
    """HF's own layers over the shared-prefix mask; the norm and head only where an answer token is predicted."""
    tm = model.model.text_model
    position_embeddings = tm.rotary_emb(x, pos)
    h = x
    for layer in tm.layers:
        h = layer(h, attention_mask=mask, position_ids=pos, position_embeddings=position_embeddings)
        h = h[0] if isinstance(h, tuple) else h
    sel = labels != -100
    logits = model.lm_head(tm.norm(h[sel]))
    tok_loss = F.cross_entropy(logits, labels[sel], reduction="none")
    return (tok_loss * wt[sel]).sum() / total_weight


def log(out: Path, record: dict) -> None:
    record = {"time": time.strftime("%H:%M:%S"), **record}
    print(json.dumps(record), flush=True)
    with open(out / "log.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


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


def train(cfg: RecipeConfig) -> Path:
    from runtime.preprocess import Idefics3Preprocessor

    from ...scenes import QUESTION_TYPES
    from ...targets import adapter_for
    from ...train_tiny import ScenePool, evaluate_torch, shared_prefix_batch

    t_start = time.time()
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    state_file, ckpt = out / "state.json", out / "ckpt.safetensors"
    state = json.loads(state_file.read_text()) if state_file.is_file() and ckpt.is_file() else {"step": 0, "elapsed_s": 0.0}
    elapsed_before = state["elapsed_s"]

    def elapsed() -> float:
        return elapsed_before + time.time() - t_start

    model, processor = build_base()
    tok = processor.tokenizer
    pre = Idefics3Preprocessor(adapter_for(model, processor).preprocessing())
    for p in model.parameters():
        p.requires_grad_(False)
    if state["step"] == 0:
        state["connector_fit"] = fit_connector(model, tok, pre, cfg.init_scenes, cfg.seed + 17)
        log(out, {"event": "connector fit", **state["connector_fit"]})
    add_lora(model, cfg.lora_rank, cfg.lora_alpha)
    for p in model.model.connector.parameters():
        p.requires_grad_(True)
    conn_params = list(model.model.connector.parameters())
    lora_params = [p for n, p in model.model.text_model.named_parameters() if "lora_" in n]
    for p in lora_params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW([{"params": conn_params, "lr": cfg.lr_connector}, {"params": lora_params, "lr": cfg.lr_lora}],
                            betas=(0.9, 0.98), weight_decay=0.0)
    base_lrs = [cfg.lr_connector, cfg.lr_lora]
    if state["step"] > 0:
        from safetensors.torch import load_file

        load_trainable(model, load_file(ckpt))
        opt_file = out / "optim.pt"
        if opt_file.is_file():
            opt.load_state_dict(torch.load(opt_file, weights_only=True))
        log(out, {"event": "resume", "step": state["step"], "elapsed_min": round(elapsed_before / 60, 1)})

    pool = ScenePool(model, processor, pre, TRAIN_SEED, cfg.pool_scenes, "caching tower features",
                     encode=vision_features, answer_prefix="", dtype=torch.float16)
    eou = tok.convert_tokens_to_ids("<|im_end|>")
    image_token_id = model.config.image_token_id
    acc = state.get("acc") or {t: 0.0 for t in QUESTION_TYPES}

    def lr_scale(step: int) -> float:
        warm = min(1.0, (step + 1) / cfg.warmup)
        return warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(step, cfg.steps) / cfg.steps)))

    def checkpoint():
        from safetensors.torch import save_file

        state["elapsed_s"] = elapsed()
        save_file({k: v.detach().contiguous() for k, v in trainable_state(model).items()}, out / "ckpt.tmp")
        torch.save(opt.state_dict(), out / "optim.tmp")
        os.replace(out / "ckpt.tmp", ckpt)
        os.replace(out / "optim.tmp", out / "optim.pt")
        (out / "state.tmp").write_text(json.dumps(state))
        os.replace(out / "state.tmp", state_file)

    deadline_s = cfg.max_minutes * 60
    while state["step"] < cfg.steps and elapsed() < deadline_s:
        step = state["step"]
        rng = np.random.default_rng(cfg.seed * 1_000_003 + TRAIN_SEED + step)
        model.train()
        need = {t: 1.0 - acc.get(t, 0.0) + 0.3 for t in QUESTION_TYPES}
        mean_need = sum(need.values()) / len(need)
        weights = {t: v / mean_need for t, v in need.items()}
        idx = rng.integers(len(pool.items), size=cfg.batch)
        raw = [pool.sequence(int(i), rng, eou, weights) for i in idx]
        seqs = [(prefix, connector_tokens(model, feats), segs) for prefix, feats, segs in raw]
        x, mask, pos, labels, wt = shared_prefix_batch(model, seqs, image_token_id)
        total = sum(w for _, _, segs in seqs for _, _, w in segs)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # AVX512-BF16 matmuls: ~1.5x faster than fp32 here
            loss = answer_loss(model, x, mask, pos, labels, wt, total)
        for g, base in zip(opt.param_groups, base_lrs):
            g["lr"] = base * lr_scale(step)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(conn_params + lora_params, 1.0)
        opt.step()
        state["step"] = step + 1
        if state["step"] % 10 == 0:
            log(out, {"step": state["step"], "loss": round(loss.item(), 4), "elapsed_min": round(elapsed() / 60, 2)})
        if state["step"] % cfg.eval_every == 0 or state["step"] == cfg.steps:
            model.eval()
            acc = evaluate_torch(model, processor, HELDOUT_SEED, cfg.eval_scenes)
            state["acc"] = acc
            log(out, {"step": state["step"], "heldout_acc": {k: round(v, 3) for k, v in acc.items()},
                      "text": text_probe(model, processor)})
        if state["step"] % cfg.ckpt_every == 0:
            checkpoint()
    checkpoint()
    state["elapsed_s"] = elapsed()
    record = {"config": asdict(cfg), "steps": state["step"], "elapsed_min": round(state["elapsed_s"] / 60, 1),
              "heldout_acc_torch": state.get("acc"), "connector_fit": state.get("connector_fit"),
              "trainable_params": sum(p.numel() for p in conn_params + lora_params),
              "finished": state["step"] >= cfg.steps}
    save_adapter(model, out / "adapter.safetensors", cfg, {"steps": state["step"]})
    (out / "training.json").write_text(json.dumps(record, indent=1))
    log(out, {"event": "done", **{k: record[k] for k in ("steps", "elapsed_min", "finished")}})
    return out / "adapter.safetensors"


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
