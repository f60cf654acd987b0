"""Pick the draft tree (N, D, K, prompt lookup L) and the ONNX Runtime thread count for this machine, from measurements.

For each thread count (1 and all cores) plain decoding is timed on the calibration prompts; then, with
the faster one, each candidate TreeSpec decodes the same prompts speculatively (greedy). Two numbers
per candidate:
  - the cost model: mean acceptance length / (verify(N) + draft step), with verify and draft timed in
    isolation (the one-call draft graph when it matches the tree, else D drafter calls);
  - the measured decode rate: tokens / seconds of the real speculative loop (first token to last).
The measured rate decides. On CPUs the isolated timings flatter speculation: alternating the drafter
and the target evicts each other's weights from the caches, so in the loop both calls cost up to ~2x
their isolated time, and only the real loop shows it. Plain decoding stays the baseline: when no tree
beats it, the result says so (``speculation_pays``: false) instead of pretending.
"""

from __future__ import annotations

import os
import statistics
import time

import numpy as np

from .drafter import DrafterState
from .tree import TreeSpec, causal_mask

CANDIDATES = [
    TreeSpec(4, 3, 1), TreeSpec(6, 5, 1), TreeSpec(8, 3, 2), TreeSpec(8, 4, 2), TreeSpec(12, 4, 3),
    TreeSpec(16, 5, 4), TreeSpec(16, 6, 2), TreeSpec(24, 6, 4), TreeSpec(32, 6, 4),
    # the same verify sizes with prompt lookup (up to 8 of the N nodes copied from the context)
    TreeSpec(4, 3, 1, 8), TreeSpec(8, 3, 2, 8), TreeSpec(12, 4, 3, 8), TreeSpec(16, 5, 4, 8),
    # ... verifying only candidates at least ~20% likely (where a verify row is a fifth of a decode step, a CPU)
    TreeSpec(8, 3, 2, 8, -1.6), TreeSpec(12, 4, 3, 8, -1.6),
    # ... and greedy drafter chains (one row per level: what a one-chain verify graph reads)
    TreeSpec(8, 3, 1, 8, -1.6), TreeSpec(8, 4, 1, 8, -1.6),
]


def _time(fn, repeats: int = 5) -> float:
    fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def verify_cost(pipe, n: int, context: int) -> float:
    """Seconds for one target call over n tree tokens after ``context`` cached tokens (isolated)."""
    dec = pipe.new_decoder(slack=n)
    h = pipe.text["hidden_size"]
    rng = np.random.default_rng(0)
    pipe.step(dec, rng.standard_normal((1, context, h)).astype(np.float32))
    emb = rng.standard_normal((1, n, h)).astype(np.float32)
    mask = causal_mask(n, context, pipe.mask_min)
    pos = np.arange(context, context + n)
    return _time(lambda: dec.run(emb, mask, pos))


def draft_cost(pipe, tree: TreeSpec, context: int, accepted: int) -> tuple[float, bool]:
    """Seconds for one draft step (catch-up on ``accepted`` tokens + the tree search), isolated, and
    whether the bundle's one-call graph did it."""
    info = pipe.bundle.manifest["drafter"]
    state = DrafterState(pipe, info)
    graph = pipe.bundle.manifest["graphs"].get(state.tree_graph or "", {})
    unrolled = (graph.get("depth"), graph.get("top_k")) == (tree.depth, tree.top_k)
    h = pipe.text["hidden_size"]
    rng = np.random.default_rng(1)
    state.catch_up(rng.standard_normal((context + 1, h)).astype(np.float32), list(range(context + 1)),
                   rng.standard_normal((context, h)).astype(np.float32), list(range(context)))
    base = (state.self_len, state.mem_len)
    q = max(1, accepted)
    emb = rng.standard_normal((q, h)).astype(np.float32)
    pos = list(range(context + 1, context + 1 + q))
    fpos = list(range(context, context + q))

    def step():
        state.rollback(*base)
        if unrolled:
            state.draft_tree(emb, pos, emb, fpos)
            return
        state.catch_up(emb, pos, emb, fpos)
        k = tree.top_k
        for d in range(1, tree.depth):
            n_self, n_mem = state.self_len, state.mem_len
            state.call(emb[:1].repeat(k, 0), [pos[-1] + d] * k, np.ones((k, n_self + k), bool),
                       emb[:1].repeat(k, 0), [pos[-1] + d - 1] * k, np.ones((k, n_mem + k), bool))

    return _time(step), unrolled


def _decode_rate(pipe, samples, speculative: bool, max_new_tokens: int) -> tuple[float, float]:
    """(tokens per second of the decode phase, mean acceptance length) over the samples."""
    tokens, seconds, acc = 0, 0.0, []
    pipe.generate(*samples[0], max_new_tokens=4, speculative=speculative)  # warm up
    for images, prompt in samples:
        r = pipe.generate(images, prompt, max_new_tokens=max_new_tokens, speculative=speculative)
        tokens += r.num_new_tokens - 1  # the first token comes from the prefill
        seconds += r.decode_s
        acc += r.accept_lengths or []
    return tokens / max(seconds, 1e-9), (float(np.mean(acc)) if acc else 1.0)


def tune(pipe_factory, samples: list[tuple[list, str]], candidates=CANDIDATES, max_new_tokens: int = 48,
         context: int | None = None, prepare=None) -> dict:
    """pipe_factory(threads) -> Pipeline; samples: (images, prompt) pairs. Returns the table and the choice.
    ``prepare(tree) -> bool``, called before each candidate is measured, may give the bundle a one-call draft
    graph for that tree's depth and top-k (True: it did, the pipeline is reloaded): every tree is then timed
    as it would run once chosen, not only the one the bundle was exported with. Candidates are measured
    grouped by (depth, top-k), so each graph is exported once."""
    cores = os.cpu_count() or 1
    plain = {}
    for threads in sorted({1, cores}):
        pipe = pipe_factory(threads)
        plain[threads] = _decode_rate(pipe, samples, False, max_new_tokens)[0]
    threads = max(plain, key=plain.get)
    pipe = pipe_factory(threads)
    prompt_len = len(pipe.prepare(*samples[0]).input_ids)
    context = context or prompt_len
    decode = verify_cost(pipe, 1, context)
    rows = []
    for spec in sorted(candidates, key=lambda t: (t.depth, t.top_k)) if prepare is not None else candidates:
        if prepare is not None and prepare(spec):
            pipe = pipe_factory(threads)
        pipe.tree_spec = spec
        rate, accept = _decode_rate(pipe, samples, True, max_new_tokens)
        verify = verify_cost(pipe, spec.total_tokens, context)
        draft, unrolled = draft_cost(pipe, spec, context, round(accept))
        step = verify + draft
        rows.append({"tree": spec.to_json(), "accept_len": round(accept, 3), "verify_ms": round(verify * 1e3, 3),
                     "draft_ms": round(draft * 1e3, 3), "one_call_draft": unrolled, "step_ms": round(step * 1e3, 3),
                     "expected_tokens_per_s": round(accept / step, 2), "measured_tokens_per_s": round(rate, 2),
                     "measured_speedup": round(rate / plain[threads], 3)})
    pipe.tree_spec = None
    best = max(rows, key=lambda r: r["measured_tokens_per_s"])
    return {"threads": threads, "plain_tokens_per_s": {str(t): round(r, 2) for t, r in plain.items()},
            "decode_ms": round(decode * 1e3, 3), "context": context, "candidates": rows, "chosen": best["tree"],
            "measured_speedup": best["measured_speedup"],
            "expected_speedup": round(best["expected_tokens_per_s"] * decode, 3),
            "speculation_pays": best["measured_speedup"] > 1.0}
