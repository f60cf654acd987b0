"""How far a quantized bundle's greedy choices are from a reference bundle's, and what that precision buys in speed.

    python benchmarks/agreement.py --reference fp32=B32 --bundle "int4, head 4=B4" --bundle "int4, head 8=B48" \
        [--text 40] [--images 8] [--max-new-tokens 96] [--json out.json]

1. The reference bundle answers the held-out instructions (and scenes) greedily.
2. Every bundle reads each prompt followed by the reference's answer in one prefill (teacher forcing), and its top-1
   token at every answer position is compared with the reference's token there: the top-1 agreement. (A greedy
   answer of its own would stop agreeing after the first differing token; teacher forcing counts every position.)
3. Every bundle decodes the same prompts plainly, the bundles in turn on each prompt (in one process, one thread
   pool), for decode tokens/s after the first token.

The written ORT-CPU decoder of an int4/int8 bundle takes every token position in order, so its prefill over
prompt + answer computes each answer position as its plain decoding would (the row consistency its exactness rests
on). Not a test: nothing here asserts.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

from peers import prompts  # noqa: E402


def named(spec: str) -> tuple[str, Path]:
    name, _, path = spec.rpartition("=")
    if not name or not path:
        raise SystemExit(f"{spec!r}: expected NAME=BUNDLE_FOLDER")
    return name, Path(path)


def teacher_forced_top1(pipe, images, prompt: str, answer: list[int]) -> np.ndarray:
    """For each answer token, whether ``pipe``'s top-1 after the prompt and the answer's earlier tokens is that token."""
    from runtime.pipeline import Prepared

    prep = pipe.prepare(images, prompt)
    ids = np.concatenate([prep.input_ids, np.asarray(answer, np.int64)])
    embeds = pipe.prompt_embeds(Prepared(ids, prep.tiles, prep.images))
    dec = pipe.new_decoder()
    out = pipe.step(dec, embeds, ids, logits="all")
    start = len(prep.input_ids) - 1
    picks = out["logits"][0, start:start + len(answer)].argmax(-1)
    return picks == np.asarray(answer)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reference", required=True, help="NAME=BUNDLE: the bundle whose greedy answers are the reference")
    ap.add_argument("--bundle", action="append", required=True, help="NAME=BUNDLE (repeatable)")
    ap.add_argument("--text", type=int, default=40, help="held-out instructions")
    ap.add_argument("--images", type=int, default=8, help="held-out scenes")
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)

    from runtime.pipeline import Pipeline

    ref_name, ref_path = named(args.reference)
    bundles = [named(b) for b in args.bundle]
    with tempfile.TemporaryDirectory() as tmp:
        text, images = prompts(args.text, args.images, Path(tmp))
        items = [("text", imgs, p) for imgs, p in text] + [("images", imgs, p) for imgs, p in images]
        ref = Pipeline.from_bundle(ref_path, threads=args.threads)
        answers = [ref.generate(imgs, p, max_new_tokens=args.max_new_tokens, speculative=False).token_ids
                   for _, imgs, p in items]
        del ref
        pipes = {name: Pipeline.from_bundle(path, threads=args.threads) for name, path in bundles}
        agree = {name: {"text": [], "images": []} for name in pipes}
        rates = {name: {"text": [0, 0.0], "images": [0, 0.0]} for name in pipes}
        for i, ((kind, imgs, p), answer) in enumerate(zip(items, answers)):
            order = list(pipes) if i % 2 == 0 else list(pipes)[::-1]
            for name in order:
                pipe = pipes[name]
                agree[name][kind].append(teacher_forced_top1(pipe, imgs, p, answer))
                r = pipe.generate(imgs, p, max_new_tokens=args.max_new_tokens, speculative=False)
                rates[name][kind][0] += max(r.num_new_tokens - 1, 0)
                rates[name][kind][1] += r.decode_s
    rows = []
    for name in pipes:
        for kind in ("text", "images"):
            if not agree[name][kind]:
                continue
            flags = np.concatenate(agree[name][kind])
            n, s = rates[name][kind]
            rows.append({"bundle": name, "set": kind, "prompts": len(agree[name][kind]), "answer_tokens": int(flags.size),
                         "top1_agreement": round(float(flags.mean()), 4),
                         "plain_decode_tokens_per_s": round(n / s, 2) if s else 0.0})
    print(f"reference: {ref_name} ({ref_path}); greedy answers of at most {args.max_new_tokens} tokens; "
          f"{args.threads} threads; {time.strftime('%Y-%m-%d')}")
    print("| bundle | set | prompts | answer tokens | top-1 agreement with the reference | plain decode tok/s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['bundle']} | {r['set']} | {r['prompts']} | {r['answer_tokens']} | {r['top1_agreement']:.2%} | "
              f"{r['plain_decode_tokens_per_s']} |")
    if args.json:
        args.json.write_text(json.dumps({"reference": ref_name, "rows": rows, "max_new_tokens": args.max_new_tokens,
                                         "threads": args.threads}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
