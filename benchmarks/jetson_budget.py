"""Memory budgets on Jetson for SmolVLM-256M / 500M / 2B at FP16 and INT8: computed, not measured (no Jetson here).

The checkpoints cannot be downloaded here, so each one's manifest fields are derived from its published config
(the values below, typed from the checkpoints' config.json) by ``manifest_from_config`` below, which is tested
against real exports (tests/test_budget.py); runtime.budget.memory_budget then computes the budget exactly as
`dream-build-engines --bundle B --budget` does for a real bundle.

``manifest_from_config``: the manifest fields ``runtime.budget`` reads, derived from a model's config without
exporting it (parameters counted on PyTorch's meta device), by the exporter's own precision rules:
- fp32: every weight 4 bytes;
- fp16 (export/precision.py): weights 2 bytes, the LM head 4 (its Gemm stays FP32); measured outlier islands of
  real weights (export/precision.py) add FP32 MatMuls that a config cannot predict, so this is a lower bound;
- int8 (calibration/int8.py): MatMul weights 1 byte (+ per-channel scales), everything else as the FP32 graph
  it came from (4 bytes), the LM head 4.

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



LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "out_proj", "gate_proj", "up_proj", "down_proj", "fc1", "fc2", "proj")


def _counts(model) -> dict:
    """Parameter counts by role: vision (matmul / other), text linear, text other, embeddings, head."""
    out = dict(vision_matmul=0, vision_other=0, text_matmul=0, text_other=0, embed=0, head=0, total=0)
    for name, p in model.named_parameters():
        n = p.numel()
        out["total"] += n
        leaf = name.rsplit(".", 2)[-2] if name.count(".") >= 1 else name
        is_linear = name.endswith(".weight") and leaf in LINEAR_NAMES and p.dim() == 2
        if name.startswith("lm_head"):
            out["head"] += n
        elif "embed_tokens" in name:
            out["embed"] += n
        elif "vision_model" in name or "connector" in name:
            out["vision_matmul" if is_linear else "vision_other"] += n
        else:
            out["text_matmul" if is_linear else "text_other"] += n
    return out


def weights_bytes(counts: dict, precision: str) -> dict:
    """Bytes of the vision and decoder graphs at ``precision`` from parameter counts (see the module rules)."""
    if precision == "fp32":
        return {"vision": 4 * (counts["vision_matmul"] + counts["vision_other"]),
                "decoder": 4 * (counts["text_matmul"] + counts["text_other"] + counts["head"])}
    if precision == "fp16":
        return {"vision": 2 * (counts["vision_matmul"] + counts["vision_other"]),
                "decoder": 2 * (counts["text_matmul"] + counts["text_other"]) + 4 * counts["head"]}
    if precision == "int8":
        return {"vision": counts["vision_matmul"] + 4 * counts["vision_other"],
                "decoder": counts["text_matmul"] + 4 * (counts["text_other"] + counts["head"])}
    raise ValueError(f"precision {precision!r}: expected fp32, fp16 or int8")


def manifest_from_config(config, precision: str, tree: dict | None = None, drafter: bool = True) -> dict:
    """The manifest fields runtime.budget.memory_budget reads, for an Idefics3 ``config`` exported at
    ``precision`` with a DREAM drafter (FP16 draft graphs for an FP16/INT8 target, as dream-export does)."""
    import torch
    from transformers import Idefics3ForConditionalGeneration

    from dream_export.drafter.model import DrafterConfig, build_drafter

    with torch.device("meta"):
        model = Idefics3ForConditionalGeneration(config)
    counts = _counts(model)
    if counts["head"] == 0:  # a tied head: the bundle stores it once, but the decoder's engine holds it as weights
        counts["head"] = counts["embed"]
    t = config.text_config
    kvh = t.num_key_value_heads or t.num_attention_heads
    hd = getattr(t, "head_dim", None) or t.hidden_size // t.num_attention_heads
    wb = weights_bytes(counts, precision)
    past = [{"name": f"past_key_{i}", "dtype": "float32", "shape": [1, "past_len", kvh, hd]} for i in range(1)]
    graphs = {"vision": {"weights_bytes": wb["vision"], "inputs": []},
              "decoder": {"weights_bytes": wb["decoder"], "inputs": past, "kv": {"past_key": ["past_key_0"]}}}
    manifest = {
        "precision": precision,
        "text": {"hidden_size": t.hidden_size, "vocab_size": t.vocab_size, "num_layers": t.num_hidden_layers,
                 "kv_heads": kvh, "head_dim": hd, "max_positions": t.max_position_embeddings,
                 "num_heads": t.num_attention_heads, "intermediate_size": t.intermediate_size},
        "graphs": graphs,
        "embeddings": {"shape": [t.vocab_size, t.hidden_size], "dtype": "float32"},
        "tree": tree or {"total_tokens": 32, "depth": 6, "top_k": 4},
        "drafter": None,
        "parameters": counts,
    }
    if drafter:
        dcfg = DrafterConfig.for_target(t)
        with torch.device("meta"):
            head = torch.empty(t.vocab_size, t.hidden_size)
            d = build_drafter(dcfg, head)
        own = sum(p.numel() for n, p in d.named_parameters() if "lm_head" not in n and "embed" not in n)
        fbytes = 4 if precision == "fp32" else 2
        head_b = 4 * t.vocab_size * t.hidden_size  # the draft head's Gemm stays FP32
        names = ("b0_key", "b0_value", "b2_key", "b2_value", "mem_key", "mem_value")
        dpast = [{"name": n, "dtype": "float32", "shape": [1, h, "past_len", e]} for n, (h, e) in zip(names, d.past_shapes())]
        graphs["drafter"] = {"weights_bytes": fbytes * own + head_b, "inputs": dpast, "past": list(names)}
        graphs["draft_tree"] = {"weights_bytes": fbytes * own + head_b + fbytes * t.vocab_size * t.hidden_size,
                                "inputs": dpast, "past": list(names)}
        manifest["drafter"] = {"graph": "drafter", "tree_graph": "draft_tree"}
        manifest["parameters"]["drafter"] = own
    return manifest


def config_for(spec: dict):
    from transformers import Idefics3Config

    return Idefics3Config(text_config={"model_type": "llama", **spec["text"]}, vision_config=spec["vision"],
                          scale_factor=spec["scale_factor"])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="orin-nano-8gb")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
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
