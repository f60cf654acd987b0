"""The ORT-CPU one-call draft graph, written node by node (not traced) for the DREAM drafter.

Same inputs, outputs and tree search as ``draft_tree.DraftTreeGraph`` (the catch-up, then the EAGLE-2 expansion
unrolled to depth D and top-K), with about a third of the traced graph's nodes: on a CPU the traced graph's
~460 kernels per call (most of them shape arithmetic) cost more than its arithmetic. Written like the target's
``cpu_decoder``:

- packed projections (QKV of the self-attention blocks, K/V of the cross-attention, gate/up of every MLP) as
  ``MatMulNBits`` with int8 compute, the draft head included; the gates' ``tanh`` folded into the weights they
  scale;
- ``SkipSimplifiedLayerNormalization`` for every norm after the first;
- self-attention as ``GroupQueryAttention`` over the caches with the tree mask as ``attention_bias`` and
  ``causal=0``. Rotary runs before it (``RotaryEmbedding`` with the explicit positions): GroupQueryAttention
  ignores ``position_ids`` when its past is empty, and the drafter's positions skip the image tokens it does
  not keep;
- the cross-attention (queries and memory of different lengths, which GroupQueryAttention does not take) as
  MatMul / Softmax / MatMul with the query heads grouped per K/V head, so K/V are never repeated.

The drafter's output is a proposal the target verifies, so this graph needs no bitwise agreement with anything;
at export it is built once at fp32 and checked against the PyTorch drafter (candidates and parents identical),
then at the drafter's precision against that build.

Only the DREAM architecture (``arch == "dream"``); the EAGLE-style ablation keeps the traced graph.
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper

from .cpu_decoder import MS, GraphBuilder
from .draft_tree import num_candidates
from .specs import GraphSpec


def unsupported(drafter) -> str | None:
    """Why this drafter cannot use the written graph (None: it can)."""
    if getattr(drafter.config, "arch", "dream") != "dream":
        return f"drafter arch {drafter.config.arch!r} (written for 'dream')"
    mods = []
    for block in (drafter.block0, drafter.block2):
        a, m = block.self_attn, block.mlp
        mods += [a.q_proj, a.k_proj, a.v_proj, a.o_proj, m.gate_proj, m.up_proj, m.down_proj]
    c = drafter.cross
    mods += [c.q_proj, c.k_proj, c.v_proj, c.o_proj, c.mlp.gate_proj, c.mlp.up_proj, c.mlp.down_proj]
    if any(getattr(m, "bias", None) is not None for m in mods):
        return "biases in the projections"
    if str(getattr(drafter.config, "hidden_act", "silu")) != "silu":
        return "an MLP activation other than silu"
    return None


def _np(t) -> np.ndarray:
    return t.detach().float().numpy()


def _t(lin, scale: float = 1.0) -> np.ndarray:
    """A Linear's weight as the ``[in, out]`` matrix MatMul takes (times ``scale``)."""
    return np.ascontiguousarray(_np(lin.weight).T * np.float32(scale))


def drafter_weights(drafter, embed_weight, embed_scale: float) -> dict:
    """Everything the graph needs from a DreamDrafter, as numpy arrays."""
    import torch

    cfg = drafter.config

    def block(layer, input_norm: bool):
        a, m = layer.self_attn, layer.mlp
        return {"qkv": np.concatenate([_t(a.q_proj), _t(a.k_proj), _t(a.v_proj)], axis=1), "o": _t(a.o_proj),
                "gate_up": np.concatenate([_t(m.gate_proj), _t(m.up_proj)], axis=1), "down": _t(m.down_proj),
                "ln1": _np(layer.input_layernorm.weight) if input_norm else None,
                "ln2": _np(layer.post_attention_layernorm.weight), "scale": float(a.scaling)}

    c = drafter.cross
    attn_gate, mlp_gate = float(torch.tanh(c.attn_gate).item()), float(torch.tanh(c.mlp_gate).item())
    d2t = np.asarray(cfg.draft_vocab, np.int64) if cfg.draft_vocab else None
    rows = _np(embed_weight) * np.float32(embed_scale)
    max_pos = int(cfg.max_position_embeddings)
    with torch.no_grad():  # the drafter's own rotary module (its scaling rules included), positions 0..max-1
        cos, sin = drafter.rotary(torch.zeros(1, 1, cfg.head_dim), torch.arange(max_pos)[None])
    half = cfg.head_dim // 2
    return {
        "block0": block(drafter.block0, input_norm=False), "block2": block(drafter.block2, input_norm=True),
        "cross": {"norm": _np(c.norm.weight), "q": _t(c.q_proj), "kv": np.concatenate([_t(c.k_proj), _t(c.v_proj)], axis=1),
                  "q_norm": _np(c.q_norm.weight), "k_norm": _np(c.k_norm.weight), "o": _t(c.o_proj, attn_gate),
                  "mlp_norm": _np(c.mlp_norm.weight), "gate_up": np.concatenate([_t(c.mlp.gate_proj), _t(c.mlp.up_proj)], axis=1),
                  "down": _t(c.mlp.down_proj, mlp_gate)},
        "norm": _np(drafter.norm.weight), "head": np.ascontiguousarray(_np(drafter.lm_head_weight).T),
        "embed": np.ascontiguousarray(rows[d2t] if d2t is not None else rows), "d2t": d2t,
        "cos": np.ascontiguousarray(_np(cos[0, :, :half])), "sin": np.ascontiguousarray(_np(sin[0, :, :half])),
        "eps": float(cfg.rms_norm_eps), "heads": int(cfg.num_heads), "kv_heads": int(cfg.num_kv_heads),
        "head_dim": int(cfg.head_dim), "intermediate": int(cfg.intermediate_size),
    }


class _Writer:
    """One drafter pass after another into one graph (``GraphBuilder`` underneath)."""

    def __init__(self, w: dict, bits: int | None, mask_min: float):
        self.b = GraphBuilder()
        self.w, self.bits, self.mask_min = w, bits, float(mask_min)
        b = self.b
        self.nh, self.kvh, self.hd = w["heads"], w["kv_heads"], w["head_dim"]
        self.cos, self.sin = b.init("cos_cache", w["cos"]), b.init("sin_cache", w["sin"])
        self._consts: dict[str, np.ndarray] = {}
        self.zero, self.one, self.big = self.i64("c0", [0]), self.i64("c1", [1]), self.i64("cbig", [2**62])
        self.last = self.i64("cm1", [-1])
        self.axis1, self.axis2 = self.i64("ax1", [1]), self.i64("ax2", [2])
        self.seq_axis = self.i64("ax_seq", [2])

    def i64(self, name: str, values) -> str:
        """An int64 constant, made once per name."""
        arr = np.array(values, np.int64)
        if name in self._consts:
            assert np.array_equal(self._consts[name], arr), name
            return name
        self._consts[name] = arr
        return self.b.init(name, arr)

    # --- pieces ---------------------------------------------------------------------------------------
    def linear(self, x: str, key: str, w: np.ndarray) -> str:
        """The same weights in every pass: quantized once, shared by each pass's node."""
        return self.b.linear(x, w, key, self.bits, self.bits == 8, node=f"{key}_{self.b.n}")

    def weight(self, key: str, arr: np.ndarray) -> str:
        return self.b.init(key, arr)

    def skip_norm(self, residual: str, x: str, key: str, weight: np.ndarray, out: str | None = None) -> tuple[str, str]:
        """(norm(residual + x), residual + x)."""
        outs = [out or f"{key}/normed_{self.b.n}", "", "", f"{key}/sum_{self.b.n}"]
        got = self.b.op("SkipSimplifiedLayerNormalization", [residual, x, self.weight(key, weight)], outs, MS,
                        epsilon=self.w["eps"])
        return got[0], got[3]

    def mlp(self, x: str, key: str, weights: dict) -> str:
        b = self.b
        inter = self.w["intermediate"]
        gate, up = b.op("Split", [self.linear(x, f"{key}.gate_up", weights["gate_up"]), self.i64("split_mlp", [inter, inter])],
                        2, axis=-1)
        act = b.op("Mul", [b.op("Mul", [gate, b.op("Sigmoid", [gate])[0]])[0], up])[0]
        return self.linear(act, f"{key}.down", weights["down"])

    def lengths(self, past: str, new_rows: int | str) -> tuple[str, str]:
        """GroupQueryAttention's seqlens_k ([1] int32: total - 1) and total_sequence_length (scalar int32)."""
        b = self.b
        p = b.op("Slice", [b.op("Shape", [past])[0], self.seq_axis, self.i64("c3", [3]), self.zero])[0]
        q = new_rows if isinstance(new_rows, str) else self.i64(f"rows_{new_rows}", [new_rows])
        total = b.op("Add", [p, q])[0]
        seqlens = b.op("Cast", [b.op("Sub", [total, self.one])[0]], to=TensorProto.INT32)[0]
        total32 = b.op("Cast", [b.op("Squeeze", [total])[0]], to=TensorProto.INT32)[0]
        return seqlens, total32

    def self_attention(self, x: str, key: str, weights: dict, pos: str, bias: str, past_k: str, past_v: str,
                       lengths) -> tuple[str, str, str]:
        b = self.b
        nh, kvh, hd = self.nh, self.kvh, self.hd
        q, k, v = b.op("Split", [self.linear(x, f"{key}.qkv", weights["qkv"]),
                                 self.i64("split_qkv", [nh * hd, kvh * hd, kvh * hd])], 3, axis=-1)
        q = b.op("RotaryEmbedding", [q, pos, self.cos, self.sin], 1, MS, num_heads=nh, interleaved=0)[0]
        k = b.op("RotaryEmbedding", [k, pos, self.cos, self.sin], 1, MS, num_heads=kvh, interleaved=0)[0]
        attn, pk, pv = b.op("GroupQueryAttention", [q, k, v, past_k, past_v, *lengths, "", "", "", bias], 3, MS,
                            num_heads=nh, kv_num_heads=kvh, scale=weights["scale"], causal=0, do_rotary=0)
        return self.linear(attn, f"{key}.o", weights["o"]), pk, pv

    def memory_kv(self, memory: str) -> tuple[str, str]:
        """New memory rows -> k (k_norm'd), v as [1, kvh, M, hd]."""
        b, c = self.b, self.w["cross"]
        kvh, hd = self.kvh, self.hd
        k, v = b.op("Split", [self.linear(memory, "cross.kv", c["kv"]), self.i64("split_kv", [kvh * hd, kvh * hd])], 2, axis=-1)
        heads = self.i64("shape_kv_heads", [0, 0, kvh, hd])
        k = b.op("SimplifiedLayerNormalization", [b.op("Reshape", [k, heads])[0], self.weight("cross.k_norm", c["k_norm"])],
                 axis=-1, epsilon=self.w["eps"], stash_type=1)[0]
        k = b.op("Transpose", [k], perm=[0, 2, 1, 3])[0]
        v = b.op("Transpose", [b.op("Reshape", [v, heads])[0]], perm=[0, 2, 1, 3])[0]
        return k, v

    def cross_attention(self, x: str, keys: str, values: str, bias: str, has_memory: str | None) -> str:
        b, c = self.b, self.w["cross"]
        nh, kvh, hd = self.nh, self.kvh, self.hd
        q = b.op("Reshape", [self.linear(x, "cross.q", c["q"]), self.i64("shape_q_heads", [0, 0, nh, hd])])[0]
        q = b.op("SimplifiedLayerNormalization", [q, self.weight("cross.q_norm", c["q_norm"])], axis=-1,
                 epsilon=self.w["eps"], stash_type=1)[0]
        # [1, S, nh, hd] -> [1, nh, S, hd] -> [1, kvh, g*S, hd]: the g query heads of one K/V head as rows
        q = b.op("Reshape", [b.op("Transpose", [q], perm=[0, 2, 1, 3])[0], self.i64("shape_q_groups", [1, kvh, -1, hd])])[0]
        scores = b.op("FusedMatMul", [q, keys], 1, MS, transA=0, transB=1, alpha=hd ** -0.5)[0]
        tiled = b.op("Tile", [bias, self.i64("tile_groups", [1, 1, nh // kvh, 1])])[0]
        probs = b.op("Softmax", [b.op("Add", [scores, tiled])[0]], axis=-1)[0]
        out = b.op("MatMul", [probs, values])[0]                                         # [1, kvh, g*S, hd]
        out = b.op("Transpose", [b.op("Reshape", [out, self.i64("shape_heads", [1, nh, -1, hd])])[0]], perm=[0, 2, 1, 3])[0]
        out = b.op("Reshape", [out, self.i64("shape_hidden", [0, 0, nh * hd])])[0]
        if has_memory is not None:
            out = b.op("Mul", [out, has_memory])[0]
        return self.linear(out, "cross.o", c["o"])

    def drafter_pass(self, embeds: str, pos: str, self_bias: str, memory: str, cross_bias: str, past: dict,
                     new_rows: int | str, has_memory: str | None) -> dict:
        """One DreamDrafter forward: returns features [1, S, H] and the caches after the pass (self: past + S rows;
        memory: past + the new rows), plus the new memory rows alone."""
        w = self.w
        b0, cr, b2 = w["block0"], w["cross"], w["block2"]
        lengths = self.lengths(past["b0_key"], new_rows)
        o, k0, v0 = self.self_attention(embeds, "block0", b0, pos, self_bias, past["b0_key"], past["b0_value"], lengths)
        x, res = self.skip_norm(embeds, o, "block0.ln2", b0["ln2"])
        x, res = self.skip_norm(res, self.mlp(x, "block0", b0), "cross.norm", cr["norm"])
        mk, mv = self.memory_kv(memory)
        keys = self.b.op("Concat", [past["mem_key"], mk], axis=2)[0]
        values = self.b.op("Concat", [past["mem_value"], mv], axis=2)[0]
        x, res = self.skip_norm(res, self.cross_attention(x, keys, values, cross_bias, has_memory), "cross.mlp_norm",
                                cr["mlp_norm"])
        x, res = self.skip_norm(res, self.mlp(x, "cross", cr), "block2.ln1", b2["ln1"])
        o, k2, v2 = self.self_attention(x, "block2", b2, pos, self_bias, past["b2_key"], past["b2_value"], lengths)
        x, res = self.skip_norm(res, o, "block2.ln2", b2["ln2"])
        feats, _ = self.skip_norm(res, self.mlp(x, "block2", b2), "norm", w["norm"])
        return {"features": feats, "b0_key": k0, "b0_value": v0, "b2_key": k2, "b2_value": v2, "mem_key": keys,
                "mem_value": values, "new_mem_key": mk, "new_mem_value": mv}

    def top_k(self, features: str, k: int) -> tuple[str, str]:
        """Top-k of the draft head's log-softmax per row: values, draft ids ([rows, k] each)."""
        b = self.b
        logits = self.linear(features, "head", self.w["head"])
        flat = b.op("Reshape", [logits, self.i64("shape_rows_vocab", [-1, self.w["head"].shape[1]])])[0]
        return b.op("TopK", [b.op("LogSoftmax", [flat], axis=-1)[0], self.i64(f"k_{k}", [k])], 2, axis=-1)

    def to_target(self, ids: str) -> str:
        d2t = self.w["d2t"]
        return ids if d2t is None else self.b.op("Gather", [self.weight("d2t", d2t), ids], axis=0)[0]


def build_cpu_draft_tree(w: dict, spec: GraphSpec, path, bits: int | None) -> GraphSpec:
    """Write ``spec``'s draft-tree graph (``draft_tree_spec``'s inputs and outputs) to ``path``; ``bits`` None: fp32
    MatMuls, 8 or 4: MatMulNBits with int8 compute."""
    depth, k = int(spec.extra["depth"]), int(spec.extra["top_k"])
    wr = _Writer(w, bits, spec.extra["mask_min"])
    b, i64 = wr.b, wr.i64
    past = {n: f"past_{n}" for n in ("b0_key", "b0_value", "b2_key", "b2_value", "mem_key", "mem_value")}
    # catch-up: the accepted tokens; a query with no memory to attend (the prompt's first) gets no cross update
    rows = b.op("Slice", [b.op("Shape", ["inputs_embeds"])[0], wr.one, i64("c2", [2]), wr.zero])[0]
    has_memory = b.op("Cast", [b.op("Greater", [b.op("ReduceMax", ["cross_mask"], axes=[-1], keepdims=1)[0],
                                                b.init("c_minus1", np.array(-1.0, np.float32))])[0]], to=TensorProto.FLOAT)[0]
    has_memory = b.op("Reshape", [has_memory, i64("shape_rows_1", [1, -1, 1])])[0]
    out = wr.drafter_pass("inputs_embeds", "position_ids", "attention_mask", "memory", "cross_mask", past, rows, has_memory)
    presents = {}
    for name in ("b0_key", "b0_value", "b2_key", "b2_value"):  # only the catch-up's rows go back to the runtime
        start = b.op("Slice", [b.op("Shape", [past[name]])[0], wr.seq_axis, i64("c3", [3]), wr.zero])[0]
        presents[name] = b.op("Slice", [out[name], start, wr.big, wr.axis2], [f"present_{name}"])[0]
    b.op("Identity", [out["new_mem_key"]], ["present_mem_key"])
    b.op("Identity", [out["new_mem_value"]], ["present_mem_value"])

    # level 1: the root (the last catch-up query) and its top-K children
    root_feat = b.op("Slice", [out["features"], wr.last, wr.big, wr.axis1])[0]                # [1, 1, H]
    vals, idx = wr.top_k(root_feat, k)
    f_score = b.op("Reshape", [vals, wr.last])[0]
    f_idx = b.op("Reshape", [idx, wr.last])[0]
    tokens, scores, parents = [wr.to_target(f_idx)], [f_score], [i64("parents_1", np.full(k, -1))]
    f_cand = i64("cand_1", np.arange(k))
    eye = np.where(np.eye(k, dtype=bool), 0.0, spec.extra["mask_min"]).astype(np.float32)
    anc = b.init("tree_eye", eye)                       # frontier x tree self rows, additive: own row and ancestors
    slot_of = i64("slot_of", np.repeat(np.arange(k), k))  # candidate -> its parent's frontier slot
    pending = root_feat
    caches = {n: out[n] for n in ("b0_key", "b0_value", "b2_key", "b2_value", "mem_key", "mem_value")}
    root_pos = b.op("Slice", ["position_ids", wr.last, wr.big, wr.axis1])[0]                  # [1, 1]
    if depth > 1:
        s0 = b.op("Slice", [b.op("Shape", [caches["b0_key"]])[0], wr.seq_axis, i64("c3", [3]), wr.zero])[0]
        m0 = b.op("Slice", [b.op("Shape", [caches["mem_key"]])[0], wr.seq_axis, i64("c3", [3]), wr.zero])[0]
        zero_f = dict(value=helper.make_tensor("zero", TensorProto.FLOAT, [1], [0.0]))
        kk = i64("c_k", [k])
        seen_self = b.op("ConstantOfShape", [b.op("Concat", [kk, s0], axis=0)[0]], **zero_f)[0]
        seen_mem = b.op("ConstantOfShape", [b.op("Concat", [kk, b.op("Add", [m0, wr.one])[0]], axis=0)[0]], **zero_f)[0]
        as_4d = i64("ax01", [0, 1])
    for d in range(2, depth + 1):
        emb = b.op("Unsqueeze", [b.op("Gather", [wr.weight("embed", w["embed"]), f_idx], axis=0)[0], wr.zero])[0]
        pos = b.op("Expand", [b.op("Add", [root_pos, i64(f"depth_{d}", [d - 1])])[0], i64("shape_1k", [1, k])])[0]
        self_bias = b.op("Unsqueeze", [b.op("Concat", [seen_self, anc], axis=1)[0], as_4d])[0]
        cross_cols = [seen_mem] + ([b.op("Slice", [anc, wr.zero, i64(f"anc_cols_{d}", [(d - 2) * k]), wr.one])[0]]
                                   if d > 2 else [])
        cross_bias = b.op("Unsqueeze", [b.op("Concat", cross_cols, axis=1)[0] if d > 2 else seen_mem, as_4d])[0]
        level = wr.drafter_pass(emb, pos, self_bias, pending, cross_bias, caches, k, None)
        caches = {n: level[n] for n in caches}
        pending = level["features"]
        v, i = wr.top_k(pending, k)                                                            # [K, K] each
        cand_score = b.op("Reshape", [b.op("Add", [b.op("Unsqueeze", [f_score, wr.one])[0], v])[0], wr.last])[0]
        cand_ids = b.op("Reshape", [i, wr.last])[0]
        tokens.append(wr.to_target(cand_ids))
        scores.append(cand_score)
        parents.append(b.op("Reshape", [b.op("Expand", [b.op("Unsqueeze", [f_cand, wr.one])[0], i64("shape_kk", [k, k])])[0],
                                        wr.last])[0])
        if d < depth:
            f_score, best = b.op("TopK", [cand_score, i64(f"k_{k}", [k])], 2, axis=-1)
            f_idx = b.op("Gather", [cand_ids, best], axis=0)[0]
            f_cand = b.op("Add", [best, i64(f"base_{d}", [k + (d - 2) * k * k])])[0]
            anc = b.op("Concat", [b.op("Gather", [anc, b.op("Gather", [slot_of, best], axis=0)[0]], axis=0)[0],
                                  "tree_eye"], axis=1)[0]
    b.op("Concat", tokens, ["tree_tokens"], axis=0)
    b.op("Concat", scores, ["tree_scores"], axis=0)
    b.op("Concat", parents, ["tree_parents"], axis=0)
    assert num_candidates(depth, k) == spec.extra["candidates"]
    b.save(path, spec, "dream_cpu_draft_tree")
    return spec
