"""The ORT-CPU target decoder, written node by node (not traced) for Llama-style text models.

About ten nodes per layer, as onnxruntime-genai's builder writes them: packed QKV projection, rotary inside
``GroupQueryAttention``, ``SkipSimplifiedLayerNormalization`` for every norm after the first, and
``MatMulNBits`` weights with int8 compute (``accuracy_level`` 4), the LM head included. What this graph
adds for the runtime's contract: the K/V buffers are one preallocated ``[chains, kvh, capacity, hd]`` array
per layer, bound as both past and present (ORT writes new rows in place), the last layer's normed hidden
states are an output (the drafter's features), and logits are computed only for the rows asked for.

Exactness by construction. With int8 compute, a 1-ulp difference anywhere grows through the layers, so a
position must be computed with bit-identical arithmetic whether it is a plain decoding step or a row of a
draft-tree verify. Three facts make that hold here (``tests/test_cpu_decoder.py`` proves it bitwise):
- MatMulNBits at accuracy level 4 (block 32) computes each row of a call with 2 or more rows independently of the
  other rows (the int8 quantization of the activations is per row and block); so do the norms and element-wise
  ops. A 1-row call takes its own kernel on some CPUs (measured: AVX2 without AVX-512 VNNI, ~1e-6 apart) and not on
  others (AVX-512 VNNI): the runtime asks the CPU once at load (``runtime/chains.py``, ``lone_row_differs``) and,
  where it differs, runs a lone row beside a copy of itself, the LM head's single logits row included.
- GroupQueryAttention takes its M == 1 GEMM kernel for a 1-row query; with 2 or more rows every row's
  scores, softmax and weighted sum depend only on that row and the K/V it sees. So attention never runs on
  a 1-row query: a 1-token call is padded to 2 rows inside the graph (the pad row repeats the last row; its
  K/V land in scratch rows past the context and are overwritten by the next call).
- A row sees exactly what plain decoding saw if its attention window is the context followed by its own
  ancestors in order, laid out contiguously. A branched tree has no such layout, so attention runs over
  the tree's root-to-leaf *chains*: the batch axis of GroupQueryAttention holds one chain per entry, each
  over its own copy of the context's K/V (the runtime keeps the copies equal), and every other op runs once
  per distinct tree node. ``chain_rows [C, L]`` gathers the node rows into chains (a short chain repeats
  its leaf), ``row_slots [N]`` reads each node's attention output back from one chain that holds it (any
  chain holding a node computes it identically).
Rotary positions come from the chain layout (context length + depth), so no position input is needed.

Not handled (those families keep the traced fused graph, ``export/fused.py``): biases in projections,
sliding-window or bidirectional attention, M-RoPE, logit soft-capping, embedding scales, non-SiLU MLPs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .specs import GraphSpec, TensorSpec

MS = "com.microsoft"
BLOCK = 32
ACCURACY_LEVEL = 4  # int8 compute: row-consistent (see the module docstring)
LAYER_TYPES = ("LlamaDecoderLayer", "MistralDecoderLayer")


@dataclass
class TextWeights:
    """What the graph needs from a Llama-style text model, as numpy arrays (``[in, out]`` matrices)."""

    layers: list[dict]        # qkv [H, (nh + 2 kvh) hd], o [nh hd, H], gate/up [H, I], down [I, H], ln1/ln2 [H]
    norm: np.ndarray          # [H]
    head: np.ndarray          # [H, V]
    embed: np.ndarray         # [V, H] token embeddings (the head's transpose when tied)
    tied: bool
    eps: float
    heads: int
    kv_heads: int
    head_dim: int
    scale: float
    cos: np.ndarray           # [max_positions, hd/2]
    sin: np.ndarray

    @property
    def hidden(self) -> int:
        return self.norm.shape[0]

    @property
    def vocab(self) -> int:
        return self.head.shape[1]

    @property
    def num_layers(self) -> int:
        return len(self.layers)


def unsupported(adapter) -> str | None:
    """Why this target cannot use the written graph (None: it can)."""
    layers = adapter.decoder_layers()
    kinds = {type(layer).__name__ for layer in layers}
    if not kinds <= set(LAYER_TYPES):
        return f"decoder layers {sorted(kinds)} (written for {', '.join(LAYER_TYPES)})"
    if adapter.rope_axes() != 1 or any(w is not None for w in adapter.attention_windows()):
        return "M-RoPE or sliding-window attention"
    if adapter.image_attention() != "causal" or adapter.embed_scale() != 1.0:
        return "bidirectional image attention or scaled embeddings"
    if str(getattr(adapter.text_config, "hidden_act", "silu")) != "silu":
        return f"MLP activation {adapter.text_config.hidden_act!r} (written for silu)"
    for layer in layers:
        mods = [layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.self_attn.o_proj,
                layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj]
        if any(m.bias is not None for m in mods):
            return "biases in the projections"
    return None


def text_weights(adapter) -> TextWeights:
    """The target's text decoder as numpy arrays (see ``unsupported`` first)."""
    import torch

    def t(x) -> np.ndarray:
        return x.detach().float().numpy()

    layers = []
    for layer in adapter.decoder_layers():
        a, m = layer.self_attn, layer.mlp
        qkv = np.concatenate([t(a.q_proj.weight), t(a.k_proj.weight), t(a.v_proj.weight)], axis=0)
        layers.append({"qkv": np.ascontiguousarray(qkv.T), "o": np.ascontiguousarray(t(a.o_proj.weight).T),
                       "gate": np.ascontiguousarray(t(m.gate_proj.weight).T), "up": np.ascontiguousarray(t(m.up_proj.weight).T),
                       "down": np.ascontiguousarray(t(m.down_proj.weight).T),
                       "ln1": t(layer.input_layernorm.weight), "ln2": t(layer.post_attention_layernorm.weight)})
    cfg = adapter.text_config
    attn = adapter.decoder_layers()[0].self_attn
    heads, kv_heads = int(cfg.num_attention_heads), int(getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads)
    hd = int(attn.head_dim)
    norm = adapter.final_norm()
    max_pos = int(cfg.max_position_embeddings)
    with torch.no_grad():  # the model's own rotary module (its scaling rules included), positions 0..max-1
        probe = torch.zeros(1, 1, hd)
        cos, sin = adapter.rotary_emb()(probe, torch.arange(max_pos)[None])
    head_w = adapter.lm_head().weight
    emb_w = adapter.embed_tokens().weight
    return TextWeights(
        layers=layers, norm=t(norm.weight), head=np.ascontiguousarray(t(head_w).T), embed=t(emb_w),
        tied=head_w.data_ptr() == emb_w.data_ptr(), eps=float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6))),
        heads=heads, kv_heads=kv_heads, head_dim=hd, scale=float(attn.scaling),
        cos=np.ascontiguousarray(t(cos[0, :, : hd // 2])), sin=np.ascontiguousarray(t(sin[0, :, : hd // 2])))


def quantize_blocks(w: np.ndarray, bits: int, symmetric: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """ONNX Runtime's own MatMulNBits quantization of ``w [K, N]`` (blocks of 32 along K): packed
    ``[N, K/32, 32*bits/8]`` uint8, scales ``[N, K/32]``, zero points (None when symmetric)."""
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, DefaultWeightOnlyQuantizer

    cfg = DefaultWeightOnlyQuantConfig(block_size=BLOCK, is_symmetric=symmetric, bits=bits)
    packed, scales, zp = DefaultWeightOnlyQuantizer(cfg).qbits_block_quant(np.ascontiguousarray(w, np.float32))
    return packed, scales, (None if symmetric else zp)


class GraphBuilder:
    """Nodes and initializers of a graph written by hand (names are made unique by a counter)."""

    def __init__(self):
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._init_names: set[str] = set()
        self._quantized: dict[str, list[str]] = {}
        self.n = 0

    def init(self, name: str, arr: np.ndarray) -> str:
        """An initializer, made once per name (a graph that reuses a weight, such as the unrolled passes of a draft
        tree, names it again and gets the same one)."""
        if name not in self._init_names:
            self._init_names.add(name)
            self.inits.append(numpy_helper.from_array(np.ascontiguousarray(arr), name))
        return name

    def op(self, op_type: str, inputs: list[str], outputs: int | list[str] = 1, domain: str = "", name: str | None = None,
           **attrs) -> list[str]:
        self.n += 1
        name = name or f"{op_type}_{self.n}"
        outs = outputs if isinstance(outputs, list) else [f"{name}/out{i}" for i in range(outputs)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=name, domain=domain or None, **attrs))
        return outs

    def linear(self, x: str, w: np.ndarray, name: str, bits: int | None, symmetric: bool, out: str | None = None,
               node: str | None = None) -> str:
        """``x @ w`` (``w [in, out]``): MatMul at fp32, else MatMulNBits with int8 compute. The weight's initializers
        are named after ``name`` and made (and quantized) once, so calls with the same ``name`` share them; ``node``
        names the node (default ``name``: pass another for each further call)."""
        outs = [out] if out else 1
        if bits is None:
            return self.op("MatMul", [x, self.init(f"{name}.weight", w)], outs, name=node or name)[0]
        if name not in self._quantized:
            packed, scales, zp = quantize_blocks(w, bits, symmetric)
            ins = [self.init(f"{name}.weight_Q{bits}", packed), self.init(f"{name}.weight_scales", scales)]
            if zp is not None:
                ins.append(self.init(f"{name}.weight_zero_points", zp))
            self._quantized[name] = ins
        return self.op("MatMulNBits", [x, *self._quantized[name]], outs, MS, node or name, K=int(w.shape[0]),
                       N=int(w.shape[1]), bits=bits, block_size=BLOCK, accuracy_level=ACCURACY_LEVEL)[0]

    def save(self, path, spec: GraphSpec, graph_name: str) -> None:
        """Write the graph with ``spec``'s inputs and outputs; weights in one external file beside it."""
        from pathlib import Path

        def vi(t: TensorSpec):
            dtype = helper.np_dtype_to_tensor_dtype(np.dtype(t.dtype))
            return helper.make_tensor_value_info(t.name, dtype, list(t.dims))

        graph = helper.make_graph(self.nodes, graph_name, [vi(t) for t in spec.inputs], [vi(t) for t in spec.outputs],
                                  self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(MS, 1)],
                                  producer_name="dream-export")
        model.ir_version = 8
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=Path(path).name + ".data", size_threshold=1024)


def kv_names(num_layers: int, chains: int) -> dict:
    """past/present names per layer and chain slot: ``names[kind][layer][chain]``."""
    return {kind: [[f"{kind}_{i}_{c}" for c in range(chains)] for i in range(num_layers)]
            for kind in ("past_key", "past_value", "present_key", "present_value")}


def cpu_decoder_spec(w: TextWeights, precision: str, head_bits: int | None, file: str, chains: int) -> GraphSpec:
    n = w.num_layers
    names = kv_names(n, chains)
    buf = (1, w.kv_heads, "capacity", w.head_dim)
    past = [TensorSpec(names[k][i][c], "float32", buf) for i in range(n) for c in range(chains) for k in ("past_key", "past_value")]
    present = [TensorSpec(names[k][i][c], "float32", buf) for i in range(n) for c in range(chains)
               for k in ("present_key", "present_value")]
    return GraphSpec(
        name="decoder_ort_cpu", file=file,
        inputs=(TensorSpec("inputs_embeds", "float32", ("rows", w.hidden)),
                TensorSpec("chain_rows", "int64", (chains, "chain_len")),
                TensorSpec("row_slots", "int64", ("rows",)),
                TensorSpec("seqlens_k", "int32", (chains,)),
                TensorSpec("total_sequence_length", "int32", (chains,)),
                TensorSpec("logits_rows", "int64", ("logit_rows",)),
                *past),
        outputs=(TensorSpec("logits", "float32", ("logit_rows", w.vocab)),
                 TensorSpec("hidden_states", "float32", ("rows", w.hidden)),
                 TensorSpec("last_query", "float32", ("rows", w.heads * w.head_dim)),
                 *present),
        atol=1e-3, rtol=1e-3,
        extra={"kv": {"num_layers": n, "kv_heads": w.kv_heads, "head_dim": w.head_dim, "layout": "chains",
                      "chains": chains, **names},
               "kv_layout": "chain_buffers", "for_backend": "onnxruntime-cpu", "precision": precision,
               "head_bits": head_bits, "accuracy_level": ACCURACY_LEVEL if precision != "fp32" else None,
               "num_heads": w.heads, "scale": w.scale, "min_chain_len": MIN_ROWS,
               "note": "one GroupQueryAttention per chain slot per layer; past_*_i_c and present_*_i_c are one "
                       "[1, kvh, capacity, hd] buffer bound through IOBinding (new rows land at [P, P+L)); "
                       "chain_rows are padded inside the graph to at least min_chain_len rows, row_slots index "
                       "the padded chains"},
    )


MIN_ROWS = 2  # attention never runs on a 1-row query (GroupQueryAttention's M == 1 kernel differs)


def build_cpu_decoder(w: TextWeights, path, precision: str = "int4", head_bits: int | None = None,
                      symmetric: bool | None = None, chains: int = 2) -> GraphSpec:
    """Write the decoder graph to ``path``. ``precision`` fp32 (float MatMuls: the graph checked against PyTorch),
    int8 or int4 (MatMulNBits, int8 compute); ``head_bits`` the LM head's width (default: the body's); ``chains``
    the most root-to-leaf chains a verify call holds (one GroupQueryAttention each per layer)."""
    from pathlib import Path

    bits = {"fp32": None, "int8": 8, "int4": 4}[precision]
    head_bits = (head_bits or bits) if bits is not None else None
    sym = (lambda b: b == 8) if symmetric is None else (lambda b: symmetric)
    spec = cpu_decoder_spec(w, precision, head_bits, Path(path).name, chains)
    names = spec.extra["kv"]
    b = GraphBuilder()
    nh, kvh, hd = w.heads, w.kv_heads, w.head_dim
    i64 = lambda name, v: b.init(name, np.array(v, np.int64))  # noqa: E731
    cos, sin = b.init("cos_cache", w.cos), b.init("sin_cache", w.sin)
    zero, one, two = i64("c0", [0]), i64("c1", [1]), i64("c2", [MIN_ROWS])
    # pad every chain to MIN_ROWS rows by repeating its last row; GQA then counts the pad rows as new tokens
    shape = b.op("Shape", ["chain_rows"], name="chain_shape")[0]
    length = b.op("Slice", [shape, one, two, zero], name="chain_len")[0]
    pad = b.op("Max", [b.op("Sub", [two, length], name="pad_sub")[0], zero], name="pad")[0]
    last = b.op("Slice", ["chain_rows", i64("cm1", [-1]), i64("cbig", [2**62]), one], name="chain_last")[0]
    pad_rows = b.op("Expand", [last, b.op("Concat", [i64("cC", [chains]), pad], name="pad_shape", axis=0)[0]], name="pad_rows")[0]
    chain_rows = b.op("Concat", ["chain_rows", pad_rows], name="chains_padded", axis=1)[0]
    pad32 = b.op("Cast", [pad], name="pad_i32", to=TensorProto.INT32)[0]
    seqlens = b.op("Split", [b.op("Add", ["seqlens_k", pad32], name="seqlens_padded")[0]], chains, name="seqlens_split", axis=0) \
        if chains > 1 else [b.op("Add", ["seqlens_k", pad32], name="seqlens_padded")[0]]
    totals_all = b.op("Add", ["total_sequence_length", pad32], name="totals_padded")[0]
    totals = [b.op("Squeeze", [t], name=f"total_{c}")[0] for c, t in enumerate(
        b.op("Split", [totals_all], chains, name="totals_split", axis=0) if chains > 1 else [totals_all])]
    q_shape = i64("q_rows", [-1, nh * hd])
    residual = "inputs_embeds"
    x = b.op("SimplifiedLayerNormalization", [residual, b.init("layers.0.ln1", w.layers[0]["ln1"])], name="layers.0.ln1",
             axis=-1, epsilon=w.eps, stash_type=1)[0]
    for i, lw in enumerate(w.layers):
        p = f"layers.{i}"
        qkv = b.linear(x, lw["qkv"], f"{p}.qkv", bits, sym(bits))
        if i == w.num_layers - 1:
            b.op("Slice", [qkv, zero, i64("q_width", [nh * hd]), one], ["last_query"], name="last_query")
        gathered = b.op("Gather", [qkv, chain_rows], name=f"{p}.to_chains", axis=0)[0]       # [C, L, (nh+2kvh) hd]
        per_chain = b.op("Split", [gathered], chains, name=f"{p}.chain_split", axis=0) if chains > 1 else [gathered]
        outs = []
        for c in range(chains):
            outs.append(b.op("GroupQueryAttention",
                             [per_chain[c], "", "", names["past_key"][i][c], names["past_value"][i][c], seqlens[c], totals[c],
                              cos, sin],
                             [f"{p}.attn{c}", names["present_key"][i][c], names["present_value"][i][c]], MS, f"{p}.gqa{c}",
                             num_heads=nh, kv_num_heads=kvh, scale=w.scale, do_rotary=1, rotary_interleaved=0)[0])
        attn = b.op("Concat", outs, name=f"{p}.chains", axis=0)[0] if chains > 1 else outs[0]
        flat = b.op("Reshape", [attn, q_shape], name=f"{p}.chains_flat")[0]                # [C*L, nh hd]
        rows = b.op("Gather", [flat, "row_slots"], name=f"{p}.to_rows", axis=0)[0]          # [N, nh hd]
        o = b.linear(rows, lw["o"], f"{p}.o", bits, sym(bits))
        x, _, _, residual = b.op("SkipSimplifiedLayerNormalization", [residual, o, b.init(f"{p}.ln2", lw["ln2"])], 4, MS,
                                 f"{p}.ln2", epsilon=w.eps)
        gate = b.linear(x, lw["gate"], f"{p}.gate", bits, sym(bits))
        up = b.linear(x, lw["up"], f"{p}.up", bits, sym(bits))
        act = b.op("Mul", [b.op("Mul", [gate, b.op("Sigmoid", [gate], name=f"{p}.sigmoid")[0]], name=f"{p}.silu")[0], up],
                   name=f"{p}.glu")[0]
        down = b.linear(act, lw["down"], f"{p}.down", bits, sym(bits))
        if i + 1 < w.num_layers:
            nxt = f"layers.{i + 1}.ln1"
            x, _, _, residual = b.op("SkipSimplifiedLayerNormalization", [residual, down, b.init(nxt, w.layers[i + 1]["ln1"])],
                                     4, MS, nxt, epsilon=w.eps)
        else:
            b.op("SkipSimplifiedLayerNormalization", [residual, down, b.init("norm", w.norm)], ["hidden_states"], MS,
                 "final_norm", epsilon=w.eps)
    picked = b.op("Gather", ["hidden_states", "logits_rows"], name="logit_rows", axis=0)[0]
    b.linear(picked, w.head, "lm_head", head_bits, sym(head_bits) if head_bits else True, out="logits")

    b.save(path, spec, "dream_cpu_decoder")
    return spec


def graph_name(chains: int) -> str:
    """Manifest names of the written graphs: one per most-chains-per-call (the runtime picks the smallest that fits)."""
    return "decoder_ort_cpu" if chains == 1 else f"decoder_ort_cpu_c{chains}"


def _decoder_for(specs: dict, folder, text: dict, capacity: int, w: TextWeights):
    """A runtime ChainDecoder over the graphs ``specs`` ({chains: spec}) in ``folder`` (validation uses the runtime's
    own decoder)."""
    import onnxruntime as ort

    from runtime.chains import ChainDecoder
    from runtime.ort_threads import session_options

    sessions = {c: ort.InferenceSession(str(folder / s.file), session_options(), providers=["CPUExecutionProvider"])
                for c, s in specs.items()}
    return ChainDecoder(sessions, next(iter(specs.values())).to_json(), text, capacity, w.cos, w.sin)


def export_cpu_decoders(adapter, reference, d_spec, cases, folder, precision: str, head_bits: int | None,
                        max_chains: int, stages) -> tuple[list[GraphSpec], list, dict]:
    """Write the written ORT-CPU decoders (one per chain count 1..max_chains) into ``folder``, each checked: the
    graph built at fp32 against the PyTorch decoder, then the quantized graphs against that fp32 build. Returns
    (specs, checks, {name: array}) where the arrays are what the runtime reads beside the graphs: the token
    embeddings as the same blockwise-quantized rows as the head (one copy when the head is tied) and the rotary
    tables."""
    import tempfile
    from dataclasses import replace
    from pathlib import Path

    from .validate import validate_cpu_decoder, validate_quantized_cpu_decoder

    folder = Path(folder)
    w = text_weights(adapter)
    text = {"num_layers": w.num_layers, "kv_heads": w.kv_heads, "head_dim": w.head_dim, "hidden_size": w.hidden,
            "vocab_size": w.vocab}
    capacity = max(f["inputs_embeds"].shape[1] + f[d_spec.extra["kv"]["past_key"][0]].shape[1] for _, f in cases) + 8
    checks, specs = [], {}
    with tempfile.TemporaryDirectory(dir=folder, prefix=".cpu-decoder-") as tmp:
        tmp = Path(tmp)
        with stages.stage(f"written ORT-CPU decoder ({w.num_layers} layers, packed QKV, rotary in GroupQueryAttention, "
                          f"fused norms) at fp32, checked against the PyTorch decoder"):
            float_spec = replace(build_cpu_decoder(w, tmp / "float.onnx", "fp32", chains=max_chains), name=graph_name(max_chains))
            checks += validate_cpu_decoder(reference, d_spec, float_spec,
                                           _decoder_for({max_chains: float_spec}, tmp, text, capacity, w), cases)
        for c in range(1, max_chains + 1):
            name = graph_name(c)
            with stages.stage(f"{precision} weights, int8 compute (MatMulNBits, accuracy level {ACCURACY_LEVEL}; LM head "
                              f"{head_bits or precision}) → {name}"):
                spec = build_cpu_decoder(w, folder / f"{name}_{precision}.onnx", precision, head_bits, chains=c)
                specs[c] = replace(spec, name=name)
            with stages.stage(f"check {name} against the fp32 build"):
                ref = _decoder_for({c: float_spec if c == max_chains else build_cpu_decoder(
                    w, tmp / f"float{c}.onnx", "fp32", chains=c)}, tmp, text, capacity, w)
                checks += validate_quantized_cpu_decoder(specs[c], ref, _decoder_for({c: specs[c]}, folder, text, capacity, w),
                                                         cases, d_spec.extra["kv"], precision)
    bits = specs[1].extra["head_bits"]
    packed, scales, zp = quantize_blocks(w.head if w.tied else np.ascontiguousarray(w.embed.T), bits, bits == 8)
    arrays = {"embed_q": packed, "embed_scales": scales, "rope_cos": w.cos, "rope_sin": w.sin}
    if zp is not None:
        arrays["embed_zero_points"] = zp
    return [specs[c] for c in sorted(specs)], checks, arrays
