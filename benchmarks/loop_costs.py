"""Where DREAM's decode time goes on this machine, for one bundle, in one process, and what that allows.

    python benchmarks/loop_costs.py --bundle B [--text 20] [--images 6] [--max-new-tokens 96] [--rounds 2] [--oracle N]

Decodes held-out instructions and scenes plainly and speculatively, in turn, with every target call and every
draft-graph call timed inside the decode loop (not alone: in the loop the target's weights evict the drafter's
from the caches). Prints
- decode tokens/s after the first token, plain and DREAM, and whether every DREAM run equalled its plain run;
- a target call per number of rows it verifies and a draft call, as median ms and in plain steps; the rest of a
  speculative step (Python: the tree search, acceptance, bookkeeping) per step;
- the speedup a cycle's cost allows, tau / (verify(rows) + draft + rest) in plain steps, at the measured mean
  rows and acceptance and at higher acceptances: how good a drafter must be for a given speedup here.

``--oracle N``: the ceiling a perfect drafter would reach with this bundle's costs. The drafter still runs every
step (its cost stays in the loop), but the chain the target verifies is the next N tokens of the plain run's own
answer (so every drafted token is accepted until the answer ends): tau is N + 1 and each verify holds N + 1 rows.
With N above the draft graph's depth the draft cost is that of the shipped depth (understated).

The written ORT-CPU decoder (`--cpu-precision int8|int4` bundles) is timed per call; other decoders are not.
Not a test: nothing here asserts.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

from peers import prompts  # noqa: E402


def timed(pipe, state: dict) -> None:
    """Record the seconds of every target call by (rows, chains) and of every other graph call by name, into
    ``state["times"]`` (switched by the caller between plain and speculative passes)."""
    from runtime.chains import ChainDecoder

    call = ChainDecoder._call

    def target_call(self, embeds, rows, slots, logit_rows):
        t0 = time.perf_counter()
        try:
            return call(self, embeds, rows, slots, logit_rows)
        finally:
            state["times"][("target", embeds.shape[0], rows.shape[0])].append(time.perf_counter() - t0)

    ChainDecoder._call = target_call
    run = pipe.backend.run

    def graph_call(graph, feeds, outputs=None):
        t0 = time.perf_counter()
        try:
            return run(graph, feeds, outputs)
        finally:
            state["times"][("graph", graph)].append(time.perf_counter() - t0)

    pipe.backend.run = graph_call


def oracle(pipe, state: dict, n: int) -> None:
    """Replace every drafted tree by the next ``n`` tokens of ``state["answer"]`` (the plain run's tokens), after the
    drafter has run as usual."""
    from runtime.speculative import SpeculativeDecoder
    from runtime.tree import DraftTree

    unrolled, stepwise = SpeculativeDecoder._draft_unrolled, SpeculativeDecoder._draft_stepwise
    begin = SpeculativeDecoder.begin

    def remember_prompt(self, logits):
        self._oracle_prompt = self.dec.length  # the prompt, prefilled
        return begin(self, logits)

    def oracle_tree(self, *budget):
        (stepwise(self, *budget) if budget else unrolled(self))  # the drafter's real work, its proposal discarded
        emitted = self.dec.length - self._oracle_prompt + 1  # tokens emitted so far; the root is the last of them
        chain = [int(t) for t in (state.get("answer") or [])[emitted: emitted + n]]
        k = len(chain)
        return DraftTree(np.array([self.root, *chain], np.int64), np.zeros(k + 1), np.arange(-1, k, dtype=np.int64),
                         np.arange(k + 1, dtype=np.int64))

    SpeculativeDecoder.begin = remember_prompt
    SpeculativeDecoder._draft_unrolled = SpeculativeDecoder._draft_stepwise = oracle_tree


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--text", type=int, default=20)
    ap.add_argument("--images", type=int, default=6)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--rounds", type=int, default=2, help="plain and DREAM passes over the prompts, alternated")
    ap.add_argument("--tree", help="N,D,K[,L[,min_logp]]: decode with this tree instead of the bundle's (a depth or top-k "
                    "other than the draft graph's drafts level by level with the drafter graph)")
    ap.add_argument("--oracle", type=int, default=0, metavar="N",
                    help="verify the plain answer's next N tokens instead of the drafted tree (a perfect drafter)")
    args = ap.parse_args(argv)

    from runtime.ort_threads import use_global_pool

    use_global_pool()
    from runtime.pipeline import Pipeline

    pipe = Pipeline.from_bundle(args.bundle)
    if args.tree:
        from runtime.tree import TreeSpec

        pipe.tree_spec = TreeSpec.parse(args.tree)
    if not pipe.has_drafter:
        sys.exit(f"{args.bundle}: no drafter in this bundle")
    times = {mode: defaultdict(list) for mode in (False, True, None)}  # None: untimed (warm-up, equality check)
    state = {"times": times[None]}
    timed(pipe, state)
    if args.oracle:
        oracle(pipe, state, args.oracle)
    decode = {False: [0, 0.0], True: [0, 0.0]}
    accepts, same = [], True
    with tempfile.TemporaryDirectory() as tmp:
        text, images = prompts(args.text, args.images, Path(tmp))
        items = text + images
        for paths, prompt in items[:2]:  # warm: sessions, caches, first-call allocations
            for spec in (False, True):
                pipe.generate(paths, prompt, max_new_tokens=16, speculative=spec)
        outputs = {}
        for _ in range(args.rounds):
            for spec in (False, True):
                for i, (paths, prompt) in enumerate(items):
                    state["times"] = times[spec]
                    state["answer"] = outputs.get(i)
                    r = pipe.generate(paths, prompt, max_new_tokens=args.max_new_tokens, speculative=spec)
                    decode[spec][0] += max(r.num_new_tokens - 1, 0)
                    decode[spec][1] += r.decode_s
                    if spec:
                        accepts += r.accept_lengths or []
                        same &= r.token_ids == outputs[i]
                    else:
                        outputs[i] = r.token_ids
    report(times, decode, accepts, same)


def median_ms(v: list) -> float:
    return float(np.median(v)) * 1e3


def report(times: dict, decode: dict, accepts: list, same: bool) -> None:
    plain, spec = times[False], times[True]
    plain_rate = decode[False][0] / decode[False][1]
    dream_rate = decode[True][0] / decode[True][1]
    step = median_ms(plain[("target", 1, 1)])
    print(f"decode tokens/s: plain {plain_rate:.1f}, DREAM {dream_rate:.1f} ({dream_rate / plain_rate:.2f}x), "
          f"tau {np.mean(accepts):.2f}, speculative == plain: {'yes' if same else 'NO'}")
    print(f"plain step (1 row): {step:.2f} ms\n")
    print("| call, in DREAM's decode loop | calls | median ms | plain steps |\n|---|---|---|---|")
    verify, draft_ms = {}, 0.0
    for key in sorted(spec, key=str):
        v = spec[key]
        if key[0] == "target" and key[1] > 8:  # the prompt's prefill chunks
            continue
        name = f"verify {key[1]} row(s), {key[2]} chain(s)" if key[0] == "target" else f"graph {key[1]}"
        print(f"| {name} | {len(v)} | {median_ms(v):.2f} | {median_ms(v) / step:.2f} |")
        if key[0] == "target":
            verify[key[1]] = (len(v), median_ms(v))
        elif key[1].startswith("draft_tree"):
            draft_ms = median_ms(v)
    steps = len(accepts)
    in_calls = sum(sum(v) for k, v in spec.items() if not (k[0] == "target" and k[1] > 8) and k[1] != "vision")
    rest_ms = max(decode[True][1] - in_calls, 0.0) * 1e3 / max(steps, 1)
    rows = sum(n * r for r, (n, _) in verify.items()) / max(sum(n for n, _ in verify.values()), 1)
    print(f"\nper speculative step ({steps} steps): draft {draft_ms / step:.2f} plain steps, the rest (Python) "
          f"{rest_ms / step:.2f}; mean verified rows {rows:.2f}")
    print("\nspeedup a step's cost allows: min(tau, rows) / (verify(rows) + draft + rest), in plain steps")
    taus = (2.0, 2.5, 3.0, 3.5)
    print("| verified rows | step cost (plain steps) | " + " | ".join(f"tau {t}" for t in taus) + " |")
    print("|---|---|" + "---|" * len(taus))
    for r, (_, ms) in sorted(verify.items()):
        cost = (ms + draft_ms + rest_ms) / step
        print(f"| {r} | {cost:.2f} | " + " | ".join(f"{min(t, r) / cost:.2f}x" for t in taus) + " |")


if __name__ == "__main__":
    main()
