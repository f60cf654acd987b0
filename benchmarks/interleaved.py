"""Plain against DREAM decoding of one or more bundles in one process, prompt by prompt in turn.

    python benchmarks/interleaved.py --bundle shipped=B4 --bundle top2=B4top2 --text 80 --images 12

Every bundle is loaded once (as an app embeds the runtime: one ONNX Runtime global thread pool, warm sessions);
then each held-out instruction and scene is decoded by every (bundle, plain / DREAM) condition in turn, the order
reversed on every other prompt. On a machine whose speed drifts over minutes this compares conditions under the
same conditions, which separate processes (benchmarks/peers.py) cannot. Prints decode tokens/s per condition, the
ratio to the mean of the plain rows, the mean acceptance length, and whether each DREAM run produced its plain
run's tokens. ``--lone-rows NAME=alone`` / ``NAME=padded`` decides for one bundle whether a 1-row call runs beside a
copy of its row (``runtime/chains.py``) instead of asking the CPU: load the same bundle under two names to measure
what the padding costs. Not a test: nothing here asserts.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

from peers import prompts  # noqa: E402


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", action="append", required=True, metavar="NAME=DIR")
    ap.add_argument("--text", type=int, default=30)
    ap.add_argument("--images", type=int, default=12)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--lone-rows", action="append", default=[], metavar="NAME=padded|alone",
                    help="run that bundle's lone rows beside a copy (padded) or alone (not exact on a CPU whose int8 "
                         "kernels treat a lone row apart): what the padding costs; default: as the runtime asks the CPU")
    args = ap.parse_args(argv)

    from runtime.ort_threads import use_global_pool

    use_global_pool()
    from runtime.pipeline import Pipeline

    with tempfile.TemporaryDirectory() as tmp:
        text, images = prompts(args.text, args.images, Path(tmp))
        pipes = {}
        for spec in args.bundle:
            name, folder = spec.split("=", 1)
            pipes[name] = Pipeline.from_bundle(folder, threads=args.threads)
            for forced in args.lone_rows:
                target, how = forced.split("=", 1)
                if how not in ("padded", "alone"):
                    sys.exit(f"--lone-rows {forced!r}: expected NAME=padded or NAME=alone")
                if target == name:
                    pipes[name].pad_lone_rows = how == "padded"
            pipes[name].warm(True)
            for speculative in (False, True):  # untimed: first calls allocate
                pipes[name].generate(*text[0], max_new_tokens=8, speculative=speculative)
        conditions = [(name, speculative) for name in pipes for speculative in (False, True)]
        print("| set | bundle | decoding | tok/s | vs plain | τ | speculative == plain |")
        print("|---|---|---|---|---|---|---|")
        for set_name, items in (("text", text), ("images", images)):
            acc = defaultdict(lambda: {"tokens": 0, "seconds": 0.0, "accept": [], "same": True})
            for i, (paths, prompt) in enumerate(items):
                plain_ids = {}
                for name, speculative in (conditions if i % 2 == 0 else conditions[::-1]):
                    r = pipes[name].generate(paths, prompt, max_new_tokens=args.max_new_tokens, speculative=speculative)
                    a = acc[(name, speculative)]
                    a["tokens"] += max(r.num_new_tokens - 1, 0)
                    a["seconds"] += r.decode_s
                    a["accept"] += list(r.accept_lengths or [])
                    plain_ids.setdefault(name, {})[speculative] = r.token_ids
                for name, ids in plain_ids.items():
                    acc[(name, True)]["same"] &= ids[True] == ids[False]
            rates = {k: v["tokens"] / v["seconds"] for k, v in acc.items() if v["seconds"]}
            base = float(np.mean([rates[(name, False)] for name in pipes]))
            for name, speculative in conditions:
                a = acc[(name, speculative)]
                tau = f"{np.mean(a['accept']):.2f}" if a["accept"] else ""
                same = ("yes" if a["same"] else "**no**") if speculative else ""
                print(f"| {set_name} | {name} | {'DREAM' if speculative else 'plain'} | {rates[(name, speculative)]:.1f} | "
                      f"{rates[(name, speculative)] / base:.2f} | {tau} | {same} |", flush=True)


if __name__ == "__main__":
    main()
