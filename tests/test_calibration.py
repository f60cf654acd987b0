"""INT8 (calibration/): QDQ graphs calibrated on recorded real inputs, checked against FP32 on held-out calls,
recorded in the manifest, TensorRT-parsable, and run on ONNX Runtime CPU: greedy speculative == plain at INT8,
and smolvlm-tiny's acceptance length with its FP32-trained drafter stays >= 95% of FP32's."""

import json

import numpy as np
import onnx
import pytest

from calibration.int8 import CalibrationError, calibrate_bundle
from runtime.pipeline import Pipeline


@pytest.fixture(scope="module")
def tiny_int8(tiny, tmp_path_factory):
    _, fp32 = tiny
    return calibrate_bundle(fp32, tmp_path_factory.mktemp("int8") / "tiny", "scenes:24")


def test_int8_bundle_is_recorded_and_parsable(tiny_int8):
    m = json.loads((tiny_int8 / "manifest.json").read_text())
    assert m["precision"] == "int8"
    for name in ("vision", "decoder"):
        g = m["graphs"][name]
        assert g["file"].endswith("_int8.onnx") and g["precision"] == "int8" and g["quantized_ops"] == ["MatMul"]
        assert g["calibration"]["data"] == "scenes:24" and g["calibration"]["calls"] > 0
        assert {"QuantizeLinear", "DequantizeLinear"} <= set(g["ops"]) and g["not_trt_parsable"] == []
        model = onnx.load(str(tiny_int8 / g["file"]))
        inits = {t.name: t for t in model.graph.initializer}
        weights_dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits
                      and inits[n.input[0]].data_type == onnx.TensorProto.INT8]
        assert weights_dq  # INT8 weights ...
        assert any(len(inits[n.input[1]].dims) == 1 and inits[n.input[1]].dims[0] > 1 for n in weights_dq)  # ... per channel
        zero_points = [inits[n.input[2]] for n in weights_dq if len(n.input) > 2 and n.input[2] in inits]
        assert all(not np.any(onnx.numpy_helper.to_array(z)) for z in zero_points)  # symmetric
    assert any(c["graph"] == "decoder_int8" for c in m["validation"])
    assert not [p for p in tiny_int8.iterdir() if p.name in ("decoder.onnx", "vision.onnx")]


def test_int8_is_lossless_and_keeps_acceptance(tiny, tiny_int8):
    from dream_export.scenes import random_scene

    _, fp32 = tiny
    p8 = Pipeline.from_bundle(tiny_int8)
    assert p8.graphs_in_use(True)[1] == "decoder"  # its own INT8 graph, not the FP32 fused one
    p32 = Pipeline.from_bundle(fp32)
    rng = np.random.default_rng(10_000_777)
    acc8, acc32, same, n = [], [], 0, 0
    for _ in range(8):
        img = np.array(random_scene(rng).render().convert("RGB"))
        for q in ("Describe the image.", "How many shapes are there?"):
            plain = p8.generate(img, q, max_new_tokens=40, speculative=False)
            spec = p8.generate(img, q, max_new_tokens=40, speculative=True)
            assert spec.token_ids == plain.token_ids
            acc8 += spec.accept_lengths
            ref = p32.generate(img, q, max_new_tokens=40, speculative=True)
            acc32 += ref.accept_lengths
            same += ref.token_ids == plain.token_ids
            n += 1
    assert np.mean(acc8) >= 0.95 * np.mean(acc32)
    assert same >= n // 2  # INT8 is another model, but close to FP32


def test_int8_another_layout_is_lossless(zoo, images, tmp_path):
    _, fp32 = zoo.with_drafter("layout_256m", "random")
    b = calibrate_bundle(fp32, tmp_path / "b", "scenes:6")
    pipe = Pipeline.from_bundle(b)
    for name in ("astronaut", "wide_strip", "coffee"):
        plain = pipe.generate(str(images[name]), "Describe the image.", max_new_tokens=16, speculative=False)
        assert pipe.generate(str(images[name]), "Describe the image.", max_new_tokens=16, speculative=True).token_ids == plain.token_ids


def test_bad_calibration_requests(zoo, tmp_path):
    from dream_export.errors import DreamExportError

    _, fp32 = zoo.get("gqa_nosplit")
    with pytest.raises(DreamExportError, match="not a file and not scenes:N"):
        calibrate_bundle(fp32, tmp_path / "x", "nowhere.jsonl")
    with pytest.raises(CalibrationError, match="at least 2"):
        calibrate_bundle(fp32, tmp_path / "x", "scenes:1")
    (tmp_path / "exists").mkdir()
    with pytest.raises(CalibrationError, match="--force"):
        calibrate_bundle(fp32, tmp_path / "exists", "scenes:4")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists"]  # nothing half-written


def test_matmuls_with_outlier_inputs_stay_float(tmp_path):
    """Measured, not assumed: a MatMul whose input has rare huge values (as SmolLM2's MLP down-projection inputs
    have) keeps float weights and activations; an ordinary one is quantized; the record names the kept node."""
    from onnx import TensorProto, helper, numpy_helper

    from calibration.int8 import OUTLIER_RATIO, quantize_graph

    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((64, 64)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.standard_normal((64, 64)).astype(np.float32), "w2")
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="ordinary"),
             helper.make_node("MatMul", ["z", "w2"], ["g"], name="down_proj"),
             helper.make_node("Add", ["h", "g"], ["y"], name="add")]
    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, "n", 64]) for n in ("x", "z")]
    graph = helper.make_graph(nodes, "g", io, [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "n", 64])], [w1, w2])
    src = tmp_path / "g.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(src))
    feeds = []
    for _ in range(6):
        z = rng.standard_normal((1, 32, 64)).astype(np.float32)
        z[0, 0, 5] = 500.0  # one massive activation per call: 0.05% of the values
        feeds.append({"x": rng.standard_normal((1, 32, 64)).astype(np.float32), "z": z})
    record = quantize_graph(src, tmp_path / "q.onnx", feeds)
    assert record["outlier_ratio"] == OUTLIER_RATIO
    assert set(record["float_matmuls"]) == {"down_proj"} and record["float_matmuls"]["down_proj"] > OUTLIER_RATIO
    q = onnx.load(str(tmp_path / "q.onnx"))
    producers = {o: n for n in q.graph.node for o in n.output}
    down = next(n for n in q.graph.node if n.op_type == "MatMul" and n.name == "down_proj")
    ordinary = next(n for n in q.graph.node if n.op_type == "MatMul" and n.name == "ordinary")
    assert all(producers.get(i) is None or producers[i].op_type != "DequantizeLinear" for i in down.input)
    assert all(producers.get(i) is not None and producers[i].op_type == "DequantizeLinear" for i in ordinary.input)
