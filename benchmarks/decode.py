"""Decode speed after a long prefix: dream-run's runtime vs transformers generate vs onnxruntime-genai.

    pip install -e ".[export,bench]"
    python benchmarks/decode.py [--models tiny,smolvlm-256m-shape] [--prefix 600] [--tokens 32]

All three run in this process on the same machine, same weights (random for the 256M shape), fp32,
greedy, one sequence; each figure is ms per decoded token after the prefix, median of --repeats runs,
and the table prints each as a ratio to onnxruntime-genai. Not a test: nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SHAPES = {
    # the built-in model
    "tiny": None,
    # SmolVLM-256M's text decoder: 30 layers, hidden 576, 9 heads / 3 KV heads, head_dim 64, MLP 1536, vocab 49280
    "smolvlm-256m-shape": dict(text_layers=30, hidden=576, heads=9, kv_heads=3, intermediate=1536, vocab_size=49280,
                               tie_embeddings=True, max_positions=2048),
}


def model_dir(name: str, work: Path) -> Path:
    from dream_export.presets.smolvlm_tiny import ensure_smolvlm_tiny
    from dream_export.presets.smolvlm_tiny.architecture import TinyVLMSpec, build_tiny_vlm

    if SHAPES[name] is None:
        return ensure_smolvlm_tiny()
    return build_tiny_vlm(work / name, TinyVLMSpec(**SHAPES[name], seed=0))


def bench_runtime(bundle: Path, ids: np.ndarray, tokens: int, fused: bool) -> float:
    from runtime.pipeline import Pipeline

    pipe = Pipeline.from_bundle(bundle, fused=fused)
    cache = pipe.new_decoder()
    logits = pipe.step(cache, pipe.embed(ids)[None])["logits"][0, -1]
    token = int(np.argmax(logits))
    t0 = time.perf_counter()
    for _ in range(tokens):
        logits = pipe.step(cache, pipe.embed(np.array([token]))[None])["logits"][0, -1]
        token = int(np.argmax(logits))
    return (time.perf_counter() - t0) / tokens * 1000


def bench_transformers(mdir: Path, ids: np.ndarray, tokens: int) -> float:
    import torch
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(mdir).eval()
    inp = torch.from_numpy(ids)[None]
    kw = dict(do_sample=False, eos_token_id=None, pad_token_id=0)

    def run(n):
        t0 = time.perf_counter()
        with torch.no_grad():
            model.generate(input_ids=inp, max_new_tokens=n, min_new_tokens=n, **kw)
        return time.perf_counter() - t0

    run(2)
    return (run(tokens + 1) - run(1)) / tokens * 1000


def save_as_llama(mdir: Path, work: Path) -> Path:
    """The VLM's text decoder saved as a LlamaForCausalLM folder (with its tokenizer and generation config),
    what onnxruntime-genai's model builder takes. Returns the folder."""
    import torch
    from transformers import AutoModelForImageTextToText, LlamaForCausalLM

    vlm = AutoModelForImageTextToText.from_pretrained(mdir).eval()
    cfg = vlm.config.text_config
    cfg.architectures = ["LlamaForCausalLM"]
    llama = LlamaForCausalLM(cfg).eval()
    llama.model.load_state_dict(vlm.model.text_model.state_dict())
    llama.lm_head.weight = torch.nn.Parameter(vlm.lm_head.weight.detach().clone())
    src = work / "llama"
    llama.save_pretrained(src)
    for f in Path(mdir).glob("tokenizer*"):
        shutil.copy(f, src / f.name)
    for f in ("special_tokens_map.json", "generation_config.json"):
        if (Path(mdir) / f).exists():
            shutil.copy(Path(mdir) / f, src / f)
    return src


def genai_model(mdir: Path, work: Path) -> Path:
    """The same text decoder built by onnxruntime-genai's model builder (fp32, CPU)."""
    src = save_as_llama(mdir, work)
    out = work / "genai"
    subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(src), "-o", str(out),
                    "-p", "fp32", "-e", "cpu"], check=True, capture_output=True)
    return out


def bench_genai(gdir: Path, ids: np.ndarray, tokens: int) -> float:
    import onnxruntime_genai as og

    model = og.Model(str(gdir))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + tokens + 2, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(ids.astype(np.int32).tolist())
    gen.generate_next_token()
    t0 = time.perf_counter()
    for _ in range(tokens):
        gen.generate_next_token()
    return (time.perf_counter() - t0) / tokens * 1000


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="tiny,smolvlm-256m-shape")
    ap.add_argument("--prefix", type=int, default=600)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    from dream_export.export.exporter import ExportOptions, export_bundle, load_target

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name in args.models.split(","):
            mdir = model_dir(name, work)
            model, processor = load_target(str(mdir))
            bundle = export_bundle(model, processor, {"model": name}, ExportOptions(out=work / f"{name}-bundle"), quiet=True)
            vocab = model.config.text_config.vocab_size
            del model
            ids = np.random.default_rng(0).integers(10, min(vocab, 800), args.prefix).astype(np.int64)
            res = {"model": name}
            res["dream-run, fused GQA graph"] = statistics.median(bench_runtime(bundle, ids, args.tokens, True) for _ in range(args.repeats))
            res["dream-run, standard graph"] = statistics.median(bench_runtime(bundle, ids, args.tokens, False) for _ in range(args.repeats))
            res["transformers generate"] = statistics.median(bench_transformers(mdir, ids, args.tokens) for _ in range(args.repeats))
            try:
                gdir = genai_model(mdir, work / name)
                res["onnxruntime-genai fp32"] = statistics.median(bench_genai(gdir, ids, args.tokens) for _ in range(args.repeats))
            except (ImportError, subprocess.CalledProcessError) as exc:
                print(f"onnxruntime-genai unavailable for {name}: {exc}", file=sys.stderr)
            rows.append(res)
    print(f"\ndecode ms/token after a {args.prefix}-token prefix ({args.tokens} tokens, median of {args.repeats}); ratio vs onnxruntime-genai")
    for res in rows:
        base = res.get("onnxruntime-genai fp32")
        print(f"[{res['model']}]")
        for k, v in res.items():
            if k == "model":
                continue
            ratio = f"{v / base:.2f}x" if base else "n/a"
            print(f"  {k:26s} {v:8.2f} ms/token   {ratio}")


if __name__ == "__main__":
    main()
