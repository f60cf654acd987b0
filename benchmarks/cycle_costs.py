"""What one speculative step costs, in plain decode steps, for a model shape on this machine.

    python benchmarks/cycle_costs.py [--models tiny,smolvlm-256m-shape] [--trees 8,4,2 16,6,2] [--threads 1]

For each model: export it with a DREAM drafter of the same width (random weights, gates open; for the
built-in model its shipped trained drafter when there is one), decode a scene prompt plainly and
speculatively in the same process, and report per tree

  decode_ms       one plain decode step, measured in the plain loop
  step_ms         one speculative step (one-call draft + verify of N + accept + commit), in the loop
  break_even_tau  step_ms / decode_ms: the mean acceptance length at which speculation starts to pay
  speedup@tau     tau * decode_ms / step_ms for the acceptance lengths given with --tau

Random weights accept almost nothing, so the acceptance is an input here (e.g. the one dream-bench
measured on smolvlm-tiny); the costs are measured. Not a test.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from decode import SHAPES, model_dir  # noqa: E402


def build_bundle(name: str, work: Path, tree) -> Path:
    import torch

    from dream_export.drafter.model import DrafterConfig, build_drafter
    from dream_export.export.exporter import ExportOptions, export_bundle, load_target
    from dream_export.presets.smolvlm_tiny import shipped_drafter

    mdir = model_dir(name, work)
    model, processor = load_target(str(mdir))
    shipped = shipped_drafter(mdir) if SHAPES[name] is None else None
    if shipped:
        ddir = shipped
    else:
        torch.manual_seed(0)
        drafter = build_drafter(DrafterConfig.for_target(model.config.text_config), model.lm_head.weight)
        with torch.no_grad():
            drafter.cross.attn_gate.fill_(0.5)
            drafter.cross.mlp_gate.fill_(0.5)
        ddir = work / f"{name}-drafter"
        drafter.save(ddir)
    return export_bundle(model, processor, {"model": name}, ExportOptions(out=work / f"{name}-{tree.total_tokens}-{tree.depth}-{tree.top_k}",
                                                                           drafter=ddir, tree=tree), quiet=True)


def measure(bundle: Path, tree, threads: int, image: Path, tokens: int = 40) -> dict:
    from runtime.pipeline import Pipeline

    pipe = Pipeline.from_bundle(bundle, threads=threads)
    pipe.tree_spec = tree
    prompt = "Describe the image."
    plain, spec = [], []
    for _ in range(3):
        r = pipe.generate([str(image)], prompt, max_new_tokens=tokens, speculative=False)
        plain.append(r.decode_s / max(r.num_new_tokens - 1, 1))
        r = pipe.generate([str(image)], prompt, max_new_tokens=tokens, speculative=True)
        spec.append(r.decode_s / max(len(r.accept_lengths), 1))
    return {"decode_ms": statistics.median(plain) * 1e3, "step_ms": statistics.median(spec) * 1e3}


def main(argv=None) -> int:
    from runtime.tree import TreeSpec

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="tiny,smolvlm-256m-shape")
    ap.add_argument("--trees", nargs="+", default=["8,4,2", "16,6,2"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tau", type=float, nargs="+", default=[3.0, 4.0])
    args = ap.parse_args(argv)
    from dream_export.scenes import random_scene
    import numpy as np

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        image = work / "scene.png"
        random_scene(np.random.default_rng(5)).render().save(image)
        print(f"{'model':22s} {'tree':9s} {'decode_ms':>9s} {'step_ms':>8s} {'break-even tau':>14s} " +
              " ".join(f"speedup@{t:g}" for t in args.tau))
        for name in args.models.split(","):
            for t in args.trees:
                tree = TreeSpec(*(int(x) for x in t.split(",")))
                t0 = time.perf_counter()
                bundle = build_bundle(name, work, tree)
                m = measure(bundle, tree, args.threads, image)
                be = m["step_ms"] / m["decode_ms"]
                print(f"{name:22s} {t:9s} {m['decode_ms']:9.2f} {m['step_ms']:8.2f} {be:14.2f} " +
                      " ".join(f"{tau / be:10.2f}x" for tau in args.tau) + f"   (export+measure {time.perf_counter() - t0:.0f}s)",
                      flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
