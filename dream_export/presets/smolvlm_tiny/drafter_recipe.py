"""Train the DREAM drafter that ships with ``smolvlm-tiny``, and the two ablations trained the same way.

    python -m dream_export.presets.smolvlm_tiny.drafter_recipe --out artifacts/tiny-drafters            # train (resumable)
    python -m dream_export.presets.smolvlm_tiny.drafter_recipe --out artifacts/tiny-drafters --ship     # copy DREAM into the package

One feature cache (the target's own greedy answers on ``scenes:N``, self-distilled once) feeds three
drafters with the same data, seed, steps and schedule:
  dream          cross-attention fusion, visual token compression keep 0.75 (the shipped one)
  concat         EAGLE-style input fusion instead of cross-attention (ablation 1)
  dream-keep1.0  DREAM without visual token compression (ablation 2)
Everything is the public ``dream-train`` machinery; this script only fixes the recipe so that it is one
command. The shipped weights are safetensors (< 10 MB); the tree written beside them is the one
``dream-export --tune`` picked on the machine they were trained on.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import torch

from ...drafter.model import DrafterConfig
from ...export.exporter import load_target
from ...train.cli import weights_digest
from ...train.data import load_samples
from ...train.features import build_cache, load_examples
from ...train.trainer import TrainOptions, train_drafter
from . import DRAFTER_DIR, ensure_smolvlm_tiny

RECIPE = {"data": "scenes:1600", "seed": 0, "steps": 4000, "lr": 2e-3, "batch": 8, "heldout": 24, "max_new_tokens": 64,
          "minutes": 12.0}  # the shipped drafter trains at most this long; the ablations then run exactly as many steps
VARIANTS = {"dream": ("dream", 0.75), "concat": ("concat", 0.75), "dream-keep1.0": ("dream", 1.0)}


def train_all(out: Path, variants=tuple(VARIANTS), steps: int | None = None) -> dict:
    torch.set_num_threads(2)
    source = str(ensure_smolvlm_tiny())
    model, processor = load_target(source)
    samples = load_samples(RECIPE["data"], seed=RECIPE["seed"])
    probe = DrafterConfig.for_target(model.config.text_config)
    t0 = time.time()
    fingerprint = {"model": source, "data": RECIPE["data"], "seed": RECIPE["seed"], "weights": weights_digest(source)}
    shards = build_cache(model, processor, samples, out / "features", probe.mid_layer_candidates,
                         max_new_tokens=RECIPE["max_new_tokens"], fingerprint=fingerprint)
    examples = load_examples(shards)
    train, held = examples[: -RECIPE["heldout"]], examples[-RECIPE["heldout"]:]
    report = {"features_min": round((time.time() - t0) / 60, 2), "variants": {}}
    reached = None
    for name in variants:
        arch, keep = VARIANTS[name]
        cfg = DrafterConfig.for_target(model.config.text_config, keep_visual=keep, arch=arch)
        # the first variant (DREAM) trains against the clock; the others stop at the step it reached, on the same schedule
        opts = TrainOptions(out=out / name, steps=steps or RECIPE["steps"], lr=RECIPE["lr"], batch=RECIPE["batch"],
                            seed=RECIPE["seed"], keep_visual=keep,
                            max_minutes=RECIPE["minutes"] if reached is None and not steps else None, stop_step=reached)
        t1 = time.time()
        final = train_drafter(model, train, held, opts, cfg)
        state = json.loads((final / "training.json").read_text())["state"]
        history = state["history"]
        reached = reached or state["step"]
        report["variants"][name] = {"minutes": round((time.time() - t1) / 60, 2), "steps": state["step"],
                                    "history": history, "drafter": str(final)}
        print(json.dumps({name: report["variants"][name]["minutes"], "heldout": history[-1] if history else None}), flush=True)
    (out / "report.json").write_text(json.dumps(report, indent=1))
    return report


def ship(out: Path, tree: dict | None) -> Path:
    """Copy out/dream/drafter into the package (temp folder, then rename), with the tree to export it with."""
    src = out / "dream" / "drafter"
    tmp = DRAFTER_DIR.with_name(DRAFTER_DIR.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    (tmp / "bundle_defaults.json").write_text(json.dumps({"tree": tree}, indent=1))
    shutil.rmtree(DRAFTER_DIR, ignore_errors=True)
    os.replace(tmp, DRAFTER_DIR)
    return DRAFTER_DIR


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("artifacts/tiny-drafters"))
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--steps", type=int, default=None, help=f"override the recipe's {RECIPE['steps']} steps")
    ap.add_argument("--ship", action="store_true", help="copy the trained DREAM drafter into dream_export/presets/smolvlm_tiny/drafter")
    ap.add_argument("--tree", default=None, help="N,D,K to record as the shipped default tree")
    args = ap.parse_args(argv)
    if args.ship:
        tree = None
        if args.tree:
            n, d, k = (int(x) for x in args.tree.split(","))
            tree = {"total_tokens": n, "depth": d, "top_k": k}
        print(f"shipped to {ship(args.out, tree)}")
        return
    train_all(args.out, args.variants, args.steps)


if __name__ == "__main__":
    main()
