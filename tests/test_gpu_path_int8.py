"""INT8 Q/DQ placement as TensorRT wants it: on MatMul weights and activation inputs, never on a MatMul output
(that would quantize attention scores before the mask and the softmax)."""

import json

import onnx
import pytest

from calibration.int8 import calibrate_bundle


def matmul_outputs_quantized(model) -> list[str]:
    made_by = {o: n for n in model.graph.node for o in n.output}
    return [n.name for n in model.graph.node
            if n.op_type == "QuantizeLinear" and made_by.get(n.input[0]) is not None
            and made_by[n.input[0]].op_type == "MatMul"]


def activation_dq_inputs(model, node) -> list[str]:
    """The inputs of ``node`` that are dequantized activations (a DequantizeLinear fed by a QuantizeLinear)."""
    made_by = {o: n for n in model.graph.node for o in n.output}
    out = []
    for i in node.input:
        dq = made_by.get(i)
        if dq is not None and dq.op_type == "DequantizeLinear":
            q = made_by.get(dq.input[0])
            if q is not None and q.op_type == "QuantizeLinear":
                out.append(i)
    return out


@pytest.fixture(scope="module")
def int8_bundle(tiny, tmp_path_factory):
    _, fp32 = tiny
    return calibrate_bundle(fp32, tmp_path_factory.mktemp("int8q") / "tiny", "scenes:8", heldout=2)


def test_no_quantize_linear_on_a_matmul_output(int8_bundle):
    m = json.loads((int8_bundle / "manifest.json").read_text())
    checked = 0
    for name, g in m["graphs"].items():
        if g.get("precision") != "int8":
            continue
        model = onnx.load(str(int8_bundle / g["file"]))
        assert matmul_outputs_quantized(model) == [], name
        q_inputs = {n.input[0] for n in model.graph.node if n.op_type == "QuantizeLinear"}
        dq_out = {n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
        matmuls = [n for n in model.graph.node if n.op_type == "MatMul"]
        # the quantized MatMuls still get Q/DQ on both inputs (weights and activations)
        assert any(all(i in dq_out for i in n.input) for n in matmuls), name
        # a MatMul of two activations (attention's QK^T and P.V) stays float: only projections run in INT8
        assert not [n.name for n in matmuls if len(activation_dq_inputs(model, n)) > 1], name
        assert q_inputs
        checked += 1
    assert checked >= 2  # vision and decoder
    assert all(c["ok"] for c in m["validation"] if c["graph"].endswith("_int8"))
