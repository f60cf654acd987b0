"""``dream-check``: the one command that proves a backend (and a precision) on the machine it runs on.

    dream-check --bundle B [--backend auto|ort-cpu|ort-cuda|ort-trt|trt] [--reference B_FP32] [--scenes 20] [--json out.json]

On held-out scene prompts (seeds never used in training), greedy:
- it opens the backend (ONNX Runtime's TensorRT provider builds its engines at the first call of each shape, in
  the bundle's ``engines/``; that setup is timed apart as ``setup_s``);
- it decodes every prompt plainly and speculatively on that backend and checks that the ids are equal (the
  lossless invariant holds per backend and precision): exit status 1 if not;
- it reports the token agreement with the reference, by default the same bundle on ONNX Runtime's CPU (give
  ``--reference`` an FP32 bundle to check an FP16 one against FP32), the time per graph call, plain vs DREAM
  tokens/s and the mean acceptance length;
- it prints one JSON report that a user can paste into an issue.
Torch-free: the runtime plus the scene renderer (numpy, pillow).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from .scenes import CHECK_SEED, random_scene

PROMPTS = ["Describe the image.", "How many shapes are there?", "What color is the circle?", "Is there a red square?"]


@contextmanager
def timed_graphs(pipe, times: dict):
    """Record seconds per graph call: backend runs, and decoder runs (the fused ORT-CPU decoder binds its own I/O)."""
    from runtime.backends.device import DeviceDecoder
    from runtime.chains import ChainDecoder
    from runtime.decoder import FusedOrtDecoder, PlainDecoder

    run = pipe.backend.run
    tree = (pipe.bundle.manifest.get("tree") or {}).get("total_tokens", 1)

    def backend_run(graph, feeds, outputs=None):
        t0 = time.perf_counter()
        try:
            return run(graph, feeds, outputs)
        finally:
            if graph != "decoder":  # counted by the decoder wrapper with its call kind
                times[graph].append(time.perf_counter() - t0)

    originals = {cls: cls.run for cls in (PlainDecoder, FusedOrtDecoder, DeviceDecoder, ChainDecoder)}

    def wrap(cls):
        orig = originals[cls]

        def dec_run(self, embeds, mask, positions, **kw):
            t0 = time.perf_counter()
            try:
                return orig(self, embeds, mask, positions, **kw)
            finally:
                q = embeds.shape[1]
                kind = "step" if q == 1 else "verify" if q <= tree else "prefill"  # (a short prefill counts as verify)
                times[f"decoder/{kind}"].append(time.perf_counter() - t0)
        return dec_run

    run_tree = ChainDecoder.run_tree

    def timed_tree(self, embeds, parents):
        t0 = time.perf_counter()
        try:
            return run_tree(self, embeds, parents)
        finally:
            times["decoder/verify"].append(time.perf_counter() - t0)

    pipe.backend.run = backend_run
    for cls in originals:
        cls.run = wrap(cls)
    ChainDecoder.run_tree = timed_tree
    try:
        yield
    finally:
        pipe.backend.run = run
        for cls, orig in originals.items():
            cls.run = orig
        ChainDecoder.run_tree = run_tree


def examples(count: int, seed: int):
    rng = np.random.default_rng(seed)
    return [(np.array(random_scene(rng).render().convert("RGB")), PROMPTS[i % len(PROMPTS)]) for i in range(count)]


def _decode_all(pipe, items, speculative: bool, max_new_tokens: int):
    out = []
    for img, prompt in items:
        out.append(pipe.generate(img, prompt, max_new_tokens=max_new_tokens, speculative=speculative))
    return out


def check(bundle: Path, backend: str = "auto", reference: Path | None = None, scenes: int = 20,
          max_new_tokens: int = 48, seed: int = CHECK_SEED) -> dict:
    import onnxruntime as ort

    from runtime.pipeline import Pipeline

    from runtime.bundle import Bundle

    t0 = time.perf_counter()
    precision = Bundle.load(bundle, verify=False).manifest.get("precision", "fp32")
    # a non-FP32 bundle is checked on its own graphs, also on a CPU (where the FP32 fused decoder would be picked)
    pipe = Pipeline.from_bundle(bundle, backend=backend, fused=False if precision != "fp32" else None)
    items = examples(scenes, seed)
    pipe.generate(items[0][0], items[0][1], max_new_tokens=2, speculative=False)  # engines / first-call setup
    if pipe.has_drafter:
        pipe.generate(items[0][0], items[0][1], max_new_tokens=2, speculative=True)
    setup_s = time.perf_counter() - t0
    times: dict = defaultdict(list)
    with timed_graphs(pipe, times):
        plain = _decode_all(pipe, items, False, max_new_tokens)
        spec = _decode_all(pipe, items, True, max_new_tokens) if pipe.has_drafter else []
    mismatches = [i for i, (a, b) in enumerate(zip(plain, spec)) if a.token_ids != b.token_ids]
    ref_pipe = Pipeline.from_bundle(reference or bundle, backend="ort-cpu")
    ref = _decode_all(ref_pipe, items, False, max_new_tokens)
    same = sum(a.token_ids == r.token_ids for a, r in zip(plain, ref))
    prefix = [_common_prefix(a.token_ids, r.token_ids) / max(1, len(r.token_ids)) for a, r in zip(plain, ref)]

    def rate(results):
        toks = sum(r.num_new_tokens - 1 for r in results)
        secs = sum(r.decode_s for r in results)
        return toks / secs if secs > 0 else 0.0

    accept = [a for r in spec for a in (r.accept_lengths or [])]
    manifest = pipe.bundle.manifest
    return {
        "dream_check": 1,
        "bundle": str(bundle), "precision": precision, "graphs": pipe.graphs_in_use(True if pipe.has_drafter else False),
        "backend": pipe.backend.name, "backend_why": pipe.backend.why,
        "device_kv": bool(getattr(pipe.backend, "device_kv", False)),  # K/V resident in device memory
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "onnxruntime": ort.__version__,
                    "providers": ort.get_available_providers(), "cpu_count": os.cpu_count(), "gpu": _gpu_name()},
        "scenes": scenes, "seed": seed, "max_new_tokens": max_new_tokens,
        "setup_s": round(setup_s, 3),
        "lossless": not mismatches, "speculative_mismatches": mismatches,
        "reference": {"bundle": str(reference or bundle), "backend": "ort-cpu",
                      "identical_answers": same, "of": len(items), "mean_prefix_agreement": round(float(np.mean(prefix)), 4)},
        "graph_ms": {g: {"calls": len(v), "mean": round(1e3 * float(np.mean(v)), 3), "p90": round(1e3 * float(np.percentile(v, 90)), 3)}
                     for g, v in sorted(times.items()) if v},
        "plain_tokens_per_s": round(rate(plain), 2),
        "dream_tokens_per_s": round(rate(spec), 2) if spec else None,
        "speedup": round(rate(spec) / rate(plain), 3) if spec and rate(plain) else None,
        "mean_accept_length": round(float(np.mean(accept)), 3) if accept else None,
        "tree": manifest.get("tree"),
    }


def _common_prefix(a, b) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _gpu_name() -> str | None:
    import shutil
    import subprocess

    if shutil.which("nvidia-smi") is None:
        return None
    try:
        r = subprocess.run(["nvidia-smi", "--query-gpu=name,compute_cap,driver_version", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=10)
        return r.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="dream-check", description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--reference", type=Path, default=None, help="the bundle to compare answers with, on the CPU "
                    "(default: the same bundle); an FP32 bundle for an FP16 one")
    ap.add_argument("--scenes", type=int, default=20)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--json", type=Path, default=None, help="also write the report here")
    args = ap.parse_args(argv)
    from runtime.errors import RuntimeErrorBase

    if args.scenes < 1:
        print(f"dream-check: error: --scenes {args.scenes}: expected at least 1", file=sys.stderr)
        return 2
    try:
        report = check(args.bundle, args.backend, args.reference, args.scenes, args.max_new_tokens)
    except RuntimeErrorBase as exc:
        print(f"dream-check: error: {exc}", file=sys.stderr)
        return 2
    from .reports import emit

    emit(report, args.json, indent=1)
    if not report["lossless"]:
        print(f"dream-check: speculative decoding differs from plain decoding on {len(report['speculative_mismatches'])} "
              f"prompt(s) on backend {report['backend']}: please report this JSON", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
