"""Device memory a bundle needs on a GPU backend, computed from its manifest, so a Jetson's budget
can be checked before any engine is built there.

What is counted, and how:
- **engines**: the weights of every graph TensorRT builds (vision, decoder, drafter graphs) at the graph's own
  precision, from the manifest's ``weights_bytes`` (an engine holds its weights once; FP32 islands count 4 bytes);
- **embeddings**: the token-embedding table the runtime keeps in host memory (on a Jetson, host and GPU share
  the same DRAM, so it counts);
- **kv**: the target's K/V buffers, preallocated to the context + one verified tree (``engine_plan.Plan.kv_buffers``),
  at the dtype of the decoder's K/V inputs; plus the drafter's caches;
- **activations**: an estimate for the largest call, a prompt prefill of ``prefill`` tokens: logits, hidden and
  MLP rows, and the eager attention's score matrices (what the engine's device memory holds at its peak);
- **runtime**: an assumed allowance for the CUDA context, TensorRT's libraries and the Python process (not
  measured by this project: no Jetson was at hand).
Everything but ``runtime`` follows from the manifest; the assumptions are named in the result.
"""

from __future__ import annotations

import math

from .bundle import DTYPE_BYTES

GIB = 1 << 30
MIB = 1 << 20
RUNTIME_ALLOWANCE = 1.0 * GIB  # assumed: CUDA context + TensorRT + cuBLAS/cuDNN libraries + Python + tokenizer
DEVICES = {
    # name: (memory bytes, what the OS keeps: assumed for a headless JetPack 6 image)
    "orin-nano-8gb": (8 * GIB, 1.5 * GIB),
    "orin-nx-16gb": (16 * GIB, 1.5 * GIB),
    "agx-orin-32gb": (32 * GIB, 2 * GIB),
    "agx-orin-64gb": (64 * GIB, 2 * GIB),
}


def _tree_tokens(manifest: dict) -> int:
    return int((manifest.get("tree") or {"total_tokens": 1})["total_tokens"])


def gpu_graphs(manifest: dict) -> list[str]:
    """The graphs a GPU backend builds engines for."""
    graphs = manifest["graphs"]
    names = [g for g in ("vision", "decoder") if g in graphs]
    info = manifest.get("drafter") or {}
    names += [g for g in (info.get("graph"), info.get("tree_graph")) if g and g in graphs]
    return names


def memory_budget(manifest: dict, context: int | None = None, prefill: int | None = None,
                  device: str = "orin-nano-8gb") -> dict:
    """Bytes per component for running the bundle on a GPU backend with a context of ``context`` positions
    (default: the manifest's max_positions, what the runtime preallocates) and a largest prompt of ``prefill``
    tokens (default: min(context, 1024)); whether it fits ``device``."""
    if device not in DEVICES:
        raise ValueError(f"device {device!r}: expected one of {', '.join(DEVICES)}")
    text = manifest["text"]
    graphs = manifest["graphs"]
    ctx = int(context or text["max_positions"])
    if ctx < 1:
        raise ValueError(f"context {ctx}: expected at least 1 position")
    q = int(prefill or min(ctx, 1024))
    missing = [g for g in gpu_graphs(manifest) if "weights_bytes" not in graphs[g]]
    if missing:
        raise ValueError(f"graphs {missing} have no weights_bytes in the manifest: re-export with this version")
    engines = {g: int(graphs[g]["weights_bytes"]) for g in gpu_graphs(manifest)}
    emb = manifest.get("embeddings") or {}
    embeddings = math.prod(emb.get("shape", [0])) * DTYPE_BYTES.get(emb.get("dtype", "float32"), 4)
    dec = graphs["decoder"]
    past = next(t for t in dec["inputs"] if t["name"] == dec["kv"]["past_key"][0])
    kv_dtype = past["dtype"]
    cap = ctx + _tree_tokens(manifest)
    L, kvh, hd = int(text["num_layers"]), int(text["kv_heads"]), int(text["head_dim"])
    kv = 2 * L * kvh * hd * DTYPE_BYTES[kv_dtype] * cap
    draft_kv = 0
    info = manifest.get("drafter") or {}
    if info.get("graph") in graphs:
        tree = manifest.get("tree") or {}
        scratch = _tree_tokens(manifest) + int(tree.get("depth", 1)) * int(tree.get("top_k", 1))
        for t in graphs[info["graph"]]["inputs"]:
            if t["name"] in graphs[info["graph"]].get("past", []):
                draft_kv += int(t["shape"][1]) * int(t["shape"][3]) * DTYPE_BYTES[t["dtype"]] * (cap + scratch)
    H, V = int(text["hidden_size"]), int(text["vocab_size"])
    heads = int(text.get("num_heads") or 3 * kvh)
    inter = int(text.get("intermediate_size") or 4 * H)
    total = min(ctx, q)
    act = 4 * q * (V + 4 * H + 2 * inter) + 4 * 2 * heads * q * total  # logits, rows, MLP; scores + softmax
    parts = {"engines": sum(engines.values()), "embeddings": embeddings, "kv": kv, "drafter_kv": draft_kv,
             "activations": act, "runtime": int(RUNTIME_ALLOWANCE)}
    mem, os_keeps = DEVICES[device]
    need = sum(parts.values())
    available = mem - os_keeps
    return {
        "device": device, "context": ctx, "prefill": q, "precision": manifest.get("precision", "fp32"),
        "kv_dtype": kv_dtype,
        "mib": {k: round(v / MIB, 1) for k, v in parts.items()},
        "engines_mib": {g: round(b / MIB, 1) for g, b in engines.items()},
        "total_mib": round(need / MIB, 1),
        "available_mib": round(available / MIB, 1),
        "fits": need <= available,
        "assumed": {"runtime_mib": round(RUNTIME_ALLOWANCE / MIB), "os_mib": round(os_keeps / MIB),
                    "activations": "estimated for a prefill of `prefill` tokens with eager attention"},
    }


def max_context(manifest: dict, device: str = "orin-nano-8gb", prefill: int = 1024) -> int:
    """The longest context (positions, a multiple of 256) that fits ``device``; 0 when none does."""
    best, lo, hi = 0, 1, int(manifest["text"]["max_positions"]) // 256
    while lo <= hi:
        mid = (lo + hi) // 2
        if memory_budget(manifest, mid * 256, min(prefill, mid * 256), device)["fits"]:
            best, lo = mid * 256, mid + 1
        else:
            hi = mid - 1
    return best
