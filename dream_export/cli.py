"""``dream-export``: a thin CLI over ``dream_export.export``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dream-export", description="Export a VLM (and DREAM drafter) to an ONNX bundle.")
    p.add_argument("--model", required=True, help="alias (smolvlm, smolvlm-500m, smolvlm-2b, smolvlm-tiny, smolvlm-smollm2), local folder, or hub id")
    p.add_argument("--out", type=Path, help="bundle folder (default: $DREAM_EXPORT_HOME/bundles/<name>)")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.add_argument("--seed", type=int, default=0, help="seed of the validation inputs")
    d = p.add_argument_group("DREAM drafter")
    d.add_argument("--drafter", type=Path, help="drafter folder written by dream-train (adds speculative decoding); "
                   "smolvlm-tiny uses its shipped trained drafter unless --no-drafter")
    d.add_argument("--no-drafter", action="store_true", help="export the target only")
    d.add_argument("--tree", type=_tree, help="draft tree N,D,K[,L]: total verified tokens, depth, top-k, and up to L of the N "
                   "copied from the context by prompt lookup (default 32,6,4; a shipped drafter's tuned tree)")
    d.add_argument("--tune", action="store_true",
                   help="measure verify/draft costs and acceptance on this machine and write the best tree to the manifest")
    d.add_argument("--tune-data", help="what --tune measures on (any dream-train --data source: JSONL, LLaVA JSON, "
                   "scenes:N); default: 4 synthetic scenes")
    d.add_argument("--tune-samples", type=int, default=6, help="how many --tune-data prompts --tune uses")
    d.add_argument("--draft-precision", choices=["fp32", "fp16", "int8", "int4"], default=None,
                   help="fp32/fp16: the draft graphs' precision (default: as --precision, FP16 for an INT8 target; "
                        "with --cpu-precision int8/int4: the same int8/int4); int8/int4: also write an ONNX-Runtime-CPU draft graph with weight-only int8/int4 MatMuls (the "
                        "TensorRT draft graphs stay float; greedy output is unchanged, acceptance may drop)")
    p.add_argument("--precision", choices=["fp32", "fp16", "int8"], default="fp32",
                   help="precision of the vision and decoder graphs for GPUs: fp16 keeps norms, softmax, the mask, "
                        "rotary and the LM head in FP32 inside the graph (TensorRT strongly typed); int8 = calibrated "
                        "QDQ MatMuls (calibration/)")
    p.add_argument("--calib-data", default="scenes:48", metavar="D",
                   help="--precision int8: calibration prompts, scenes:N or a JSONL / LLaVA file (as dream-train --data)")
    p.add_argument("--calib-samples", type=int, default=None, metavar="N", help="use the first N calibration prompts")
    p.add_argument("--cpu-precision", choices=["fp32", "int8", "int4"], default="fp32",
                   help="weights of the ONNX-Runtime-CPU decoder: int8/int4 = weight-only MatMulNBits, fp32 activations and LM head "
                        "(decoder.onnx, TensorRT's graph, stays fp32; greedy output then equals plain decoding at that precision)")
    p.add_argument("--head-bits", type=int, choices=[4, 8], default=None,
                   help="--cpu-precision int8/int4: the written ORT-CPU decoder's LM head (and token rows) width "
                        "(default: as --cpu-precision)")
    p.add_argument("--max-chains", type=int, default=None, metavar="C",
                   help="--cpu-precision int8/int4: most root-to-leaf chains one verify call holds (one graph per count "
                        "1..C; default: what a built-in model's drafter ships with for its tree, else 2)")
    p.add_argument("--gpu-graphs", action=argparse.BooleanOptionalAction, default=None,
                   help="also write the float decoder graphs TensorRT builds from (default: only with --cpu-precision "
                        "fp32; an int8/int4 CPU bundle is CPU-only and about 4-7x smaller without them)")
    d.add_argument("--keep-visual", type=float, help="fraction of image tokens the drafter keeps (1.0 disables compression)")
    p.add_argument("--quiet", action="store_true")
    return p


def _tree(text: str):
    from runtime.tree import TreeSpec

    try:
        return TreeSpec.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--{exc}") from exc


def tune_samples(data: str, count: int, tmp: Path) -> list:
    """(image paths, prompt) pairs for --tune from a dream-train --data source; in-memory images (scenes:N) are
    written into ``tmp``, which the tuner reads while it runs."""
    from .train.data import load_samples

    samples = load_samples(data)[:count]
    pairs = []
    for i, s in enumerate(samples):
        paths = []
        for j, im in enumerate(s.images):
            if hasattr(im, "save"):
                im.save(tmp / f"{i}_{j}.png")
                im = tmp / f"{i}_{j}.png"
            paths.append(str(im))
        pairs.append((paths, s.prompt))
    return pairs


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from .errors import DreamExportError  # the export side loads torch and transformers: --help answers without them

    try:
        export(args)
    except DreamExportError as exc:
        print(f"dream-export: error: {exc}", file=sys.stderr)
        return 2
    return 0


def export(args) -> None:
    """The command: resolve the model and its drafter, export (and calibrate), then tune if asked."""
    from runtime.store import bundles_dir

    from .errors import DreamExportError
    from .export.exporter import load_target
    from .registry import resolve_model

    source, name = resolve_model(args.model)
    out = args.out or bundles_dir() / name
    if out.exists() and not args.force:  # fail before the (slow) model load
        raise DreamExportError(f"{out}: output folder exists; pass --force to replace it")
    drafter, tree, runtime_cfg, max_chains = choose_drafter(args, source)
    model, processor = load_target(source)
    info = {"model": args.model, "resolved": source, "revision": getattr(model.config, "_commit_hash", None)}
    out.parent.mkdir(parents=True, exist_ok=True)
    write_bundle(args, model, processor, info, out, drafter, tree, runtime_cfg, max_chains)
    if args.tune:
        tune(args, out, model, processor, drafter)


def choose_drafter(args, source):
    """(drafter folder, tree, runtime defaults, most chains per verify): as asked, else what a built-in model ships
    with for the asked CPU precision."""
    from .drafter.config import drafter_folder
    from .errors import DreamExportError
    from .presets import shipped_defaults

    if args.no_drafter and args.drafter is not None:
        raise DreamExportError("--drafter and --no-drafter contradict each other; pass one")
    drafter, tree, runtime_cfg, max_chains = drafter_folder(args.drafter), args.tree, None, args.max_chains
    if drafter is not None and not any((drafter / f).is_file() for f in ("drafter_config.json", "config.json")):
        raise DreamExportError(f"--drafter {args.drafter}: no drafter_config.json (dream-train output, or its --out "
                               f"folder holding drafter/) or config.json (a released DREAM checkpoint)")
    if drafter is None and not args.no_drafter:
        shipped = shipped_defaults(source, args.cpu_precision)
        if shipped is not None:
            drafter, tree = shipped.folder, tree or shipped.tree
            if not args.tree:  # measured for the shipped tree only
                runtime_cfg, max_chains = shipped.runtime, max_chains or shipped.max_chains
    return drafter, tree, runtime_cfg, max_chains


def write_bundle(args, model, processor, info, out: Path, drafter, tree, runtime_cfg, max_chains) -> None:
    """Export the bundle; for --precision int8, export FP32 into a temp folder and calibrate it into ``out``."""
    import tempfile

    from .errors import DreamExportError
    from .export.exporter import ExportOptions, export_bundle

    int8 = args.precision == "int8"
    # the drafter's ORT-CPU graph: as asked, else (None) as the CPU target's weights (int8/int4), else float only
    draft_q = args.draft_precision if args.draft_precision in ("int8", "int4") else (
        None if args.draft_precision is None else "fp32")
    draft_float = args.draft_precision if args.draft_precision in ("fp32", "fp16") else "fp16" if int8 else None
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.fp32-", dir=out.parent) as fp32_tmp:
        target = Path(fp32_tmp) / "bundle" if int8 else out
        opts = ExportOptions(out=target, force=args.force, seed=args.seed, drafter=drafter, tree=tree,
                             keep_visual=args.keep_visual, draft_precision=draft_q, draft_float=draft_float,
                             runtime=runtime_cfg, cpu_precision=args.cpu_precision, head_bits=args.head_bits,
                             max_chains=max_chains or 2, gpu_graphs=args.gpu_graphs,
                             precision="fp32" if int8 else args.precision)
        export_bundle(model, processor, info, opts, quiet=args.quiet)
        if int8:  # INT8 graphs are calibrated by running the FP32 bundle on real prompts
            from calibration.int8 import CalibrationError, calibrate_bundle

            try:
                calibrate_bundle(target, out, args.calib_data, args.calib_samples, force=args.force)
            except CalibrationError as exc:
                raise DreamExportError(str(exc)) from exc
            print(f"dream-export: INT8 graphs calibrated on {args.calib_data}: {out}", file=sys.stderr)


def tune(args, out: Path, model, processor, drafter) -> None:
    """--tune: measure trees on this machine and write the fastest to the bundle."""
    import json
    import tempfile

    from .errors import DreamExportError
    from .export.exporter import set_draft_tree
    from .tuning import tune_bundle

    if drafter is None:
        raise DreamExportError("--tune needs --drafter: it picks the draft tree")
    with tempfile.TemporaryDirectory(prefix=".tune-", dir=out.parent) as tmp:
        samples = tune_samples(args.tune_data, args.tune_samples, Path(tmp)) if args.tune_data else None
        chosen = tune_bundle(out, set_tree=lambda tree: set_draft_tree(out, model, processor, drafter, tree),
                             samples=samples)
    tuning = json.loads((out / "manifest.json").read_text())["tuning"]
    print(f"dream-export: tuned tree N,D,K = {chosen['total_tokens']},{chosen['depth']},{chosen['top_k']}, "
          f"{tuning['threads']} ORT thread(s); measured decode speedup {tuning['measured_speedup']:.2f}x", file=sys.stderr)
    if not tuning["speculation_pays"]:
        print("dream-export: warning: on this machine speculative decoding measured slower than plain decoding; "
              "the bundle keeps the drafter (dream-run --no-speculative decodes without it)", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
