"""Graph I/O declared once per graph (DESIGN §2.3): names, dtypes, symbolic dims, tolerance.

The same objects drive ``torch.onnx.export`` (names, dynamic axes), validation (dummy inputs by name)
and the manifest, from which the runtime reads every name it uses.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str                    # numpy dtype name
    dims: tuple                   # ints or symbolic names

    def to_json(self):
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.dims)}


@dataclass(frozen=True)
class GraphSpec:
    name: str
    file: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    atol: float = 1e-4
    extra: dict = field(default_factory=dict)
    rtol: float = 0.0             # validation passes where |onnx - torch| <= atol + rtol * |torch|, element-wise

    def dynamic_axes(self) -> dict:
        axes = {}
        for t in self.inputs + self.outputs:
            sym = {i: d for i, d in enumerate(t.dims) if isinstance(d, str)}
            if sym:
                axes[t.name] = sym
        return axes

    def to_json(self):
        return {
            "file": self.file,
            "inputs": [t.to_json() for t in self.inputs],
            "outputs": [t.to_json() for t in self.outputs],
            "atol": self.atol,
            "rtol": self.rtol,
            **self.extra,
        }


def vision_spec(channels: int, size: int, image_seq_len: int, hidden: int, dynamic_size: bool = False) -> GraphSpec:
    """Tiles of a fixed size, or (``dynamic_size``) one image of any patch-multiple size per call."""
    pixels = ("tiles", channels, "height", "width") if dynamic_size else ("tiles", channels, size, size)
    tokens = "image_tokens" if dynamic_size else image_seq_len
    return GraphSpec(
        name="vision",
        file="vision.onnx",
        inputs=(TensorSpec("pixel_values", "float32", pixels),),
        outputs=(TensorSpec("image_embeds", "float32", ("tiles", tokens, hidden)),),
        atol=1e-3,
    )


def decoder_spec(num_layers: int, kv_heads: int, head_dim: int, hidden: int, vocab: int, rope_axes: int = 1) -> GraphSpec:
    """``rope_axes`` 3: position_ids are M-RoPE's [3, 1, Q] (time, height, width; Qwen2.5-VL)."""
    past, present = [], []
    for i in range(num_layers):
        # K/V as [1, positions, kv_heads, head_dim] ("bshd"): the first L positions of a cache preallocated to
        # the capacity are one contiguous block, so a device-resident cache is bound as the past in place
        past += [TensorSpec(f"past_key_{i}", "float32", (1, "past_len", kv_heads, head_dim)),
                 TensorSpec(f"past_value_{i}", "float32", (1, "past_len", kv_heads, head_dim))]
        present += [TensorSpec(f"present_key_{i}", "float32", (1, "q_len", kv_heads, head_dim)),
                    TensorSpec(f"present_value_{i}", "float32", (1, "q_len", kv_heads, head_dim))]
    return GraphSpec(
        name="decoder",
        file="decoder.onnx",
        inputs=(
            TensorSpec("inputs_embeds", "float32", (1, "q_len", hidden)),
            TensorSpec("attention_mask", "float32", (1, 1, "q_len", "total_len")),
            TensorSpec("position_ids", "int64", (3, 1, "q_len") if rope_axes == 3 else (1, "q_len")),
            *past,
        ),
        outputs=(
            TensorSpec("logits", "float32", (1, "q_len", vocab)),
            TensorSpec("hidden_states", "float32", (1, "q_len", hidden)),
            TensorSpec("attention_received", "float32", (1, "total_len")),
            *present,
        ),
        atol=1e-3,
        extra={
            "kv": {
                "num_layers": num_layers,
                "kv_heads": kv_heads,
                "head_dim": head_dim,
                "layout": "bshd",
                "past_key": [f"past_key_{i}" for i in range(num_layers)],
                "past_value": [f"past_value_{i}" for i in range(num_layers)],
                "present_key": [f"present_key_{i}" for i in range(num_layers)],
                "present_value": [f"present_value_{i}" for i in range(num_layers)],
            },
            "mask_min": -1e4,
            **({"rope_axes": rope_axes} if rope_axes != 1 else {}),
        },
        rtol=1e-3,
    )


def fused_decoder_spec(num_layers: int, kv_heads: int, head_dim: int, hidden: int, vocab: int,
                       rope_axes: int = 1) -> GraphSpec:
    """The ORT-CPU decoder: same names as ``decoder_spec``; past/present are shared max-length buffers."""
    base = decoder_spec(num_layers, kv_heads, head_dim, hidden, vocab, rope_axes)

    def buffer(t: TensorSpec) -> TensorSpec:
        if t.name.startswith(("past_", "present_")):
            return TensorSpec(t.name, t.dtype, (1, kv_heads, "max_len", head_dim))
        return t

    return GraphSpec(
        name="decoder_ort_cpu",
        file="decoder_ort_cpu.onnx",
        inputs=tuple(buffer(t) for t in base.inputs),
        outputs=tuple(buffer(t) for t in base.outputs),
        atol=base.atol,
        rtol=base.rtol,
        extra={**base.extra, "kv": {**base.extra["kv"], "layout": "bhsd"}, "kv_layout": "shared_buffer", "for_backend": "onnxruntime-cpu", "precision": "fp32",
               "note": "past_key_i and present_key_i are one buffer bound through IOBinding; new rows land at [P, P+Q)"},
    )


DRAFTER_PAST = ("b0_key", "b0_value", "b2_key", "b2_value", "mem_key", "mem_value")


def drafter_spec(past_shapes: list[tuple[int, int]], hidden: int, draft_vocab: int, tree: dict) -> GraphSpec:
    """The DREAM drafter: self-attention K/V for blocks 0 and 2, and the cross-attention memory K/V
    (past_shapes: (heads, head_dim) of each, in DRAFTER_PAST order)."""
    past = []
    present = []
    for name, (kv_heads, head_dim) in zip(DRAFTER_PAST, past_shapes):
        axis = "mem_len" if name.startswith("mem") else "past_len"
        new_axis = "m_len" if name.startswith("mem") else "q_len"
        past.append(TensorSpec(f"past_{name}", "float32", (1, kv_heads, axis, head_dim)))
        present.append(TensorSpec(f"present_{name}", "float32", (1, kv_heads, new_axis, head_dim)))
    return GraphSpec(
        name="drafter",
        file="drafter.onnx",
        inputs=(
            TensorSpec("inputs_embeds", "float32", (1, "q_len", hidden)),
            TensorSpec("position_ids", "int64", (1, "q_len")),
            TensorSpec("attention_mask", "float32", (1, 1, "q_len", "total_len")),
            TensorSpec("memory", "float32", (1, "m_len", hidden)),
            TensorSpec("cross_mask", "float32", (1, 1, "q_len", "mem_total_len")),
            *past,
        ),
        outputs=(
            TensorSpec("logits", "float32", (1, "q_len", draft_vocab)),
            TensorSpec("features", "float32", (1, "q_len", hidden)),
            *present,
        ),
        atol=1e-3,
        extra={
            "past": [f"past_{n}" for n in DRAFTER_PAST],
            "present": [f"present_{n}" for n in DRAFTER_PAST],
            "mask_min": -1e4,
            # shape bounds for engines with optimization profiles (TensorRT): q_len/m_len per call
            "bounds": {"q_len": [1, tree["top_k"], "context"], "m_len": [1, tree["top_k"], "context"]},
        },
    )
