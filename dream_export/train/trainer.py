"""dream-train: train a DREAM drafter on cached target features.

Losses (paper / reference code): SmoothL1(final draft feature, target last-layer feature) x 0.2,
the target distribution's cross-entropy against the draft distribution (KL up to a constant) x 1.0,
SmoothL1(block 0 output, entropy-selected intermediate target feature) x 0.2. Uniform noise on the
memory features (EAGLE). AdamW (0.9, 0.95), grad clipping, checkpoints + resume, a progress bar
with loss and held-out acceptance, seeded. Multi-GPU through ``accelerate launch`` (single process here).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..drafter.config import DrafterConfig, load_strict
from ..drafter.model import DreamDrafter, build_drafter, full_sequence_masks
from ..errors import DreamExportError


@dataclass
class TrainOptions:
    out: Path
    steps: int = 2000
    lr: float = 1e-3
    batch: int = 8
    noise: float = 0.2            # std of the uniform noise on memory features
    w_feature: float = 0.2
    w_kl: float = 1.0
    w_mid: float = 0.2
    grad_clip: float = 0.5
    warmup: int = 50
    eval_every: int = 200
    ckpt_every: int = 200
    seed: int = 0
    keep_visual: float = 0.75
    max_minutes: float | None = None
    prompt_loss: bool = False     # also learn at the prompt's text positions (the target's features are there too)
    stop_step: int | None = None  # stop here although the schedule runs to ``steps`` (ablations matched to a timed run)
    init: Path | None = None      # start from this drafter folder's weights (same architecture; its head is not
                                  # stored, so the draft vocabulary may differ), unless a checkpoint resumes


def keep_mask(ex: dict, image_token_id: int, keep: float) -> torch.Tensor:
    ids = ex["input_ids"]
    mask = torch.ones(len(ids), dtype=torch.bool)
    image = (ids == image_token_id).nonzero().squeeze(1)
    if keep < 1.0 and len(image):
        n_keep = math.ceil(keep * len(image))
        order = torch.argsort(-ex["received"][image], stable=True)
        mask[image[order[n_keep:]]] = False
    return mask


def sequence_loss(drafter: DreamDrafter, ex: dict, opts: TrainOptions, image_token_id: int, generator=None):
    """Losses and top-1 agreement on the answer positions of one cached sequence."""
    n = len(ex["input_ids"])
    keep = keep_mask(ex, image_token_id, opts.keep_visual)
    self_mask, cross_mask = full_sequence_masks(n, keep)
    memory = ex["features"][None]
    if opts.noise and drafter.training:
        a = opts.noise * math.sqrt(3.0)
        memory = memory + (torch.rand(memory.shape, generator=generator) * 2 - 1) * a
    out = drafter(ex["embeds"][None], torch.arange(n)[None], self_mask, memory, cross_mask, *drafter.empty_past())
    logits, feats, block0 = out[0][0], out[1][0], out[2][0]
    pos = torch.arange(int(ex["prompt_len"][0]), n)                # queries x_i of the answer predict f_i
    if opts.prompt_loss:  # and those of the prompt's text (its own features; image tokens and position 0 excluded)
        text = (ex["input_ids"] != image_token_id) & (torch.arange(n) > 0)
        pos = torch.nonzero(text).squeeze(1)
    target_logits = ex["features"][pos] @ drafter.lm_head_weight.T
    target_p = torch.softmax(target_logits, -1)
    logp = torch.log_softmax(logits[pos], -1)
    kl = -(target_p * logp).sum(-1).mean()
    feat = F.smooth_l1_loss(feats[pos], ex["features"][pos])
    mid = F.smooth_l1_loss(block0[pos], ex["mid"][pos])
    agree = (logits[pos].argmax(-1) == target_logits.argmax(-1)).float().mean()
    loss = opts.w_feature * feat + opts.w_kl * kl + opts.w_mid * mid
    return loss, {"kl": kl.item(), "feat": feat.item(), "mid": mid.item(), "acc1": agree.item()}


@torch.no_grad()
def chain_acceptance(drafter: DreamDrafter, examples: list[dict], image_token_id: int, keep: float, depth: int = 4,
                     max_starts: int = 12) -> float:
    """Mean tokens per target call of greedy chain drafting (depth ``depth``) on held-out sequences,
    the drafter appending its own features to memory as at run time."""
    drafter.eval()
    lengths = []
    for ex in examples:
        ids, n, p0 = ex["input_ids"], len(ex["input_ids"]), int(ex["prompt_len"][0])
        kept = keep_mask(ex, image_token_id, keep)
        # the answer is the target's own greedy output, so its next token after position i (i >= p0 - 1) is ids[i + 1]
        # (a target id, whatever the drafter's vocabulary)
        starts = list(range(p0, n - 1))[:max_starts]
        for i in starts:
            # context: real tokens x_0..x_i, real features f_0..f_{i-1}; draft x_{i+1}..
            toks = [int(t) for t in ids[: i + 1]]
            embeds = ex["embeds"][: i + 1]
            memory = ex["features"][:i]
            keepm = kept[: i + 1].clone()
            accepted = 0
            for d in range(depth):
                m = len(toks)
                sm, cm = full_sequence_masks(m, keepm)
                mem = torch.cat([memory, torch.zeros(1, memory.shape[1])]) if memory.shape[0] < m else memory
                out = drafter(embeds[None], torch.arange(m)[None], sm, mem[None, :m], cm, *drafter.empty_past())
                guess = int(out[0][0, -1].argmax())
                if drafter.config.draft_vocab:
                    guess = drafter.config.draft_vocab[guess]
                truth_pos = i + d
                if truth_pos >= n - 1 or guess != int(ids[truth_pos + 1]):
                    break
                accepted += 1
                toks.append(guess)
                embeds = torch.cat([embeds, ex["embeds"][truth_pos + 1: truth_pos + 2]])
                memory = torch.cat([memory, out[1][0, -1:]])
                keepm = torch.cat([keepm, torch.ones(1, dtype=torch.bool)])
            lengths.append(1 + accepted)
    return float(sum(lengths) / max(len(lengths), 1))


@torch.no_grad()
def agreement(drafter: DreamDrafter, examples: list[dict], image_token_id: int, keep: float, ks=(1, 4)) -> dict:
    """Teacher-forced agreement on the answers of ``examples``: how often the target's next token (the answer is
    its own greedy output) is the drafter's top-1 / among its top-k, with the target's real features as memory;
    and how often it is in the draft vocabulary at all. It bounds what any tree of that width accepts."""
    drafter.eval()
    d2t = torch.tensor(drafter.config.draft_vocab) if drafter.config.draft_vocab else None
    vocab = set(drafter.config.draft_vocab or [])
    hits = {k: 0 for k in ks}
    n = covered = 0
    for ex in examples:
        ids, p0 = ex["input_ids"], int(ex["prompt_len"][0])
        self_mask, cross_mask = full_sequence_masks(len(ids), keep_mask(ex, image_token_id, keep))
        out = drafter(ex["embeds"][None], torch.arange(len(ids))[None], self_mask, ex["features"][None], cross_mask,
                      *drafter.empty_past())
        top = out[0][0, p0 - 1: len(ids) - 1].topk(max(ks), dim=-1).indices
        if d2t is not None:
            top = d2t[top]
        truth = ids[p0:]
        for k in ks:
            hits[k] += int((top[:, :k] == truth[:, None]).any(-1).sum())
        n += len(truth)
        covered += len(truth) if d2t is None else sum(int(t) in vocab for t in truth)
    return {"tokens": n, **{f"top{k}": round(hits[k] / max(n, 1), 4) for k in ks}, "in_vocab": round(covered / max(n, 1), 4)}


def train_drafter(model, examples: list[dict], heldout: list[dict], opts: TrainOptions, cfg: DrafterConfig | None = None) -> Path:
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    try:
        from accelerate import Accelerator
    except ImportError:  # the single-process path needs nothing more
        Accelerator = None

    torch.manual_seed(opts.seed)
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    image_token_id = model.config.image_token_id
    cfg = cfg or DrafterConfig.for_target(model.config.text_config, keep_visual=opts.keep_visual)
    drafter = build_drafter(cfg, model.lm_head.weight)
    params = [p for p in drafter.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=opts.lr, betas=(0.9, 0.95), weight_decay=0.0)
    ckpt = out / "checkpoint"
    state = start_state(drafter, opt, ckpt, opts, cfg)
    accel = Accelerator() if Accelerator is not None else None
    if accel is not None:
        drafter, opt = accel.prepare(drafter, opt)
    raw = drafter.module if hasattr(drafter, "module") else drafter
    gen = torch.Generator().manual_seed(opts.seed + state["step"])
    started = time.time()
    end = min(opts.steps, opts.stop_step or opts.steps)
    with Progress(TextColumn("[bold]dream-train"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TextColumn("{task.fields[info]}"), TimeRemainingColumn(), transient=False) as progress:
        task = progress.add_task("train", total=opts.steps, completed=state["step"], info="")
        while state["step"] < end:
            if opts.max_minutes and (time.time() - started) > 60 * opts.max_minutes:
                break
            stats = train_step(raw, opt, params, examples, opts, state["step"], image_token_id, gen, accel)
            state["step"] += 1
            info = f"kl {stats['kl']:.3f} acc1 {stats['acc1']:.2f}"
            if heldout and (state["step"] % opts.eval_every == 0 or state["step"] == opts.steps):
                acc = chain_acceptance(raw, heldout, image_token_id, opts.keep_visual)
                state["history"].append({"step": state["step"], "heldout_accept_len": acc, **stats})
                info += f" | held-out accept len {acc:.2f}"
            progress.update(task, completed=state["step"], info=info)
            if state["step"] % opts.ckpt_every == 0 or state["step"] == end:
                _save_checkpoint(ckpt, raw, opt, state)
    if heldout and state["step"] and (not state["history"] or state["history"][-1]["step"] != state["step"]):
        # stopped by the clock or at stop_step: the held-out acceptance of what is saved
        state["history"].append({"step": state["step"], "heldout_accept_len": chain_acceptance(raw, heldout, image_token_id, opts.keep_visual)})
        _save_checkpoint(ckpt, raw, opt, state)
    return save_final(out, raw, opts, state)


def start_state(drafter, opt, ckpt: Path, opts: TrainOptions, cfg: DrafterConfig) -> dict:
    """The training state to go on from: OUT's checkpoint when there is one (weights and optimizer loaded), else
    step 0, from ``opts.init``'s weights when given."""
    from safetensors.torch import load_file

    if (ckpt / "state.json").exists():
        load_strict(drafter, load_file(ckpt / "model.safetensors"), str(ckpt))
        opt.load_state_dict(torch.load(ckpt / "optim.pt", weights_only=True))
        return json.loads((ckpt / "state.json").read_text())
    if opts.init is not None:
        init = Path(opts.init)
        have = DrafterConfig.load(init)
        if (have.arch, have.hidden_size, have.intermediate_size) != (cfg.arch, cfg.hidden_size, cfg.intermediate_size):
            raise DreamExportError(f"{init}: drafter {have.arch} {have.hidden_size}x{have.intermediate_size} cannot "
                                   f"start a {cfg.arch} {cfg.hidden_size}x{cfg.intermediate_size} one")
        load_strict(drafter, {k: v.float() for k, v in load_file(init / "model.safetensors").items()}, str(init))
    return {"step": 0, "history": []}


def train_step(drafter: DreamDrafter, opt, params: list, examples: list[dict], opts: TrainOptions, step: int,
               image_token_id: int, gen: torch.Generator, accel=None) -> dict:
    """One optimizer step over ``opts.batch`` examples drawn with ``gen`` (warm-up, then cosine decay to 10%); the
    batch's mean loss statistics."""
    drafter.train()
    lr = opts.lr * min(1.0, (step + 1) / opts.warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / opts.steps)))
    for g in opt.param_groups:
        g["lr"] = lr
    opt.zero_grad()
    stats = {}
    idx = torch.randint(len(examples), (opts.batch,), generator=gen)
    for i in idx.tolist():
        loss, st = sequence_loss(drafter, examples[i], opts, image_token_id, gen)
        loss = loss / opts.batch
        (accel.backward(loss) if accel is not None else loss.backward())
        for k, v in st.items():
            stats[k] = stats.get(k, 0.0) + v / opts.batch
    torch.nn.utils.clip_grad_norm_(params, opts.grad_clip)
    opt.step()
    return stats


def save_final(out: Path, drafter, opts: TrainOptions, state: dict) -> Path:
    """OUT/drafter: the drafter (``DreamDrafter.save``) and its training.json (options and state), replaced atomically."""
    final = out / "drafter"
    tmp = out / "drafter.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    drafter.save(tmp)
    (tmp / "training.json").write_text(json.dumps({"options": {k: str(v) for k, v in asdict(opts).items()}, "state": state}, indent=1))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return final


def _save_checkpoint(ckpt: Path, drafter, opt, state) -> None:
    from safetensors.torch import save_file

    tmp = ckpt.with_name(ckpt.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in drafter.state_dict().items()}, tmp / "model.safetensors")
    torch.save(opt.state_dict(), tmp / "optim.pt")
    (tmp / "state.json").write_text(json.dumps(state))
    shutil.rmtree(ckpt, ignore_errors=True)
    os.replace(tmp, ckpt)
