"""The manifest fields ``runtime.budget`` reads, derived from a model's config without exporting it (parameters
counted on PyTorch's meta device), by the exporter's own precision rules. For memory tables of checkpoints that
cannot be downloaded here (SmolVLM-256M / 500M / 2B); tested against real exports of small models.

Rules, as the exporter writes graphs:
- fp32: every weight 4 bytes;
- fp16 (export/precision.py): weights 2 bytes, the LM head 4 (its Gemm stays FP32); measured outlier islands of
  real weights (export/precision.py) add FP32 MatMuls that a config cannot predict, so this is a lower bound;
- int8 (calibration/int8.py): MatMul weights 1 byte (+ per-channel scales), everything else as the FP32 graph
  it came from (4 bytes), the LM head 4.
"""

from __future__ import annotations

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

    from .drafter.model import DrafterConfig, build_drafter

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
