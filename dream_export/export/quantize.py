"""Weight-only quantization for ONNX Runtime on CPUs: the drafter (``--draft-precision int8|int4``) and the
target's ORT-CPU decoder (``--cpu-precision int8|int4``).

The drafter's output is a proposal the target verifies, so quantizing it can change how many tokens are
accepted but never which tokens are emitted. Quantizing the target changes the model: greedy output then
equals plain decoding *at that precision* (plain and speculative decoding run the same quantized graph),
not the float model's. The standard ``decoder.onnx`` (TensorRT's graph) always stays float.

How: ONNX Runtime's own tools. A basic-level ORT optimization pass first (constant folding; it removes
the Identity nodes the exporter puts in front of weights shared by the unrolled tree levels, which the
quantizer would otherwise skip), then ``MatMulNBitsQuantizer`` (blockwise symmetric, block 32,
accuracy level 4 = int8 activations). MatMulNBits is a com.microsoft op: the result is an ORT-only
graph; TensorRT keeps the float graph. DESIGN §5: on this CPU MatMulNBits is the fast weight format.
Not handled: activation quantization, calibration (see calibration/ for INT8 engines).
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

PRECISIONS = {"fp32": None, "int8": 8, "int4": 4}
# catch-up K/V rows of the quantized graph vs the float graph: max abs diff <= this x max |float value|
RELATIVE_TOLERANCE = {"int8": 0.05, "int4": 0.3}


def gemm_to_matmul(model) -> int:
    """Gemm(A, B, C; transB=1, alpha=beta=1) by a constant 2-D B -> MatMul(A, B^T) (+ C when it is not all zeros),
    so that MatMulNBitsQuantizer (MatMul only) takes the LM head too (the float graphs keep the head as a Gemm
    over the stored [V,H] weight, shared with the embeddings). Returns how many were rewritten."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    rewritten, done = [], 0
    for node in model.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if (node.op_type != "Gemm" or attrs.get("transA", 0) or attrs.get("transB", 0) != 1
                or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0 or node.input[1] not in inits):
            kept = onnx.NodeProto()
            kept.CopyFrom(node)
            rewritten.append(kept)
            continue
        w = numpy_helper.to_array(inits[node.input[1]])
        wt = numpy_helper.from_array(np.ascontiguousarray(w.T), node.input[1] + "_matmul")
        model.graph.initializer.append(wt)
        bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
        if bias in inits and not numpy_helper.to_array(inits[bias]).any():
            bias = None
        out = node.output[0]
        mm_out = out if bias is None else out + "_matmul"
        rewritten.append(helper.make_node("MatMul", [node.input[0], wt.name], [mm_out], name=(node.name or out) + "_matmul"))
        if bias is not None:
            rewritten.append(helper.make_node("Add", [mm_out, bias], [out], name=(node.name or out) + "_bias"))
        done += 1
    del model.graph.node[:]
    model.graph.node.extend(rewritten)
    used = {x for n in model.graph.node for x in n.input}
    for t in list(model.graph.initializer):
        if t.name not in used:
            model.graph.initializer.remove(t)
    return done


def quantize_matmuls(src: Path, dst: Path, bits: int, block_size: int = 32, heads: bool = False) -> int:
    """Write ``dst``: ``src`` with every MatMul by a constant weight as MatMulNBits (``heads``: Gemm heads first
    rewritten as MatMul, so they are quantized too). Returns how many MatMulNBits the graph has."""
    import onnx
    import onnxruntime as ort
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    dst = Path(dst)
    with tempfile.TemporaryDirectory(dir=dst.parent, prefix=".quantize-") as tmp:
        folded = Path(tmp) / "folded.onnx"
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        so.optimized_model_filepath = str(folded)
        ort.InferenceSession(str(src), so, providers=["CPUExecutionProvider"])
        logger = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")
        level = logger.level
        logger.setLevel(logging.WARNING)  # it logs every node at INFO
        try:
            model = onnx.load(str(folded))
            if heads:
                gemm_to_matmul(model)
            q = MatMulNBitsQuantizer(model, bits=bits, block_size=block_size, is_symmetric=True, accuracy_level=4)
            q.process()
        finally:
            logger.setLevel(level)
        model = q.model.model
        part = Path(tmp) / "quantized.onnx"
        onnx.save(model, str(part))
        os.replace(part, dst)
    return sum(n.op_type == "MatMulNBits" for n in model.graph.node)
