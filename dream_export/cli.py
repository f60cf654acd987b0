"""``dream-export``: a thin CLI over ``dream_export.export``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dream-export", description="Export a VLM (and DREAM drafter) to an ONNX bundle.")
    p.add_argument("--model", required=True, help="alias (smolvlm, smolvlm-500m, smolvlm-2b, smolvlm-tiny), local folder, or hub id")
    p.add_argument("--out", type=Path, help="bundle folder (default: $DREAM_EXPORT_HOME/bundles/<name>)")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.add_argument("--seed", type=int, default=0, help="seed of the validation inputs")
    p.add_argument("--quiet", action="store_true")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from .errors import DreamExportError

    try:
        from runtime.store import bundles_dir

        from .export.exporter import ExportOptions, export_bundle, load_target
        from .registry import resolve_model

        source, name = resolve_model(args.model)
        out = args.out or bundles_dir() / name
        if out.exists() and not args.force:  # fail before the (slow) model load
            raise DreamExportError(f"{out}: output folder exists; pass --force to replace it")
        model, processor = load_target(source)
        info = {"model": args.model, "resolved": source, "revision": getattr(model.config, "_commit_hash", None)}
        export_bundle(model, processor, info, ExportOptions(out=out, force=args.force, seed=args.seed), quiet=args.quiet)
    except DreamExportError as exc:
        print(f"dream-export: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
