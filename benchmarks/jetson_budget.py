"""Memory budgets on Jetson for SmolVLM-256M / 500M / 2B at FP16 and INT8: computed, not measured (no Jetson here).

The checkpoints cannot be downloaded here, so each one's manifest fields are derived from its published config
(the values below, typed from the checkpoints' config.json) by dream_export.budget.manifest_from_config, which is
tested against real exports (tests/test_budget.py); runtime.budget.memory_budget then computes the budget exactly
as `dream-build-engines --bundle B --budget` does for a real bundle.

    python benchmarks/jetson_budget.py [--device orin-nano-8gb] [--json docs/jetson_budget.json]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CHECKPOINTS = {
    # HuggingFaceTB/SmolVLM-256M-Instruct: SmolLM2-135M-shaped text model, SigLIP-B/16 at 512 px
    "SmolVLM-256M": dict(text=dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                                   num_key_value_heads=3, vocab_size=49280, max_position_embeddings=8192),
                         vision=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                                     image_size=512, patch_size=16), scale_factor=4),
    # HuggingFaceTB/SmolVLM-500M-Instruct: SmolLM2-360M-shaped text model, the same vision tower
    "SmolVLM-500M": dict(text=dict(hidden_size=960, intermediate_size=2560, num_hidden_layers=32, num_attention_heads=15,
                                   num_key_value_heads=5, vocab_size=49280, max_position_embeddings=8192),
                         vision=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                                     image_size=512, patch_size=16), scale_factor=4),
    # HuggingFaceTB/SmolVLM-Instruct (2B): SmolLM2-1.7B-shaped text model, SigLIP-SO400M/14 at 384 px
    "SmolVLM-2B": dict(text=dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=32,
                                 num_key_value_heads=32, vocab_size=49155, max_position_embeddings=16384),
                       vision=dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                                   image_size=384, patch_size=14), scale_factor=3),
}
CONTEXTS = (2048, 4096)


def config_for(spec: dict):
    from transformers import Idefics3Config

    return Idefics3Config(text_config={"model_type": "llama", **spec["text"]}, vision_config=spec["vision"],
                          scale_factor=spec["scale_factor"])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="orin-nano-8gb")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    from dream_export.budget import manifest_from_config
    from dream_export.reports import emit
    from runtime.budget import max_context, memory_budget

    rows = []
    for name, spec in CHECKPOINTS.items():
        for precision in ("fp16", "int8"):
            m = manifest_from_config(config_for(spec), precision)
            params = m["parameters"]
            for ctx in CONTEXTS:
                b = memory_budget(m, ctx, device=args.device)
                rows.append({"model": name, "precision": precision, "context": ctx,
                             "parameters_m": round(params["total"] / 1e6, 1), "drafter_parameters_m": round(params["drafter"] / 1e6, 1),
                    **{f"{k}_mib": v for k, v in b["mib"].items()}, "total_mib": b["total_mib"],
                    "available_mib": b["available_mib"], "fits": b["fits"],
                    "longest_context_that_fits": max_context(m, args.device)})
    print(f"| model | precision | context | engines | K/V (+drafter) | activations | total (MiB) | fits {args.device} "
          f"({rows[0]['available_mib']:.0f} MiB) | longest context that fits |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['precision']} | {r['context']} | {r['engines_mib']:.0f} | "
              f"{r['kv_mib'] + r['drafter_kv_mib']:.0f} | {r['activations_mib']:.0f} | {r['total_mib']:.0f} | "
              f"{'yes' if r['fits'] else 'no'} | {r['longest_context_that_fits']} |")
    report = {"what": "device memory on a Jetson per SmolVLM checkpoint, precision and context (runtime.budget); "
                      "configs typed from the checkpoints' config.json; runtime (CUDA + TensorRT + Python) and OS "
                      "allowances assumed, not measured", "device": args.device,
              "command": "python benchmarks/jetson_budget.py --json docs/jetson_budget.json", "rows": rows}
    emit(report, args.json, quiet=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
