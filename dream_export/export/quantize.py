"""Weight-only quantization of traced graphs for ONNX Runtime on CPUs: the drafter (``--draft-precision
int8|int4``) and, for a family the written ORT-CPU decoder does not cover (``export/cpu_decoder.py``), the
traced ORT-CPU decoder (``--cpu-precision int8|int4``).

The drafter's output is a proposal the target verifies, so quantizing it can change how many tokens are
accepted but never which tokens are emitted. Quantizing the target changes the model: greedy output then
equals plain decoding *at that precision* (plain and speculative decoding run the same quantized graph),
not the float model's.

How: ONNX Runtime's own tools. A basic-level ORT optimization pass first (constant folding; it removes
the Identity nodes the exporter puts in front of weights shared by the unrolled tree levels, which the
quantizer would otherwise skip), then ``MatMulNBitsQuantizer``: block 32; int8 symmetric, int4 asymmetric
(as GGUF's Q4_1); MatMuls by a signed permutation (rotary's rotate-half) stay fp32, where they are exact.
Activations: int8 for the drafter (accuracy level 4, the fast kernels); fp32 for a traced target decoder
(TARGET_ACCURACY_LEVEL), whose step and verify calls run different attention kernels. The written decoder
gets int8 activations by making every position's arithmetic independent of the call's shape instead.
MatMulNBits is a com.microsoft op: the result is an ORT-only graph; TensorRT keeps the float graph.
Not handled: activation quantization for TensorRT (calibration/ does that for INT8 engines).
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import numpy as np

from runtime.ort_threads import session_options

PRECISIONS = {"fp32": None, "int8": 8, "int4": 4}
# Sanity bounds that catch a broken quantized graph (an unrelated output is ~1.0-1.4 off), not quality bounds:
# new K/V rows vs the float graph, relative L2 error |q - f| / |f| <= this (weight-only error grows with depth:
# SmolLM2-135M's last layer measured 0.06 at int8, 0.44 at int4) ...
RELATIVE_TOLERANCE = {"int8": 0.15, "int4": 0.7}
# ... and the target's logits: the share of positions whose top-1 token agrees with the float graph >= this
# (measured on SmolLM2-135M's validation cases: int8 93-100%, int4 77-100%)
MIN_TOP1_AGREEMENT = {"int8": 0.8, "int4": 0.5}
ASYMMETRIC = {8: False, 4: True}
# A traced target decoder keeps fp32 activations (MatMulNBits accuracy level 0). With int8 activations
# (level 4) the on-the-fly rounding is discontinuous: the ~1e-6 differences between a 1-token step and an
# N-token verify call (attention kernels differ by shape) flip roundings, which grow through the layers (on
# SmolLM2-135M int4, the logits of the same position differed by 0.63 between the two calls, against 6.5e-5 at
# level 0), and greedy speculative output then departs from plain decoding. The drafter's graph keeps level 4:
# its output is a proposal that the target verifies.
TARGET_ACCURACY_LEVEL = 0


def gemm_to_matmul(model) -> list[str]:
    """Gemm(A, B, C; transB=1, alpha=beta=1) by a constant 2-D B -> MatMul(A, B^T) (+ C when it is not all zeros),
    so that MatMulNBitsQuantizer (MatMul only) takes the LM head too (the float graphs keep the head as a Gemm
    over the stored [V,H] weight, shared with the embeddings). Returns the new MatMul nodes' names."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    rewritten, done = [], []
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
        done.append(rewritten[-1].name)
        if bias is not None:
            rewritten.append(helper.make_node("Add", [mm_out, bias], [out], name=(node.name or out) + "_bias"))
    del model.graph.node[:]
    model.graph.node.extend(rewritten)
    used = {x for n in model.graph.node for x in n.input}
    for t in list(model.graph.initializer):
        if t.name not in used:
            model.graph.initializer.remove(t)
    return done


def signed_permutations(model) -> list[str]:
    """Names of the MatMul nodes whose constant weight is a signed permutation (one +-1 per row and column), such
    as rotary embedding's rotate-half written as a matrix: fp32 computes them exactly, quantizing would not."""
    from onnx import numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    names = []
    for node in model.graph.node:
        if node.op_type != "MatMul" or len(node.input) < 2 or node.input[1] not in inits:
            continue
        t = inits[node.input[1]]
        if len(t.dims) != 2 or t.dims[0] != t.dims[1] or t.dims[0] > 1024:
            continue
        w = numpy_helper.to_array(t)
        nz = w != 0
        if np.all(np.abs(w[nz]) == 1) and np.all(nz.sum(0) == 1) and np.all(nz.sum(1) == 1):
            node.name = node.name or f"signed_permutation_{len(names)}"
            names.append(node.name)
    return names


def quantize_matmuls(src: Path, dst: Path, bits: int, block_size: int = 32, heads: bool = False,
                     head_bits: int | None = None, accuracy_level: int = 4) -> int:
    """Write ``dst``: ``src`` with every MatMul by a constant weight as MatMulNBits (``heads``: Gemm heads first
    rewritten as MatMul, so they are quantized too, at ``head_bits`` when given). ``accuracy_level`` 4 quantizes
    the activations to int8 on the fly (fastest); 0 keeps them fp32, which a target graph needs (see
    TARGET_ACCURACY_LEVEL). Returns how many MatMulNBits the graph has."""
    import onnx
    import onnxruntime as ort
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    dst = Path(dst)
    with tempfile.TemporaryDirectory(dir=dst.parent, prefix=".quantize-") as tmp:
        folded = Path(tmp) / "folded.onnx"
        so = session_options()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        so.optimized_model_filepath = str(folded)
        ort.InferenceSession(str(src), so, providers=["CPUExecutionProvider"])
        logger = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")
        level = logger.level
        logger.setLevel(logging.WARNING)  # it logs every node at INFO
        try:
            model = onnx.load(str(folded))
            head_nodes = gemm_to_matmul(model) if heads else []
            split = bool(head_nodes) and head_bits not in (None, bits)
            exact = signed_permutations(model)  # e.g. rotary's rotate-half: exact and tiny in fp32
            passes = [(bits, exact + (head_nodes if split else []))] + ([(head_bits, exact)] if split else [])
            for b, exclude in passes:  # the body, then (when its width differs) the heads, the only MatMuls left
                q = MatMulNBitsQuantizer(model, bits=b, block_size=block_size, is_symmetric=not ASYMMETRIC[b],
                                         accuracy_level=accuracy_level, nodes_to_exclude=exclude)
                q.process()
                model = q.model.model
        finally:
            logger.setLevel(level)
        part = Path(tmp) / "quantized.onnx"
        onnx.save(model, str(part))
        os.replace(part, dst)
    return sum(n.op_type == "MatMulNBits" for n in model.graph.node)
