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

from .scenes import CHECK_SEED, scene_examples


def _scenes(count: int, seed: int):
    return list(scene_examples(seed, count))


def run_runtime(bundle, examples, paths, speculative, max_new_tokens, threads=None, repeats: int = 1, tree=None):
    """Per question type: tokens, end-to-end seconds (image file to last token), decode-phase seconds (first
    token to last: drafting, verifying and all bookkeeping; prefill excluded). The fastest of ``repeats``
    passes over all examples is kept (the machine's timing noise is one-sided)."""
    from runtime.pipeline import Pipeline

    pipe = Pipeline.from_bundle(bundle, threads=threads)
    pipe.tree_spec = tree
    pipe.generate([paths[0]], examples[0][1].prompt, max_new_tokens=4, speculative=speculative)  # warm up
    best = None
    for _ in range(repeats):
        per_type: dict = {}
        for (scene, qa), path in zip(examples, paths):
            t0 = time.perf_counter()
            res = pipe.generate([path], qa.prompt, max_new_tokens=max_new_tokens, speculative=speculative)
            dt = time.perf_counter() - t0
            row = per_type.setdefault(qa.qtype, _row())
            row["tokens"] += res.num_new_tokens
            row["seconds"] += dt
            row["decode_tokens"] += res.num_new_tokens - 1
            row["decode_seconds"] += res.decode_s
            row["accept"] += res.accept_lengths or []
            row["ids"].append(res.token_ids)
        if best is None or _total(per_type)["seconds"] < _total(best)["seconds"]:
            best = per_type
    return best


def _row():
    return {"tokens": 0, "seconds": 0.0, "decode_tokens": 0, "decode_seconds": 0.0, "accept": [], "ids": []}


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
        row = per_type.setdefault(qa.qtype, _row())
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
            dtps = r["decode_tokens"] / r["decode_seconds"] if r["decode_seconds"] else None
            bdtps = b["decode_tokens"] / b["decode_seconds"] if b["decode_seconds"] else None
            rows[qtype] = {"tokens_per_s": round(tps, 1), "vs_no_speculation": round(tps / btps, 3) if btps else None,
                           "decode_tokens_per_s": round(dtps, 1) if dtps else None,
                           "decode_vs_no_speculation": round(dtps / bdtps, 3) if dtps and bdtps else None,
                           "mean_accept_length": round(float(np.mean(r["accept"])), 3) if r["accept"] else None}
            if system == "runtime, no speculation" and r["seconds"]:
                # Amdahl: image, vision and prefill are the same with or without a drafter, so even free
                # decoding gives at most 1 / (1 - decode share) end to end
                share = r["decode_seconds"] / r["seconds"]
                rows[qtype]["decode_share"] = round(share, 3)
                rows[qtype]["end_to_end_ceiling"] = round(1.0 / (1.0 - share), 2) if share < 1 else None
        table[system] = rows
    return table


def _total(per_type):
    total = _row()
    for r in per_type.values():
        for k in ("tokens", "seconds", "decode_tokens", "decode_seconds", "accept"):
            total[k] += r[k]
    return total


def plot(table: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    systems = list(table)
    qtypes = list(next(iter(table.values())))
    x = np.arange(len(qtypes))
    w = 0.8 / len(systems)
    fig, axes = plt.subplots(1, 2, figsize=(2.4 * len(qtypes) + 4, 4.2))
    for ax, key, title in ((axes[0], "tokens_per_s", "end to end (image file to last token)"),
                           (axes[1], "decode_tokens_per_s", "decode phase (after the first token)")):
        for i, s in enumerate(systems):
            ax.bar(x + i * w, [table[s][q][key] or 0.0 for q in qtypes], w, label=s)
        ax.set_xticks(x + w * (len(systems) - 1) / 2, qtypes, rotation=30)
        ax.set_ylabel("tokens / s")
        ax.set_title(title)
    axes[0].legend(fontsize=8)
    fig.suptitle("Greedy decoding speed per question type")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="dream-bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, required=True, help="bundle with the DREAM drafter")
    ap.add_argument("--model", help="target model folder for the transformers baseline")
    ap.add_argument("--ablation", action="append", default=[], metavar="NAME=BUNDLE")
    ap.add_argument("--scenes", type=int, default=30)
    ap.add_argument("--seed", type=int, default=CHECK_SEED)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--out", type=Path, default=Path("bench-results"))
    ap.add_argument("--threads", type=int, help="ORT threads for every system (default: the DREAM bundle's tuned value)")
    ap.add_argument("--repeats", type=int, default=2, help="passes per system; the fastest is kept")
    ap.add_argument("--tree", help="N,D,K[,L] for every speculative system (default: each bundle's own tree)")
    args = ap.parse_args(argv)
    if args.threads is None:
        manifest = json.loads((args.bundle / "manifest.json").read_text())
        args.threads = (manifest.get("runtime") or {}).get("threads")
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
        tree = None
        if args.tree:
            from runtime.tree import TreeSpec

            try:
                tree = TreeSpec.parse(args.tree)
            except ValueError as exc:
                raise SystemExit(f"dream-bench: --{exc}") from exc
        run = lambda bundle, spec: run_runtime(bundle, examples, paths, spec, args.max_new_tokens, args.threads,  # noqa: E731
                                               args.repeats, tree)
        results["runtime, no speculation"] = run(args.bundle, False)
        results["DREAM"] = run(args.bundle, True)
        for item in args.ablation:
            name, _, bundle = item.partition("=")
            results[name] = run(Path(bundle), True)
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

    t = Table(title=f"{args.scenes} held-out scenes x 7 question types, greedy, max {args.max_new_tokens} new tokens, "
                    f"{args.threads or 'default'} ORT thread(s). Cells: end-to-end tok/s (ratio) | decode-phase ratio | τ")
    t.add_column("question type")
    for s in table:
        t.add_column(s, justify="right")
    for q in next(iter(table.values())):
        cells = []
        for s in table:
            r = table[s][q]
            dec = f" | {r['decode_vs_no_speculation']:.2f}x" if r["decode_vs_no_speculation"] else ""
            acc = f" | τ {r['mean_accept_length']:.2f}" if r["mean_accept_length"] else ""
            cells.append(f"{r['tokens_per_s']:.0f} ({r['vs_no_speculation']:.2f}x){dec}{acc}")
        t.add_row(q, *cells)
    Console().print(t)
    base = table["runtime, no speculation"]["all"]
    if base.get("decode_share") is not None:
        print(f"without speculation {base['decode_share']:.0%} of the end-to-end time is the decode phase (the rest is "
              f"image, vision and prefill, the same for every system): even free decoding would be at most "
              f"{base['end_to_end_ceiling']:.2f}x end to end")
    print(f"wrote {args.out / 'bench.json'} and {args.out / 'bench.png'}")
    return 0


def console() -> int:
    """The console command: this process owns all its ONNX Runtime sessions, so they share one thread pool."""
    from runtime.ort_threads import use_global_pool

    use_global_pool()
    return main()


if __name__ == "__main__":
    sys.exit(console())
