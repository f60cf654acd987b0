"""Does this CPU compute a row of MatMulNBits (int8 compute) the same whatever else shares the call?

    python benchmarks/row_consistency.py [--rows 2,3,4,5,8] [--threads 2]

For SmolLM2-135M's three product shapes (576x1536, 1536x576 and the 576x49152 head), 4- and 8-bit weights, block 32,
``accuracy_level`` 4 (what the written ORT-CPU decoder uses), random weights quantized by ONNX Runtime's own
``MatMulNBitsQuantizer``: the largest difference between each row of an M-row call and the same row computed alone,
and between the rows of an M-row call and the same rows in 2-row calls. Zero everywhere means a lone row needs no
padding here; the runtime asks the same question of a bundle's whole graph at load (``ChainDecoder.lone_row_differs``).
Measured 2026-12-08: an AVX2 CPU without AVX-512 VNNI gives 2-4e-6 against a lone 4-bit row and 0 between calls of 2
rows or more; 8-bit weights give 0 everywhere. Not a test: nothing here asserts.
"""

from __future__ import annotations

import argparse

import numpy as np


def session(k: int, n: int, bits: int, threads: int):
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    w = (np.random.default_rng(0).standard_normal((k, n)) * 0.05).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["M", n])],
                              [numpy_helper.from_array(w, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    quant = MatMulNBitsQuantizer(model, algo_config=DefaultWeightOnlyQuantConfig(
        block_size=32, is_symmetric=False, accuracy_level=4, bits=bits))
    quant.process()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    return ort.InferenceSession(quant.model.model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="2,3,4,5,8")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    counts = [int(m) for m in args.rows.split(",")]
    if any(m < 2 for m in counts):
        raise SystemExit(f"--rows {args.rows}: expected row counts of 2 or more")
    top = max(counts)
    print("| shape | bits | " + " | ".join(f"{m} rows vs alone" for m in counts) + f" | {top} rows vs 2-row calls |")
    print("|---|---|" + "---|" * (len(counts) + 1))
    rng = np.random.default_rng(1)
    for k, n in ((576, 1536), (1536, 576), (576, 49152)):
        for bits in (4, 8):
            s = session(k, n, bits, args.threads)
            x = rng.standard_normal((top + top % 2, k)).astype(np.float32)
            alone = np.concatenate([s.run(None, {"x": x[i:i + 1]})[0] for i in range(top)])
            diffs = [float(np.abs(s.run(None, {"x": x[:m]})[0] - alone[:m]).max()) for m in counts]
            pairs = np.concatenate([s.run(None, {"x": x[i:i + 2]})[0] for i in range(0, top + top % 2, 2)])[:top]
            wide = float(np.abs(s.run(None, {"x": x[:top]})[0] - pairs).max())
            print(f"| {k}x{n} | {bits} | " + " | ".join(f"{d:.1e}" for d in diffs) + f" | {wide:.1e} |", flush=True)


if __name__ == "__main__":
    main()
