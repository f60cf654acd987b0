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
    ReduceMean on real activations). Rewire each Cast(to FP32) of a Cast(to FP16) to the original FP32 tensor
    and drop the casts nothing reads any more. Returns how many round trips were removed."""
    from onnx import TensorProto

    nodes = list(model.graph.node)
    producer = {o: n for n in nodes for o in n.output}
    graph_outputs = {o.name for o in model.graph.output}

    def to(node):
        return next((a.i for a in node.attribute if a.name == "to"), None)

    rename, dead = {}, set()
    for n in nodes:
        if n.op_type == "Cast" and to(n) == TensorProto.FLOAT:
            src = producer.get(n.input[0])
            # only the converter's own casts after a kept-FP32 node (named ..._cast_to_fp16_node): their input is FP32
            if (src is not None and src.op_type == "Cast" and to(src) == TensorProto.FLOAT16
                    and src.name.endswith("_cast_to_fp16_node") and n.output[0] not in graph_outputs):
                rename[n.output[0]] = src.input[0]
                dead.add(id(n))
    if not rename:
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
    for n in nodes:  # a converter's Cast to FP16 that only the removed casts read
        if n.op_type == "Cast" and n.name.endswith("_cast_to_fp16_node") and n.output[0] not in still_read:
            dead.add(id(n))
    keep = [n for n in nodes if id(n) not in dead]
    del model.graph.node[:]
    model.graph.node.extend(keep)
    del model.graph.value_info[:]  # the converter's type annotations no longer hold for rewired tensors; optional
    return len(rename)


def to_fp16(src: Path, dst: Path) -> dict:
    """Write the FP16 twin of the graph at ``src`` to ``dst``; returns the manifest record of what stayed FP32."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(src))
    has_mask = any(i.name == "attention_mask" for i in model.graph.input)
    for node in model.graph.node:  # the converter's node block list needs names
        if not node.name:
            node.name = f"{node.op_type}_{id(node)}"
    nodes = mask_nodes(model) if has_mask else []
    converted = convert_float_to_float16(model, keep_io_types=True, op_block_list=FP32_OPS, node_block_list=nodes)
    removed = drop_fp16_round_trips(converted)
    tmp = dst.with_name(dst.name + ".part")
    onnx.save(converted, str(tmp))
    tmp.replace(dst)
    return {"precision": "fp16", "fp32_ops": list(FP32_OPS), "fp32_nodes": len(nodes), "fp16_round_trips_removed": removed,
            "io_types": "fp32 (cast inside the graph)"}


def relative_error(ref: np.ndarray, got: np.ndarray) -> float:
    if not np.isfinite(got).all():
        return float("inf")
    return float(np.linalg.norm(got.astype(np.float64) - ref) / (np.linalg.norm(ref.astype(np.float64)) + 1e-12))


FP16_MAX = 65504.0


def _with_all_outputs(path: Path):
    """The graph with every intermediate float tensor as an extra output (for activation ranges)."""
    import onnx

    model = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    known = {o.name for o in model.graph.output}
    for vi in model.graph.value_info:
        if vi.type.tensor_type.elem_type == onnx.TensorProto.FLOAT and vi.name not in known:
            model.graph.output.append(vi)
    return model.SerializeToString()


def fp16_tensors(path: Path) -> set[str]:
    """Names of the FP16 tensors of a converted graph (what must fit FP16's range)."""
    import onnx

    model = onnx.shape_inference.infer_shapes(onnx.load(str(path), load_external_data=False))
    return {vi.name for vi in model.graph.value_info if vi.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16}


def validate_fp16(name: str, float_path: Path, fp16_path: Path, cases: list[tuple[str, dict]]):
    """The FP16 graph against its FP32 source on the same inputs: every output's relative L2 error within
    FP16_RELATIVE_TOLERANCE, logits' top-1 agreement at least FP16_MIN_TOP1_AGREEMENT; and the FP32 graph's
    largest value (on these inputs, from the FP32 graph) of every tensor the FP16 graph holds in FP16, which must
    stay below 65504. Returns (checks, max activation)."""
    import onnxruntime as ort

    from .validate import Check, relative_error_check

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    ref_sess = ort.InferenceSession(_with_all_outputs(float_path), opts, providers=["CPUExecutionProvider"])
    sess = ort.InferenceSession(str(fp16_path), opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    all_names = [o.name for o in ref_sess.get_outputs()]
    checks, max_act = [], 0.0
    graph = f"{name}_fp16"
    in_fp16 = fp16_tensors(fp16_path)
    for case, feeds in cases:
        ref_all = dict(zip(all_names, ref_sess.run(all_names, feeds)))
        max_act = max([max_act] + [float(np.abs(v).max()) for k, v in ref_all.items() if k in in_fp16 and v.size])
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
