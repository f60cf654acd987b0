"""``dream-bench``: speculative decoding speed on held-out scenes, per question type, in one process.

    dream-bench --bundle DREAM_BUNDLE [--model TARGET] [--ablation NAME=BUNDLE ...] [--scenes 30] [--out DIR]

Systems, all greedy on the same scenes and prompts, timed end to end (image file to last token):
transformers ``generate`` (if --model), the runtime without speculation, the runtime with the bundle's
drafter (DREAM), and each ablation bundle (e.g. an EAGLE-style concat drafter, or DREAM without visual
token compression). Prints a table of tokens/s, the ratio to the runtime without speculation, and the
mean acceptance length; writes bench.json and bench.png to --out. Nothing here is a test.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _scenes(count: int, seed: int):
    from .scenes import scene_examples

    return list(scene_examples(seed, count))


def run_runtime(bundle, examples, paths, speculative, max_new_tokens):
    from runtime.pipeline import Pipeline

    pipe = Pipeline.from_bundle(bundle)
    pipe.generate([paths[0]], examples[0][1].prompt, max_new_tokens=4, speculative=speculative)  # warm up
    per_type: dict = {}
    for (scene, qa), path in zip(examples, paths):
        t0 = time.perf_counter()
        res = pipe.generate([path], qa.prompt, max_new_tokens=max_new_tokens, speculative=speculative)
        dt = time.perf_counter() - t0
        row = per_type.setdefault(qa.qtype, {"tokens": 0, "seconds": 0.0, "accept": [], "ids": []})
        row["tokens"] += res.num_new_tokens
        row["seconds"] += dt
        row["accept"] += res.accept_lengths or []
        row["ids"].append(res.token_ids)
    return per_type


def run_transformers(model_dir, examples, paths, max_new_tokens):
    import torch
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(model_dir).eval()
    processor = AutoProcessor.from_pretrained(model_dir)
    per_type: dict = {}
    for i, ((scene, qa), path) in enumerate(zip(examples, paths)):
        t0 = time.perf_counter()
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": qa.prompt}]}]
        text = processor.apply_chat_template(messages, add_generation_prompt=True)
        enc = processor(text=text, images=[[Image.open(path)]], return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)
        dt = time.perf_counter() - t0
        if i == 0:  # first call pays one-time costs: time it again
            t0 = time.perf_counter()
            with torch.no_grad():
                out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)
            dt = time.perf_counter() - t0
        row = per_type.setdefault(qa.qtype, {"tokens": 0, "seconds": 0.0, "accept": [], "ids": []})
        row["tokens"] += out.shape[1] - enc["input_ids"].shape[1]
        row["seconds"] += dt
    return per_type


def summarize(results: dict) -> dict:
    base = results["runtime, no speculation"]
    table = {}
    for system, per_type in results.items():
        rows = {}
        for qtype, r in list(per_type.items()) + [("all", _total(per_type))]:
            b = base[qtype] if qtype in base else _total(base)
            tps = r["tokens"] / r["seconds"] if r["seconds"] else 0.0
            btps = b["tokens"] / b["seconds"] if b["seconds"] else 0.0
            rows[qtype] = {"tokens_per_s": round(tps, 1), "vs_no_speculation": round(tps / btps, 3) if btps else None,
                           "mean_accept_length": round(float(np.mean(r["accept"])), 3) if r["accept"] else None}
        table[system] = rows
    return table


def _total(per_type):
    return {"tokens": sum(r["tokens"] for r in per_type.values()), "seconds": sum(r["seconds"] for r in per_type.values()),
            "accept": [a for r in per_type.values() for a in r["accept"]], "ids": []}


def plot(table: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    systems = list(table)
    qtypes = list(next(iter(table.values())))
    x = np.arange(len(qtypes))
    w = 0.8 / len(systems)
    fig, ax = plt.subplots(figsize=(1.3 * len(qtypes) + 3, 4))
    for i, s in enumerate(systems):
        ax.bar(x + i * w, [table[s][q]["tokens_per_s"] for q in qtypes], w, label=s)
    ax.set_xticks(x + w * (len(systems) - 1) / 2, qtypes)
    ax.set_ylabel("tokens / s (end to end)")
    ax.set_title("Greedy decoding speed per question type")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="dream-bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, required=True, help="bundle with the DREAM drafter")
    ap.add_argument("--model", help="target model folder for the transformers baseline")
    ap.add_argument("--ablation", action="append", default=[], metavar="NAME=BUNDLE")
    ap.add_argument("--scenes", type=int, default=30)
    ap.add_argument("--seed", type=int, default=30_000_000)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--out", type=Path, default=Path("bench-results"))
    args = ap.parse_args(argv)
    examples = _scenes(args.scenes, args.seed)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for i, (scene, _) in enumerate(examples):
            p = Path(tmp) / f"s{i}.png"
            scene.render().save(p)
            paths.append(str(p))
        if args.model:
            from .registry import resolve_model

            results["transformers generate"] = run_transformers(resolve_model(args.model)[0], examples, paths, args.max_new_tokens)
        results["runtime, no speculation"] = run_runtime(args.bundle, examples, paths, False, args.max_new_tokens)
        results["DREAM"] = run_runtime(args.bundle, examples, paths, True, args.max_new_tokens)
        for item in args.ablation:
            name, _, bundle = item.partition("=")
            results[name] = run_runtime(Path(bundle), examples, paths, True, args.max_new_tokens)
    # losslessness, checked on the fly: every speculative system's ids equal plain decoding's
    plain = [ids for r in results["runtime, no speculation"].values() for ids in r["ids"]]
    for name, per_type in results.items():
        ids = [i for r in per_type.values() for i in r["ids"]]
        if ids and ids != plain:
            print(f"dream-bench: WARNING: {name} produced different tokens than plain decoding", file=sys.stderr)
    table = summarize(results)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench.json").write_text(json.dumps(table, indent=1))
    plot(table, args.out / "bench.png")
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"{args.scenes} held-out scenes x 7 question types, greedy, max {args.max_new_tokens} new tokens")
    t.add_column("question type")
    for s in table:
        t.add_column(s, justify="right")
    for q in next(iter(table.values())):
        cells = []
        for s in table:
            r = table[s][q]
            acc = f" (τ {r['mean_accept_length']:.2f})" if r["mean_accept_length"] else ""
            cells.append(f"{r['tokens_per_s']:.0f} tok/s {r['vs_no_speculation']:.2f}x{acc}")
        t.add_row(q, *cells)
    Console().print(t)
    print(f"wrote {args.out / 'bench.json'} and {args.out / 'bench.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
