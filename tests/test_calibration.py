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
