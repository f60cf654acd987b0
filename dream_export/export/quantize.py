"""Weight-only quantization of a drafter graph for ONNX Runtime on CPUs (``--draft-precision int8|int4``).

Only the drafter: its output is a proposal the target verifies, so quantizing it can change how many
tokens are accepted but never which tokens are emitted (greedy output stays identical to plain
decoding). The target is never quantized here.

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


def quantize_matmuls(src: Path, dst: Path, bits: int, block_size: int = 32) -> int:
    """Write ``dst``: ``src`` with every MatMul by a constant weight as MatMulNBits. Returns how many."""
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
            q = MatMulNBitsQuantizer(onnx.load(str(folded)), bits=bits, block_size=block_size, is_symmetric=True,
                                     accuracy_level=4)
            q.process()
        finally:
            logger.setLevel(level)
        model = q.model.model
        part = Path(tmp) / "quantized.onnx"
        onnx.save(model, str(part))
        os.replace(part, dst)
    return sum(n.op_type == "MatMulNBits" for n in model.graph.node)
