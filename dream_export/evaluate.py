"""``dream-eval``: exact-answer accuracy per question type on held-out synthetic scenes, through a bundle.

    dream-eval --bundle DIR [--scenes 200] [--seed 10000000] [--json] [--no-speculative]

Scenes come from seeds never used in training (``scenes.EVAL_SEED`` on; training uses seeds below 9,000,000). Answers are
produced by the torch-free runtime (greedy), exactly as dream-run produces them.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from .scenes import EVAL_SEED, QUESTION_TYPES, grade, scene_examples


# the held-out accuracy each built-in model's bundle must reach per question type (the report's "bar": need / got /
# ok), by the bundle's source model; a type without an entry ("where", for both) is reported but held to no bar
BARS = {
    "smolvlm-tiny": {"color": 0.9, "shape": 0.9, "yesno": 0.9, "count": 0.8, "color_count": 0.8, "caption": 0.7},
    "smolvlm-smollm2": {"color": 0.75, "shape": 0.75, "yesno": 0.75, "count": 0.5},
}
BAR = BARS["smolvlm-tiny"]


def evaluate_bundle(bundle, scenes: int = 200, seed: int = EVAL_SEED, speculative: bool | None = None,
                    max_new_tokens: int = 64, progress: bool = True, formats: tuple[str, ...] = ("png", "jpg")) -> dict:
    """Scenes are saved in turn in each of ``formats`` (PNG, JPEG quality 90) and read back from the file."""
    from runtime.pipeline import Pipeline

    pipe = Pipeline.from_bundle(bundle)
    hits = {t: [] for t in QUESTION_TYPES}
    accept = []
    t0 = time.perf_counter()
    tokens = 0
    examples = list(scene_examples(seed, scenes))
    iterator = examples
    if progress:
        from rich.progress import track

        iterator = track(examples, description="evaluating", transient=True)
    with tempfile.TemporaryDirectory() as tmp:
        n_types = len(QUESTION_TYPES)
        for i, (scene, qa) in enumerate(iterator):
            fmt = formats[(i // n_types) % len(formats)]
            path = Path(tmp) / f"scene{i // n_types}.{fmt}"
            if not path.exists():
                scene.render().save(path, **({"quality": 90} if fmt == "jpg" else {}))
            res = pipe.generate([str(path)], qa.prompt, max_new_tokens=max_new_tokens, speculative=speculative)
            hits[qa.qtype].append(grade(qa, scene, res.text))
            tokens += res.num_new_tokens
            if res.accept_lengths:
                accept += res.accept_lengths
    report = {t: round(sum(v) / len(v), 4) for t, v in hits.items() if v}
    return {
        "scenes": scenes,
        "seed": seed,
        "formats": list(formats),
        "accuracy": report,
        "bar": {t: {"need": need, "got": report.get(t), "ok": report.get(t, 0.0) >= need}
                for t, need in BARS.get((pipe.bundle.manifest.get("source") or {}).get("model"), {}).items()},
        "count": {t: len(v) for t, v in hits.items()},
        "mean_accept_length": round(sum(accept) / len(accept), 3) if accept else None,
        "tokens_per_s_overall": round(tokens / (time.perf_counter() - t0), 2),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="dream-eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--scenes", type=int, default=200)
    ap.add_argument("--seed", type=int, default=EVAL_SEED)
    ap.add_argument("--no-speculative", action="store_true")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    from runtime.errors import RuntimeErrorBase

    try:
        out = evaluate_bundle(args.bundle, args.scenes, args.seed, False if args.no_speculative else None)
    except RuntimeErrorBase as exc:
        print(f"dream-eval: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(out))
    else:
        print(f"{args.scenes} held-out scenes (seed {args.seed}), exact-answer accuracy:")
        for t, a in out["accuracy"].items():
            bar = out["bar"].get(t)
            mark = "" if bar is None else f"   bar {bar['need']:.0%}: {'ok' if bar['ok'] else 'BELOW'}"
            print(f"  {t:12s} {a:6.1%}  ({out['count'][t]}){mark}")
        if out["mean_accept_length"]:
            print(f"  mean acceptance length {out['mean_accept_length']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
