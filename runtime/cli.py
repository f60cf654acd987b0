"""``dream-run IMAGE [IMAGE ...] PROMPT``: a thin CLI over ``runtime.Pipeline``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .bundle import find_latest_bundle
from .errors import RuntimeErrorBase
from .ort_threads import use_global_pool
from .pipeline import Pipeline
from .sampling import SamplingConfig
from .store import store_root


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dream-run", description="Answer a prompt, about image(s), a video or text only, with an exported bundle.")
    p.add_argument("inputs", nargs="+", metavar="[IMAGE|VIDEO ...] PROMPT",
                   help="image files, or video files (.mp4, .mov, .mkv, ...: models that take videos, e.g. SmolVLM2; "
                        "needs pip install av num2words), none for a text-only prompt; then the prompt")
    p.add_argument("--bundle", type=Path, help="bundle folder (default: the most recent bundle in the store)")
    gen = p.add_argument_group("generation")
    gen.add_argument("--max-new-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=None)
    spec = gen.add_mutually_exclusive_group()
    spec.add_argument("--no-speculative", action="store_true", help="plain decoding even when the bundle has a drafter")
    spec.add_argument("--speculative", action="store_true",
                      help="decode with the drafter even where the bundle records that it measured slower on this machine")
    gen.add_argument("--stop", action="append", default=None, metavar="TEXT",
                     help="end the answer before this text (repeatable); the stop text is not printed")
    gen.add_argument("--deadline-s", type=float, default=None, help="stop answering after this many seconds")
    gen.add_argument("--system", default=None, help="a system message")
    vis = p.add_argument_group("vision cost (the processor's options of the same names)")
    split = vis.add_mutually_exclusive_group()
    split.add_argument("--image-splitting", dest="image_splitting", action="store_true", default=None,
                       help="split large images into tiles plus a global view")
    split.add_argument("--no-image-splitting", dest="image_splitting", action="store_false",
                       help="one tile per image: less vision and prefill time, less detail")
    vis.add_argument("--longest-edge", type=int, default=None, help="resize so the longest edge is this many pixels")
    p.add_argument("--backend", default="auto", help="auto (ONNX Runtime's TensorRT provider, then its CUDA provider, then "
                   "our TensorRT backend, then the CPU: the pick is reported), ort-cpu, ort-cuda, ort-trt, trt")
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads")
    p.add_argument("--context", type=int, default=None, metavar="N",
                   help="context length in positions (default: the model's); K/V are preallocated for it, so a shorter "
                        "one saves memory (dream-build-engines --budget shows how much)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    *images, prompt = args.inputs
    try:
        SamplingConfig(args.temperature, args.top_p, args.seed)  # validate before loading anything
        bundle = args.bundle
        if bundle is None:
            bundle = find_latest_bundle(store_root())
            if bundle is None:
                raise RuntimeErrorBase(
                    f"no bundle in {store_root() / 'bundles'}; export one (dream-export --model smolvlm-tiny) or pass --bundle"
                )
            print(f"dream-run: using bundle {bundle}", file=sys.stderr)
        pipe = Pipeline.from_bundle(bundle, backend=args.backend, threads=args.threads, context=args.context)
        if pipe.backend.name != "ort-cpu":
            print(f"dream-run: backend {pipe.backend.name} ({pipe.backend.why})", file=sys.stderr)
        speculative = False if args.no_speculative else True if args.speculative else None
        if speculative is None and pipe.has_drafter and not pipe.speculative_for(bool(images)) and pipe.speculative_note:
            print(f"dream-run: {pipe.speculative_note}; decoding without the drafter (--speculative uses it)", file=sys.stderr)
        kwargs = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                      speculative=speculative, stop=args.stop, deadline_s=args.deadline_s, system=args.system,
                      image_splitting=args.image_splitting, longest_edge=args.longest_edge)
        if args.json:
            print(json.dumps({**pipe.generate(images, prompt, **kwargs).to_json(), "load_ms": round(pipe.load_ms, 3),
                              "backend": pipe.backend.name}))
        else:
            for event in pipe.stream(images, prompt, **kwargs):
                sys.stdout.write(event.text)
                sys.stdout.flush()
            sys.stdout.write("\n")
    except (RuntimeErrorBase, ValueError) as exc:
        print(f"dream-run: error: {exc}", file=sys.stderr)
        return 2
    return 0


def console() -> int:
    """The console command: this process owns all its ONNX Runtime sessions, so they share one thread pool."""
    use_global_pool()
    return main()


if __name__ == "__main__":
    sys.exit(console())
