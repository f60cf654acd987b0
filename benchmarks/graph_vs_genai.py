"""One decode step of the bundle's written ORT-CPU decoder against onnxruntime-genai's graph of the same weights,
graph time only (no Python around it), in one process with one thread pool.

    python benchmarks/graph_vs_genai.py --bundle B4 --genai GENAI_INT4_DIR [--past 100,300,600] [--rounds 6]
    python benchmarks/graph_vs_genai.py --bundle B4 --model-dir MODEL [--precision int4]   # builds genai's model

Both graphs take one new token over ``past`` cached positions, their K/V buffers bound once as both past and
present (each writes its new row in place), outputs bound to preallocated arrays; what is timed is
``run_with_iobinding`` alone, the two graphs alternated in rounds. ``--profile`` adds ONNX Runtime's per-operator
kernel time (median per node, summed per operator type) for both. What the difference is made of on this machine:
the written graph runs attention on at least 2 query rows (GroupQueryAttention's 1-row kernel computes a row
differently from its multi-row kernel, and a verify row must equal a plain step bitwise) and gathers each layer's
rows into root-to-leaf chains and back. Not a test: nothing here asserts.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))


def load(bundle: Path, threads: int, profile: bool):
    from runtime.pipeline import Pipeline

    if profile:  # the runtime's sessions with the profiler on
        import runtime.backends.ort as ort_backend

        make = ort_backend.session_options

        def profiled(threads=None):
            opts = make(threads)
            opts.enable_profiling, opts.profile_file_prefix = True, str(Path(tempfile.gettempdir()) / "ours_")
            return opts

        ort_backend.session_options = profiled
    return Pipeline.from_bundle(bundle, threads=threads)


def ours(pipe, past: int):
    """(session, bound IOBinding) of the bundle's 1-chain written decoder for one token after ``past`` positions."""
    dec = pipe.new_decoder()
    ids = np.random.default_rng(0).integers(100, 20000, past)
    pipe.step(dec, pipe.embed(ids)[None], ids, logits="last")
    dec._ensure(dec.min_len)
    session, io = dec._binding(1)
    seqlens = np.full(1, dec.length, np.int32)
    feeds = {"inputs_embeds": pipe.embed(np.array([123])).astype(np.float32), "chain_rows": np.zeros((1, 1), np.int64),
             "row_slots": np.zeros(1, np.int64), "seqlens_k": seqlens, "total_sequence_length": seqlens + 1,
             "logits_rows": np.zeros(1, np.int64)}
    for k, v in feeds.items():
        io.bind_cpu_input(k, v)
    keep = [np.empty((1, dec.vocab), np.float32), np.empty((1, dec.hidden), np.float32),
            np.empty((1, dec.heads * dec.hd), np.float32)]
    for name, arr in zip(("logits", "hidden_states", "last_query"), keep):
        io.bind_output(name, "cpu", 0, np.float32, list(arr.shape), arr.ctypes.data)
    return session, io, (pipe, dec, keep, feeds)


def genai_session(gdir: Path, threads: int, profile: bool):
    import onnxruntime as ort

    from runtime.ort_threads import session_options

    cfg = json.loads((gdir / "genai_config.json").read_text())["model"]["decoder"]
    opts = session_options(threads)
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if profile:
        opts.enable_profiling, opts.profile_file_prefix = True, str(Path(tempfile.gettempdir()) / "genai_")
    return ort.InferenceSession(str(gdir / cfg["filename"]), opts, providers=["CPUExecutionProvider"])


def genai(session, gdir: Path, past: int):
    """(session, bound IOBinding) of onnxruntime-genai's decoder graph for one token after ``past`` positions."""
    import onnxruntime as ort

    model = json.loads((gdir / "genai_config.json").read_text())["model"]
    cfg = model["decoder"]
    io = session.io_binding()
    kvh, hd, layers = cfg["num_key_value_heads"], cfg["head_size"], cfg["num_hidden_layers"]
    names = cfg["inputs"], cfg["outputs"]
    keep = []
    for i in range(layers):
        for past_name, present_name in ((names[0]["past_key_names"], names[1]["present_key_names"]),
                                        (names[0]["past_value_names"], names[1]["present_value_names"])):
            buf = np.zeros((1, kvh, past + 64, hd), np.float32)
            keep.append(buf)
            value = ort.OrtValue.ortvalue_from_numpy(buf)
            io.bind_ortvalue_input(past_name % i, value)
            io.bind_ortvalue_output(present_name % i, value)
    io.bind_cpu_input(names[0]["input_ids"], np.array([[123]], np.int64))
    io.bind_cpu_input(names[0]["attention_mask"], np.ones((1, past + 1), np.int64))
    logits = np.empty((1, 1, model["vocab_size"]), np.float32)
    keep.append(logits)
    io.bind_output(names[1]["logits"], "cpu", 0, np.float32, list(logits.shape), logits.ctypes.data)
    return session, io, keep


def median_ms(session, io, n: int) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        session.run_with_iobinding(io)
        times.append(time.perf_counter() - t0)
    return float(np.median(times)) * 1e3


def per_op(path: str) -> dict[str, float]:
    events = json.loads(Path(path).read_text())
    per_node = collections.defaultdict(list)
    kind = {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            per_node[e["name"]].append(e["dur"])
            kind[e["name"]] = e["args"].get("op_name")
    out = collections.Counter()
    for node, durs in per_node.items():
        out[kind[node]] += float(np.median(durs)) / 1e3
    return dict(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", required=True, type=Path)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--genai", type=Path, help="a folder onnxruntime-genai's model builder wrote")
    src.add_argument("--model-dir", type=Path, help="the VLM folder; its text model is built by genai's builder")
    ap.add_argument("--precision", default="int4", help="with --model-dir: genai's precision")
    ap.add_argument("--past", default="100,300,600")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--calls", type=int, default=100, help="timed calls per graph per round")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args(argv)

    from runtime.ort_threads import use_global_pool

    use_global_pool()
    with tempfile.TemporaryDirectory() as tmp:
        gdir = args.genai
        if gdir is None:
            from peers import genai_models

            gdir = genai_models(args.model_dir, Path(tmp), (args.precision,))[args.precision]
        pipe = load(args.bundle, args.threads, args.profile)
        gsession = genai_session(gdir, args.threads, args.profile)
        print("| past positions | written decoder ms | onnxruntime-genai ms | ratio |\n|---|---|---|---|")
        for past in [int(p) for p in args.past.split(",")]:
            a, b = ours(pipe, past), genai(gsession, gdir, past)
            for _ in range(10):
                a[0].run_with_iobinding(a[1])
                b[0].run_with_iobinding(b[1])
            t = {"ours": [], "genai": []}
            for _ in range(args.rounds):
                t["ours"].append(median_ms(a[0], a[1], args.calls))
                t["genai"].append(median_ms(b[0], b[1], args.calls))
            mo, mg = float(np.median(t["ours"])), float(np.median(t["genai"]))
            print(f"| {past} | {mo:.2f} | {mg:.2f} | {mo / mg:.2f}x |")
        if args.profile:  # over every past length's calls
            po, pg = per_op(a[0].end_profiling()), per_op(gsession.end_profiling())
            print("\nkernel ms per step (profiled, so slower), per operator type: written / onnxruntime-genai")
            for op in sorted(set(po) | set(pg), key=lambda o: -(po.get(o, 0) + pg.get(o, 0)))[:10]:
                print(f"    {op}: {po.get(op, 0):.3f} / {pg.get(op, 0):.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
