"""Pick the draft tree (N, D, K) for this machine from measured costs and measured acceptance.

For each candidate TreeSpec the calibration prompts are decoded speculatively (greedy) to measure the
mean acceptance length; the target's verify cost at N tokens and the drafter's cost per call are timed
on this machine. Expected tokens/s = accept_len / (verify(N) + (D - 1) * draft(K) + catch_up), the
cost of one speculative step. The best candidate wins; plain decoding (1 token / decode step) is the
baseline every candidate is compared with.
"""

from __future__ import annotations

import statistics
import time

import numpy as np

from .tree import TreeSpec, causal_mask

CANDIDATES = [
    TreeSpec(4, 3, 1), TreeSpec(6, 5, 1), TreeSpec(8, 3, 2), TreeSpec(8, 4, 2), TreeSpec(12, 4, 3),
    TreeSpec(16, 5, 4), TreeSpec(24, 6, 4), TreeSpec(32, 6, 4),
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
    """Seconds for one target call over n tree tokens after ``context`` cached tokens."""
    dec = pipe.new_decoder(slack=n)
    h = pipe.text["hidden_size"]
    rng = np.random.default_rng(0)
    pipe.step(dec, rng.standard_normal((1, context, h)).astype(np.float32))
    emb = rng.standard_normal((1, n, h)).astype(np.float32)
    mask = causal_mask(n, context, pipe.mask_min)
    pos = np.arange(context, context + n)
    return _time(lambda: dec.run(emb, mask, pos))


def draft_cost(pipe, q: int, context: int) -> float:
    from .speculative import DrafterState

    state = DrafterState(pipe, pipe.bundle.manifest["drafter"])
    h = pipe.text["hidden_size"]
    rng = np.random.default_rng(1)
    state.catch_up(rng.standard_normal((context + 1, h)).astype(np.float32), list(range(context + 1)),
                   rng.standard_normal((context, h)).astype(np.float32), list(range(context)))
    base = (state.self_len, state.mem_len)
    emb = rng.standard_normal((q, h)).astype(np.float32)
    mem = rng.standard_normal((q, h)).astype(np.float32)

    def call():
        state.rollback(*base)
        self_allowed = np.ones((q, base[0] + q), bool)
        cross_allowed = np.ones((q, base[1] + q), bool)
        state.call(emb, [context + 1] * q, self_allowed, mem, [context] * q, cross_allowed)

    return _time(call)


def tune(pipe, samples: list[tuple[list, str]], candidates=CANDIDATES, max_new_tokens: int = 48, context: int | None = None) -> dict:
    """samples: (images, prompt) pairs. Returns the table and the chosen TreeSpec (as JSON)."""
    prompt_len = len(pipe.prepare(*samples[0]).input_ids)
    context = context or prompt_len
    decode = verify_cost(pipe, 1, context)
    rows = []
    for spec in candidates:
        pipe.tree_spec = spec
        acc = []
        for images, prompt in samples:
            acc += pipe.generate(images, prompt, max_new_tokens=max_new_tokens, speculative=True).accept_lengths
        accept = float(np.mean(acc)) if acc else 1.0
        verify = verify_cost(pipe, spec.total_tokens, context)
        draft = draft_cost(pipe, spec.top_k, context)
        catch_up = draft_cost(pipe, max(1, round(accept)), context)
        step = verify + (spec.depth - 1) * draft + catch_up
        rows.append({"tree": spec.to_json(), "accept_len": round(accept, 3), "verify_ms": round(verify * 1e3, 3),
                     "draft_ms": round(draft * 1e3, 3), "step_ms": round(step * 1e3, 3),
                     "expected_tokens_per_s": round(accept / step, 2)})
    pipe.tree_spec = None
    best = max(rows, key=lambda r: r["expected_tokens_per_s"])
    return {"decode_ms": round(decode * 1e3, 3), "plain_tokens_per_s": round(1 / decode, 2), "context": context,
            "candidates": rows, "chosen": best["tree"], "expected_speedup": round(best["expected_tokens_per_s"] * decode, 3)}
