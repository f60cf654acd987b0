"""Footprint of the runtime as an app embeds it: import time, resident memory before and after loading a bundle,
and resident memory over many generations in one process (plain and speculative).

    python benchmarks/footprint.py --bundle BUNDLE [--generations 1000] [--json out.json]

Each figure comes from a fresh Python process (``--child``), so imports and allocations of one measurement do
not leak into the next. RSS growth is measured after a warm-up (the first generations allocate caches and
ONNX Runtime arenas): growth = (RSS at the end - RSS after warm-up) / RSS after warm-up.
Goals, for an app that embeds the runtime: import < 0.5 s, RSS before loading < 150 MB, growth after warm-up < 5%.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["What color is the circle?", "How many shapes are there?", "Describe the image.", "Is there a red square?"]


def rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / (1 << 20)


def child_import(what: str) -> dict:
    t0 = time.perf_counter()
    if what == "package":
        import runtime  # noqa: F401
    else:
        from runtime.pipeline import Pipeline  # noqa: F401
    return {"import_s": time.perf_counter() - t0, "rss_mb": rss_mb()}


def child_generations(bundle: str, n: int, speculative: bool, warmup: int) -> dict:
    from runtime.pipeline import Pipeline

    before = rss_mb()
    pipe = Pipeline.from_bundle(bundle)
    loaded = rss_mb()
    image = str(ROOT / "examples" / "scene2.png")
    trace = []
    base = None
    for i in range(n):
        images = None if i % 4 == 3 else image  # text-only turns too
        pipe.generate(images, PROMPTS[i % len(PROMPTS)], max_new_tokens=24, speculative=speculative)
        if i + 1 == warmup:
            base = rss_mb()
        if (i + 1) % max(1, n // 10) == 0:
            trace.append(round(rss_mb(), 1))
    end = rss_mb()
    base = base or loaded
    return {"rss_before_load_mb": before, "rss_after_load_mb": loaded, "rss_after_warmup_mb": base, "rss_end_mb": end,
            "growth_after_warmup": (end - base) / base, "trace_mb": trace, "generations": n, "speculative": speculative}


def run_child(*args: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True, env=env, timeout=7200)
    if r.returncode:
        raise SystemExit(f"footprint child {args} failed:\n{r.stderr}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def measure(bundle: str, generations: int, warmup: int, repeats: int = 3) -> dict:
    pkg = [run_child("import", "package") for _ in range(repeats)]
    pipe = [run_child("import", "pipeline") for _ in range(repeats)]
    out = {
        "import_runtime_s": round(sorted(r["import_s"] for r in pkg)[repeats // 2], 4),
        "import_pipeline_s": round(sorted(r["import_s"] for r in pipe)[repeats // 2], 4),
        "rss_after_import_mb": round(max(r["rss_mb"] for r in pipe), 1),
        "runs": {},
    }
    manifest = json.loads((Path(bundle) / "manifest.json").read_text())
    modes = [False] + ([True] if manifest.get("drafter") else [])
    for spec in modes:
        r = run_child("gen", bundle, str(generations), str(int(spec)), str(warmup))
        out["runs"]["speculative" if spec else "plain"] = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}
    first = out["runs"]["plain"]
    out["rss_before_load_mb"] = round(first["rss_before_load_mb"], 1)
    out["rss_after_load_mb"] = round(first["rss_after_load_mb"], 1)
    out["goals"] = {"import_under_0.5s": out["import_pipeline_s"] < 0.5,
                    "rss_before_load_under_150mb": out["rss_before_load_mb"] < 150,
                    "growth_after_warmup_under_5pct": all(r["growth_after_warmup"] < 0.05 for r in out["runs"].values())}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    p.add_argument("--bundle", type=Path)
    p.add_argument("--generations", type=int, default=1000)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args(argv)
    if args.child:
        kind, *rest = args.child
        if kind == "import":
            print(json.dumps(child_import(rest[0])))
        else:
            bundle, n, spec, warmup = rest
            print(json.dumps(child_generations(bundle, int(n), bool(int(spec)), int(warmup))))
        return 0
    if args.bundle is None:
        p.error("--bundle is required")
    out = measure(str(args.bundle), args.generations, min(args.warmup, args.generations))
    from dream_export.reports import emit

    emit(out, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
