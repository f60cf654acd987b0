"""``dream-build-engines --bundle B``: build a bundle's TensorRT engines ahead of time, on the GPU that will run them
(``dream-run --backend trt`` builds missing ones at first start, with a progress line)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .backends.engine_plan import Plan, profile_shapes
from .backends.select import resolve_backend
from .budget import max_context, memory_budget
from .bundle import Bundle
from .errors import RuntimeErrorBase


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dream-build-engines",
        description="Build the TensorRT engines of a bundle on this GPU, into the bundle's "
                    "engines/<gpu>-sm<cc>-trt<version>-<precision>/ folder (reused until the graph, GPU or TensorRT "
                    "changes). The precision is the bundle's own (dream-export --precision): it lives in the graphs.")
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--device", type=int, default=0, help="CUDA device id")
    p.add_argument("--workspace-gb", type=float, default=None, help="TensorRT builder workspace limit (default: TensorRT's)")
    p.add_argument("--graph", action="append", default=None, help="only this graph (repeatable; default: all)")
    p.add_argument("--force", action="store_true", help="rebuild even when a matching engine exists")
    s = p.add_argument_group("optimization profiles (no GPU or TensorRT needed)")
    s.add_argument("--print-profiles", action="store_true",
                   help="print every graph's optimization profiles (min/opt/max shape of each input) and exit")
    s.add_argument("--json", action="store_true",
                   help="with --print-profiles: as JSON, {graph: [{input: {min, opt, max}}, ... one per profile]}")
    b = p.add_argument_group("memory budget (no GPU or TensorRT needed)")
    b.add_argument("--budget", action="store_true",
                   help="print the device memory the bundle needs (engines, K/V, activations, runtime) and exit")
    b.add_argument("--device-model", default="orin-nano-8gb", help="orin-nano-8gb (default), orin-nx-16gb, agx-orin-32gb, agx-orin-64gb")
    b.add_argument("--context", type=int, default=None, help="context positions (default: the model's maximum)")
    return p


def profiles_text(bundle_path: Path, as_json: bool) -> str:
    """The bundle's TensorRT optimization profiles, from its manifest alone (``engine_plan.Plan``)."""
    plan = Plan.from_manifest(Bundle.load(bundle_path).manifest)
    table = {g: profile_shapes(plan, g) for g in plan.profiles}
    if as_json:
        return json.dumps(table, indent=1)
    lines = []
    for g, profs in table.items():
        for prof, shapes in zip(plan.profiles[g], profs):
            lines.append(f"{g} / {prof.name}:")
            lines += [f"  {name}: min {tuple(s['min'])}  opt {tuple(s['opt'])}  max {tuple(s['max'])}"
                      for name, s in shapes.items()]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.workspace_gb is not None and args.workspace_gb <= 0:
            raise ValueError(f"--workspace-gb {args.workspace_gb}: expected a positive number of GiB")
        if not (args.bundle / "manifest.json").is_file():
            raise RuntimeErrorBase(f"{args.bundle}: not a bundle folder (no manifest.json); expected a dream-export output")
        if args.json and not args.print_profiles:
            raise ValueError("--json goes with --print-profiles (the build report is JSON already)")
        if args.print_profiles:
            print(profiles_text(args.bundle, args.json))
            return 0
        if args.budget:
            manifest = Bundle.load(args.bundle).manifest
            report = memory_budget(manifest, args.context, device=args.device_model)
            report["longest_context_that_fits"] = max_context(manifest, args.device_model)
            print(json.dumps(report, indent=1))
            return 0
        resolve_backend("trt")  # one line naming what is missing, before anything is written
        from .backends.trt import build_engines  # the TensorRT layer: imported only when engines are built

        report = build_engines(args.bundle, device_id=args.device, workspace_gb=args.workspace_gb, graphs=args.graph,
                               force=args.force)
    except (RuntimeErrorBase, ValueError) as exc:
        print(f"dream-build-engines: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
