"""FP16 graphs for TensorRT's strongly typed networks: precision lives in the graph (TensorRT 11 has no FP16
builder flag). Converted with ONNX Runtime's own float16 tool (onnxruntime.transformers.float16), not by hand.

What stays FP32, and why (recorded per graph in the manifest as ``fp32_ops`` / ``fp32_nodes``):
- RMSNorm / LayerNorm statistics (Pow, ReduceMean, Sqrt, LayerNormalization): a sum of squares over the hidden
  size overflows FP16 on real activations;
- Softmax and the additive attention mask (every node from the ``attention_mask`` input up to the Softmax that
  consumes it): -1e4-style masks and max-subtraction need FP32 range;
- rotary (Cos, Sin): positions up to the context length lose precision in FP16 angles;
- the LM head (Gemm) and so the logits: greedy ties and the acceptance walk read them.
Weights and the other matrix products are FP16. Graph inputs and outputs keep their FP32 types
(``keep_io_types``), so the runtime feeds an FP16 bundle exactly as an FP32 one.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from runtime.ort_threads import session_options

FP32_OPS = ["Pow", "ReduceMean", "Sqrt", "LayerNormalization", "Softmax", "Cos", "Sin", "Gemm"]
PRECISIONS = ("fp32", "fp16")
# an FP16 graph against its FP32 source on the export's validation cases (relative L2 error; top-1 agreement)
FP16_RELATIVE_TOLERANCE = 0.02
FP16_MIN_TOP1_AGREEMENT = 0.95


def mask_nodes(model, mask_input: str = "attention_mask") -> list[str]:
    """Names of the nodes downstream of the additive mask input, up to (not including) the Softmax they feed."""
    consumers: dict[str, list] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    out, seen, frontier = [], set(), [mask_input]
    while frontier:
        tensor = frontier.pop()
        for node in consumers.get(tensor, []):
            if node.op_type == "Softmax" or id(node) in seen:
                continue
            seen.add(id(node))
            if node.name:
                out.append(node.name)
            frontier.extend(node.output)
    return out


def drop_fp16_round_trips(model) -> int:
    """The converter casts every FP32-kept node's output to FP16 and back to FP32 for the next kept node, so two
    adjacent FP32 ops still pass their tensor through FP16 (RMSNorm's x^2 overflows FP16 between Pow and
    ReduceMean on real activations); with ``keep_io_types`` it also passes FP32 graph inputs read by kept-FP32
    nodes, and FP32 results of kept nodes that are graph outputs (the logits), through FP16. Rewire each
    Cast(to FP32) of a Cast(to FP16) to the original FP32 tensor (an Identity where it is a graph output) and
    drop the casts nothing reads any more. Returns how many round trips were removed."""
    from onnx import TensorProto

    nodes = list(model.graph.node)
    producer = {o: n for n in nodes for o in n.output}
    graph_outputs = {o.name for o in model.graph.output}

    def to(node):
        return next((a.i for a in node.attribute if a.name == "to"), None)

    float_inputs = {i.name for i in model.graph.input if i.type.tensor_type.elem_type == TensorProto.FLOAT}
    rename, dead, sources = {}, set(), set()
    identities = 0
    for n in nodes:
        if n.op_type == "Cast" and to(n) == TensorProto.FLOAT:
            src = producer.get(n.input[0])
            # a Cast to FP16 of an FP32 tensor: the converter's own after a kept-FP32 node (..._cast_to_fp16_node),
            # or its cast of an FP32 graph input (keep_io_types)
            if (src is not None and src.op_type == "Cast" and to(src) == TensorProto.FLOAT16
                    and (src.name.endswith("_cast_to_fp16_node") or src.input[0] in float_inputs)):
                sources.add(id(src))
                if n.output[0] in graph_outputs:  # an FP32 result leaving through FP16 (e.g. the logits)
                    n.op_type = "Identity"
                    n.input[0] = src.input[0]
                    del n.attribute[:]
                    identities += 1
                else:
                    rename[n.output[0]] = src.input[0]
                    dead.add(id(n))
    if not rename and not identities:
        return 0

    def resolve(name):  # chains: a round trip whose source is itself a removed cast's output
        seen = set()
        while name in rename and name not in seen:
            seen.add(name)
            name = rename[name]
        return name

    rename = {k: resolve(k) for k in rename}
    for n in nodes:
        for i, name in enumerate(n.input):
            if name in rename:
                n.input[i] = rename[name]
    still_read = {i for n in nodes if id(n) not in dead for i in n.input} | graph_outputs
    for n in nodes:  # a Cast to FP16 that only the removed casts read
        if id(n) in sources and n.output[0] not in still_read:
            dead.add(id(n))
    keep = [n for n in nodes if id(n) not in dead]
    del model.graph.node[:]
    model.graph.node.extend(keep)
    del model.graph.value_info[:]  # the converter's type annotations no longer hold for rewired tensors; optional
    return len(rename) + identities


# FP16 holds a tensor only if its largest value on the export's inputs is at most FP16_MAX / RANGE_MARGIN: real
# models have outlier activations (SmolLM2's residual stream reaches 2.9e4 on a short prompt, its RMSNorm mean of
# squares 1.4e6), and a longer or different input must not overflow where the validation inputs did not
RANGE_MARGIN = 4.0


def _convert(model, block_nodes: list[str]):
    from onnxruntime.transformers.float16 import convert_float_to_float16

    converted = convert_float_to_float16(model, keep_io_types=True, op_block_list=FP32_OPS, node_block_list=block_nodes)
    removed = drop_fp16_round_trips(converted)
    return converted, removed


def fp16_sources(model) -> dict[str, list[str]]:
    """Tensors a converted graph holds in FP16 -> the source-graph tensors whose values they carry, nearest first.
    The converter renames the output of a node it keeps FP32 to ``<name>_cast_to_fp16`` and casts it to FP16 under
    the original name for FP16 readers; graph inputs are cast to FP16 as ``graph_input_cast_<k>``; a model's own
    FP32-to-FP32 Casts (RMSNorm's ``.to(float32)``) pass values on unchanged: all are followed back."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model)
    in_fp16 = {vi.name for vi in inferred.graph.value_info if vi.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16}
    cast_src = {n.output[0]: n.input[0] for n in model.graph.node if n.op_type == "Cast"}
    out = {}
    for name in in_fp16:
        chain, src = [], name
        while src not in chain:
            chain.append(src)
            if src not in cast_src:
                break
            src = cast_src[src]
        out[name] = list(dict.fromkeys(c[: -len(SUFFIX)] if c.endswith(SUFFIX) else c for c in chain))
    return out


SUFFIX = "_cast_to_fp16"  # onnxruntime.transformers.float16's name for a kept-FP32 node's renamed output


def activation_ranges(path: Path, cases: list[tuple[str, dict]]) -> dict[str, float]:
    """The largest |value| of every float tensor of the FP32 graph at ``path`` over ``cases``."""
    import onnxruntime as ort

    opts = session_options()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(with_all_outputs(path), opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    ranges: dict[str, float] = {}
    for _, feeds in cases:
        for name, v in zip(names, sess.run(names, {k: v for k, v in feeds.items() if k in {i.name for i in sess.get_inputs()}})):
            if v.dtype == np.float32 and v.size:
                ranges[name] = max(ranges.get(name, 0.0), float(np.abs(v).max()))
    return ranges


def to_fp16(src: Path, dst: Path, cases: list[tuple[str, dict]] | None = None, margin: float = RANGE_MARGIN) -> dict:
    """Write the FP16 twin of the graph at ``src`` to ``dst``; returns the manifest record of what stayed FP32.

    Beyond the fixed islands (``FP32_OPS`` and the mask path), ``cases`` (real inputs) measure every tensor: one
    that the FP16 graph would hold in FP16 but whose largest value exceeds FP16_MAX / ``margin`` is kept FP32,
    with the node producing it and the nodes reading it; repeated until no such tensor is left. The kept nodes and
    the values that decided them are recorded."""
    import onnx

    model = onnx.load(str(src))
    has_mask = any(i.name == "attention_mask" for i in model.graph.input)
    for node in model.graph.node:  # the converter's node block list needs names
        if not node.name:
            node.name = f"{node.op_type}_{id(node)}"
    nodes = mask_nodes(model) if has_mask else []
    producer = {o: n.name for n in model.graph.node for o in n.output}
    readers: dict[str, list[str]] = {}
    for n in model.graph.node:
        for i in n.input:
            readers.setdefault(i, []).append(n.name)
    ranges = activation_ranges(src, cases) if cases else {}
    limit = FP16_MAX / margin
    measured: dict[str, float] = {}
    blocked = list(nodes)
    named = model.SerializeToString()  # each round converts a fresh copy (the converter edits its input)
    for _ in range(8):
        converted, removed = _convert(onnx.load_from_string(named), blocked)
        if not ranges:
            break
        too_big = {t: ranges[t] for chain in fp16_sources(converted).values() for t in chain if ranges.get(t, 0.0) > limit}
        if not too_big:
            break
        measured.update(too_big)
        extra = set()
        for t in too_big:
            extra.update([producer[t]] if t in producer else [])
            extra.update(readers.get(t, []))
        new = sorted(extra - set(blocked))
        if not new:
            raise ValueError(f"{src.name}: tensors {sorted(too_big)[:4]} exceed FP16's range but no node can be kept FP32")
        blocked += new
    tmp = dst.with_name(dst.name + ".part")
    onnx.save(converted, str(tmp))
    tmp.replace(dst)
    top = sorted(measured.items(), key=lambda kv: -kv[1])[:5]
    return {"precision": "fp16", "fp32_ops": list(FP32_OPS), "fp32_nodes": len(blocked), "fp16_round_trips_removed": removed,
            "io_types": "fp32 (cast inside the graph)",
            "fp32_by_range": {"nodes": len(blocked) - len(nodes), "tensors": len(measured), "margin": margin,
                              "largest": {k: round(v, 1) for k, v in top}}}


FP16_MAX = 65504.0


def with_all_outputs(path: Path):
    """The graph with every intermediate float tensor as an extra output (for activation ranges)."""
    import onnx

    model = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    known = {o.name for o in model.graph.output}
    for vi in model.graph.value_info:
        if vi.type.tensor_type.elem_type == onnx.TensorProto.FLOAT and vi.name not in known:
            model.graph.output.append(vi)
    return model.SerializeToString()


def validate_fp16(name: str, float_path: Path, fp16_path: Path, cases: list[tuple[str, dict]]):
    """The FP16 graph against its FP32 source on the same inputs: every output's relative L2 error within
    FP16_RELATIVE_TOLERANCE, logits' top-1 agreement at least FP16_MIN_TOP1_AGREEMENT; and the FP32 graph's
    largest value (on these inputs, from the FP32 graph) of every tensor the FP16 graph holds in FP16, which must
    stay below 65504. Returns (checks, max activation)."""
    import onnxruntime as ort

    from .validate import Check, relative_error_check

    opts = session_options()
    opts.log_severity_level = 3
    ref_sess = ort.InferenceSession(with_all_outputs(float_path), opts, providers=["CPUExecutionProvider"])
    sess = ort.InferenceSession(str(fp16_path), opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    all_names = [o.name for o in ref_sess.get_outputs()]
    checks, max_act = [], 0.0
    graph = f"{name}_fp16"
    import onnx

    # what each FP16 tensor carries, in the FP32 graph's names (a converter's Cast to FP16 carries its input)
    in_fp16 = {t for chain in fp16_sources(onnx.load(str(fp16_path), load_external_data=False)).values() for t in chain}
    for case, feeds in cases:
        ref_all = dict(zip(all_names, ref_sess.run(all_names, feeds)))
        max_act = max([max_act] + [float(np.abs(v).max()) for k, v in ref_all.items()
                                   if k in in_fp16 and v.size and v.dtype == np.float32])
        got = dict(zip(names, sess.run(names, feeds)))
        for out in names:
            ref, g = ref_all[out], got[out]
            if ref.dtype != np.float32:
                continue
            c = relative_error_check(graph, case, out, ref, g, FP16_RELATIVE_TOLERANCE)
            if out == "logits" and np.isfinite(g).all():
                c.argmax_agreement = float((ref.reshape(-1, ref.shape[-1]).argmax(-1) == g.reshape(-1, g.shape[-1]).argmax(-1)).mean())
                c.min_agreement = FP16_MIN_TOP1_AGREEMENT
            checks.append(c)
    checks.append(Check(graph, "all", f"largest activation held in FP16 {max_act:.4g} (FP16 max {FP16_MAX:g})",
                        0.0 if max_act < FP16_MAX else float("inf"), 0.0))
    return checks, max_act
