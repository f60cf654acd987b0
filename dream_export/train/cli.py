"""``dream-train``: self-distill the target, cache its features, train a DREAM drafter (thin CLI)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dream-train", description="Train a DREAM drafter for a target VLM.")
    p.add_argument("--model", required=True, help="target: alias, local folder or hub id (as dream-export)")
    p.add_argument("--data", required=True, help="JSONL of {image, prompt}, a LLaVA-style JSON, scenes:N, or "
                   "selfinstruct:N (N requests the target writes itself from its chat template, Magpie-style; "
                   "selfinstruct:N:openers begins them with common question and task openers)")
    p.add_argument("--out", type=Path, required=True, help="output folder (features/, checkpoint/, drafter/)")
    p.add_argument("--features", type=Path, help="feature cache folder (default OUT/features); trainings of the same "
                   "target and data may share one")
    t = p.add_argument_group("training")
    t.add_argument("--steps", type=int, default=2000)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--batch", type=int, default=8)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--keep-visual", type=float, default=0.75, help="fraction of image tokens the drafter sees")
    t.add_argument("--heldout", type=int, default=16, help="held-out samples for the acceptance estimate")
    t.add_argument("--max-new-tokens", type=int, default=64, help="length of the target's own answers")
    t.add_argument("--max-minutes", type=float, default=None, help="stop training after this long (resumable)")
    t.add_argument("--arch", choices=["dream", "concat"], default="dream",
                   help="dream (cross-attention fusion) or concat (EAGLE-style ablation, trained the same way)")
    t.add_argument("--init", type=Path, help="start from this drafter's weights (its folder or another dream-train "
                   "--out); the MLP width is taken from it")
    return p


def weights_digest(source) -> str | None:
    """sha256 over a local model folder's safetensors files (a retrained target must not reuse old features)."""
    from runtime.bundle import sha256_file

    folder = Path(source)
    if not folder.is_dir():
        return None
    return ",".join(f"{p.name}:{sha256_file(p)}" for p in sorted(folder.glob("*.safetensors")))


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from ..errors import DreamExportError

    try:
        import torch

        from ..drafter.config import DrafterConfig, drafter_folder
        from ..export.exporter import load_target
        from ..registry import resolve_model
        from .data import load_samples
        from .features import build_cache, load_examples
        from .trainer import TrainOptions, train_drafter

        torch.manual_seed(args.seed)
        source, _ = resolve_model(args.model)
        model, processor = load_target(source)
        if args.data.startswith("selfinstruct:"):
            from .data import Sample
            from .selfinstruct import OPENERS, cached_self_instructions

            parts = args.data.split(":")
            try:
                n = int(parts[1])
                if parts[2:] not in ([], ["openers"]):
                    raise ValueError(parts[2:])
            except ValueError as exc:
                raise DreamExportError(f"--data {args.data!r}: expected selfinstruct:N or selfinstruct:N:openers with N "
                                       "a number of requests") from exc
            samples = [Sample([], p) for p in cached_self_instructions(model, processor, n, args.seed,
                                                                       args.out / "selfinstruct.json",
                                                                       openers=OPENERS if parts[2:] else None)]
        else:
            samples = load_samples(args.data, seed=args.seed)
        if len(samples) <= args.heldout:
            raise DreamExportError(f"--data has {len(samples)} samples; expected more than --heldout {args.heldout}")
        width = {}
        if args.init is not None:
            args.init = drafter_folder(args.init)
            if not (args.init / "drafter_config.json").is_file():
                raise DreamExportError(f"--init {args.init}: expected a drafter folder (drafter_config.json, "
                                       "model.safetensors) or a dream-train --out folder holding one")
            width = {"intermediate_size": DrafterConfig.load(args.init).intermediate_size}
        cfg = DrafterConfig.for_target(model.config.text_config, keep_visual=args.keep_visual, arch=args.arch, **width)
        fingerprint = {"model": str(source), "data": args.data, "seed": args.seed, "weights": weights_digest(source)}
        shards = build_cache(model, processor, samples, args.features or args.out / "features", cfg.mid_layer_candidates,
                             max_new_tokens=args.max_new_tokens, fingerprint=fingerprint)
        examples = load_examples(shards)
        train, held = examples[: -args.heldout], examples[-args.heldout:]
        opts = TrainOptions(out=args.out, steps=args.steps, lr=args.lr, batch=args.batch, seed=args.seed,
                            keep_visual=args.keep_visual, max_minutes=args.max_minutes, init=args.init)
        final = train_drafter(model, train, held, opts, cfg)
        print(f"drafter written: {final}")
        if held:
            from ..drafter.model import DreamDrafter
            from .trainer import agreement

            a = agreement(DreamDrafter.load(final, model.lm_head.weight), held, model.config.image_token_id,
                          args.keep_visual)
            print(f"held-out agreement over {a['tokens']} answer tokens: top-1 {a['top1']:.3f}, top-4 {a['top4']:.3f}, "
                  f"in the draft vocabulary {a['in_vocab']:.3f}")
    except DreamExportError as exc:
        print(f"dream-train: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
