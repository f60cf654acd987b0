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


TREES = ([-1, 0, 1, 2, 3], [-1, 0, 0, 1, 2, 3], [-1, 0, 1, 1, 2, 0])  # a chain, and two branched trees


@pytest.mark.parametrize("parents", TREES)
def test_int8_verify_rows_equal_plain_steps_bitwise(tiny_int8, parents):
    """Lossless by construction at INT8 on ONNX Runtime's CPU: every verify row (a chain, or a branched tree
    verified chain by chain) equals plain decoding of its path bit for bit, and so does the step after accepting."""
    from helpers import assert_tree_rows_are_plain_steps

    pipe = Pipeline.from_bundle(tiny_int8)
    ids = pipe.tokenizer.encode(" a red circle and a blue square on the left").ids
    assert_tree_rows_are_plain_steps(pipe, "Describe the image.", ids[:len(parents)], parents)


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


def _smoothable_graph(tmp_path, rng):
    """A Llama-style block in miniature: a norm's scale feeding three projections (k, gate, up), and gate * up
    feeding the down-projection; the two places SmoothQuant folds its per-channel division into. Channel 3 of the
    input is 60x the others and meets small weights, as outlier channels do in real models."""
    from onnx import TensorProto, helper, numpy_helper

    c = 32
    arrays = {"g": rng.uniform(0.5, 1.5, c), "wk": rng.standard_normal((c, c)), "wgate": rng.standard_normal((c, c)),
              "wup": rng.standard_normal((c, c)), "wdown": rng.standard_normal((c, c))}
    for w in ("wk", "wgate", "wup"):
        arrays[w][3] /= 60.0
    inits = [numpy_helper.from_array(a.astype(np.float32), n) for n, a in arrays.items()]
    nodes = [helper.make_node("Mul", ["x", "g"], ["h"], name="norm_scale"),
             helper.make_node("Shape", ["h"], ["h_shape"], name="shape_of_h"),
             helper.make_node("MatMul", ["h", "wk"], ["k"], name="k_proj"),
             helper.make_node("MatMul", ["h", "wgate"], ["gate"], name="gate_proj"),
             helper.make_node("MatMul", ["h", "wup"], ["up"], name="up_proj"),
             helper.make_node("Mul", ["gate", "up"], ["act"], name="gate_times_up"),
             helper.make_node("MatMul", ["act", "wdown"], ["y"], name="down_proj")]
    outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, "n", c]) for n in ("y", "k")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "n", c])], outs, inits)
    src = tmp_path / "g.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(src))
    feeds = []
    for _ in range(6):
        x = rng.standard_normal((1, 16, c)).astype(np.float32)
        x[..., 3] *= 60.0
        feeds.append({"x": x})
    return src, feeds


def _run(path, feed):
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(["y", "k"], feed)


def test_smoothing_keeps_the_float_graph_and_folds_into_producers(tmp_path):
    """SmoothQuant's migration changes no output of the float graph, adds no node (the division is folded into the
    norm scale and into the columns of the projection feeding the product), and moves the outlier channel's range into the weights."""
    from onnx import numpy_helper

    from calibration.int8 import channel_max, smooth_matmuls

    src, feeds = _smoothable_graph(tmp_path, np.random.default_rng(1))
    dst = tmp_path / "smoothed.onnx"
    record = smooth_matmuls(src, dst, feeds, alpha=0.5)
    assert record["smoothed_inputs"] == 2 and record["folded_into_norm_weights"] == 1
    assert record["folded_into_producing_matmuls"] == 1 and record["not_smoothed"] == 0
    before, after = onnx.load(str(src)), onnx.load(str(dst))
    assert [n.op_type for n in after.graph.node] == [n.op_type for n in before.graph.node]
    for feed in feeds:
        for a, b in zip(_run(src, feed), _run(dst, feed)):
            np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-3 * np.abs(a).max())
    ratio = {}
    for name, path in (("before", src), ("after", dst)):
        m = channel_max(onnx.load(str(path)), ["h"], feeds)["h"]
        ratio[name] = m.max() / np.median(m)
    assert ratio["after"] < ratio["before"] / 4, ratio
    g_before = numpy_helper.to_array(next(i for i in before.graph.initializer if i.name == "g"))
    g_after = numpy_helper.to_array(next(i for i in after.graph.initializer if i.name == "g"))
    assert not np.allclose(g_before, g_after)


def test_smoothing_lowers_int8_error(tmp_path):
    """Measured on the toy graph: with the outlier channel, INT8 without smoothing is further from FP32 than with."""
    from calibration.int8 import quantize_graph

    src, feeds = _smoothable_graph(tmp_path, np.random.default_rng(2))
    errors = {}
    for alpha in (None, 0.5):
        dst = tmp_path / f"q_{alpha}.onnx"
        record = quantize_graph(src, dst, feeds[:4], alpha=alpha)
        assert (record["smoothing"] is None) == (alpha is None)
        errs = []
        for feed in feeds[4:]:
            for ref, got in zip(_run(src, feed), _run(dst, feed)):
                errs.append(np.linalg.norm(got - ref) / np.linalg.norm(ref))
        errors[alpha] = float(np.mean(errs))
    assert errors[0.5] < 0.7 * errors[None], errors
