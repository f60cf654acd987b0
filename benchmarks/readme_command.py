"""What a user of the README's main command sees, cold and warm.

    python benchmarks/readme_command.py --bundle B [--image examples/scene2.png] [--prompt "Describe the image."]

cold: ``dream-run IMAGE PROMPT --json`` as a new process each time (what a shell user runs): the wall time of
      the whole process (interpreter start, imports, bundle checks, sessions, generation) and the JSON's own
      load_ms / ttft_ms / tokens_per_s (setup is in load_ms, never in ttft_ms or tokens_per_s).
warm: one embedded ``Pipeline`` answering the same prompt repeatedly (what an app sees after loading once).
Each with the bundle's default (the decoding its manifest chose) and with --speculative / --no-speculative
forced. Median of --repeats. Not a test: nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path


def cold(bundle: Path, image: str, prompt: str, flag: str | None, repeats: int) -> dict:
    runs = []
    for _ in range(repeats):
        cmd = [sys.executable, "-m", "runtime.cli", image, prompt, "--bundle", str(bundle), "--json"] + ([flag] if flag else [])
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parents[1])
        wall = (time.perf_counter() - t0) * 1000
        out = json.loads(proc.stdout)
        runs.append({"process_ms": wall, **{k: out[k] for k in ("load_ms", "ttft_ms", "tokens_per_s", "num_new_tokens")},
                     "speculative": out["speculative"], "mean_accept_length": out.get("mean_accept_length")})
    return _median(runs)


def warm(bundle: Path, image: str, prompt: str, speculative: bool | None, repeats: int) -> dict:
    from runtime.pipeline import Pipeline

    t0 = time.perf_counter()
    pipe = Pipeline.from_bundle(bundle)
    pipe.warm(speculative)
    load = (time.perf_counter() - t0) * 1000
    pipe.generate([image], prompt, speculative=speculative)  # the first call of a warm pipeline is not special; still untimed
    runs = []
    for _ in range(repeats):
        r = pipe.generate([image], prompt, speculative=speculative)
        runs.append({"ttft_ms": r.ttft_ms, "tokens_per_s": r.tokens_per_s, "num_new_tokens": r.num_new_tokens,
                     "speculative": r.speculative,
                     "mean_accept_length": round(sum(r.accept_lengths) / len(r.accept_lengths), 3) if r.accept_lengths else None})
    return {"load_ms": round(load, 1), **_median(runs)}


def _median(runs: list[dict]) -> dict:
    out = {}
    for k in runs[0]:
        vals = [r[k] for r in runs]
        out[k] = round(statistics.median(vals), 2) if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals) else vals[0]
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--image", default="examples/scene2.png")
    ap.add_argument("--prompt", default="Describe the image.")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args(argv)
    results = {}
    for name, flag, spec in (("default", None, None), ("--no-speculative", "--no-speculative", False),
                             ("--speculative", "--speculative", True)):
        results[name] = {"cold": cold(args.bundle, args.image, args.prompt, flag, args.repeats),
                         "warm": warm(args.bundle, args.image, args.prompt, spec, args.repeats)}
        print(json.dumps({name: results[name]}), flush=True)
    if args.json:
        args.json.write_text(json.dumps({"bundle": str(args.bundle), "image": args.image, "prompt": args.prompt,
                                         "repeats": args.repeats, "results": results}, indent=1))


if __name__ == "__main__":
    main()
