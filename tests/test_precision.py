"""FP16 bundles: vision and decoder graphs in FP16 with FP32 islands, validated against their
FP32 graphs at export, recorded in the manifest, and run on ONNX Runtime CPU: greedy speculative == plain at FP16,
and the FP16 answers of the trained smolvlm-tiny equal its FP32 answers on held-out scenes."""

import json

import numpy as np
import pytest

from dream_export.export.precision import FP32_OPS, drop_fp16_round_trips
from runtime.pipeline import Pipeline


def export_fp16(model_dir, out, drafter=None, tree=None):
    from dream_export.export.exporter import ExportOptions, export_bundle, load_target

    model, processor = load_target(str(model_dir))
    return export_bundle(model, processor, {"model": "fp16-test"},
                         ExportOptions(out=out, drafter=drafter, tree=tree, precision="fp16"), quiet=True)


@pytest.fixture(scope="module")
def tiny_fp16(tiny, tmp_path_factory):
    from dream_export.presets import shipped_defaults

    model_dir, _ = tiny
    shipped = shipped_defaults(model_dir)
    return export_fp16(model_dir, tmp_path_factory.mktemp("fp16") / "tiny", shipped.folder, shipped.tree)


def test_fp16_manifest_records_the_decision(tiny_fp16):
    m = json.loads((tiny_fp16 / "manifest.json").read_text())
    assert m["precision"] == "fp16"
    for name in ("vision", "decoder"):
        g = m["graphs"][name]
        assert g["precision"] == "fp16" and g["fp32_ops"] == FP32_OPS and g["not_trt_parsable"] == []
        assert 0 < g["max_fp16_activation"] < 65504
    assert m["graphs"]["decoder"]["fp32_nodes"] > 0  # the additive mask path
    # the shipped drafter follows the target's precision (--draft-precision not given): its graphs are FP16 too
    assert m["drafter"]["graph_precision"] == "fp16"
    for name in ("drafter", "draft_tree"):
        assert m["graphs"][name]["precision"] == "fp16" and m["graphs"][name]["not_trt_parsable"] == []
    assert any(c["graph"] == "decoder_fp16" and c["case"] == "step" for c in m["validation"])
    import onnx

    dec = onnx.load(str(tiny_fp16 / "decoder.onnx"), load_external_data=False)
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in dec.graph.initializer)
    assert all(i.type.tensor_type.elem_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.INT64) for i in dec.graph.input)
    # the logits (FP32 head) leave the graph without passing through FP16; inputs reach FP32 ops unrounded
    from dream_export.export.precision import fp16_sources

    held = {t for chain in fp16_sources(dec).values() for t in chain}
    assert "logits" not in held
    assert m["graphs"]["decoder"]["fp32_by_range"]["margin"] > 1


def test_fp16_tiny_is_lossless_and_agrees_with_fp32(tiny, tiny_fp16):
    from dream_export.scenes import random_scene

    _, fp32_bundle = tiny
    p16 = Pipeline.from_bundle(tiny_fp16, fused=False)  # the standard (TensorRT) graphs, now FP16
    p32 = Pipeline.from_bundle(fp32_bundle, fused=False)
    rng = np.random.default_rng(10_000_123)
    same, total, accepted = 0, 0, 0
    for _ in range(6):
        img = np.array(random_scene(rng).render().convert("RGB"))
        for q in ("Describe the image.", "How many shapes are there?"):
            plain = p16.generate(img, q, max_new_tokens=40, speculative=False)
            spec = p16.generate(img, q, max_new_tokens=40, speculative=True)
            assert spec.token_ids == plain.token_ids
            accepted += sum(a - 1 for a in spec.accept_lengths)
            same += plain.token_ids == p32.generate(img, q, max_new_tokens=40, speculative=False).token_ids
            total += 1
    assert accepted > 0
    assert same >= total - 1  # FP16 may flip a rare near-tie; a broken graph agrees on nothing


def test_fp16_another_layout_exports_and_is_lossless(zoo, images, tmp_path):
    from runtime.tree import TreeSpec

    model_dir, _ = zoo.get("layout_2b")
    zoo.with_drafter("layout_2b", "random")  # builds the drafter folder
    ddir = zoo._built["layout_2b+random"][2]
    bundle = export_fp16(model_dir, tmp_path / "b", ddir, TreeSpec(8, 3, 2))
    pipe = Pipeline.from_bundle(bundle, fused=False)
    for name in ("astronaut", "wide_strip"):
        plain = pipe.generate(str(images[name]), "Describe the image.", max_new_tokens=16, speculative=False)
        assert pipe.generate(str(images[name]), "Describe the image.", max_new_tokens=16, speculative=True).token_ids == plain.token_ids


def test_round_trip_removal_keeps_norm_statistics_in_fp32():
    """x^2 of activations around 400 overflows FP16 (160,000 > 65,504): ONNX Runtime's converter keeps Pow and
    ReduceMean in FP32 but passes the tensor between them through FP16; the pass removes that round trip."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.transformers.float16 import convert_float_to_float16

    w = numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
    two = numpy_helper.from_array(np.array(2.0, np.float32), "two")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"), helper.make_node("Pow", ["h", "two"], ["sq"], name="pow"),
             helper.make_node("ReduceMean", ["sq"], ["ms"], name="mean", keepdims=1, axes=[-1]),
             helper.make_node("Sqrt", ["ms"], ["rms"], name="sqrt")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("rms", TensorProto.FLOAT, [1, 1])], [w, two])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = np.full((1, 4), 100.0, np.float32)  # h = 400

    def run(m):
        return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]

    plain = convert_float_to_float16(onnx.load_from_string(model.SerializeToString()), keep_io_types=True, op_block_list=FP32_OPS)
    assert not np.isfinite(run(plain)).all()  # the converter alone overflows
    fixed = convert_float_to_float16(onnx.load_from_string(model.SerializeToString()), keep_io_types=True, op_block_list=FP32_OPS)
    assert drop_fp16_round_trips(fixed) >= 1
    np.testing.assert_allclose(run(fixed), [[400.0]], rtol=1e-3)


def test_int8_is_not_an_export_bundle_precision(zoo, tmp_path):
    from dream_export.errors import DreamExportError
    from dream_export.export.exporter import ExportOptions, export_bundle, load_target

    model_dir, _ = zoo.get("gqa_nosplit")
    model, processor = load_target(str(model_dir))
    with pytest.raises(DreamExportError, match="calibrate_bundle"):
        export_bundle(model, processor, {}, ExportOptions(out=tmp_path / "x", precision="int8"), quiet=True)
    assert not (tmp_path / "x").exists()


def test_measured_ranges_keep_outlier_tensors_in_fp32(tmp_path):
    """Real models have outlier activations that the fixed islands do not cover (SmolLM2-135M: the residual
    stream reaches 2.9e4, the RMSNorm mean of squares plus eps 1.4e6, where the eps Add is no norm-statistics op).
    Measured on real inputs, such a tensor stays FP32 with the nodes producing and reading it; the record says
    which and why; tensors far inside FP16's range are still FP16."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from dream_export.export.precision import FP16_MAX, RANGE_MARGIN, fp16_sources, to_fp16

    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.uniform(0.5, 1.0, (8, 8)).astype(np.float32) * 1000, "w1")  # an outlier path
    w2 = numpy_helper.from_array(rng.uniform(0.5, 1.0, (8, 8)).astype(np.float32) / 10000, "w2")
    w3 = numpy_helper.from_array(rng.uniform(-1, 1, (8, 8)).astype(np.float32), "w3")             # an ordinary one
    eps = numpy_helper.from_array(np.array(1e-5, np.float32), "eps")
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["big"], name="up"),
             helper.make_node("Add", ["big", "eps"], ["big_eps"], name="add_eps"),
             helper.make_node("MatMul", ["big_eps", "w2"], ["small"], name="down"),
             helper.make_node("MatMul", ["small", "w3"], ["y"], name="plain")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])], [w1, w2, w3, eps])
    src = tmp_path / "g.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(src))
    x = rng.uniform(20, 40, (1, 8)).astype(np.float32)  # "big" ~ 8 x 30 x 750 = 1.8e5 > 65504
    ref = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]

    def run(path):
        return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]

    to_fp16(src, tmp_path / "fixed_only.onnx")  # the fixed islands alone hold "big" in FP16, where it is inf
    # (ONNX Runtime's CPU kernels compute some FP16 ops in FP32, so the overflow shows in the held values, which
    # is what a TensorRT FP16 engine would store)
    big = x @ numpy_helper.to_array(w1)
    assert "big" in {t for c in fp16_sources(onnx.load(str(tmp_path / "fixed_only.onnx"))).values() for t in c}
    assert np.abs(big).max() > FP16_MAX and not np.isfinite(big.astype(np.float16)).all()
    record = to_fp16(src, tmp_path / "measured.onnx", [("real", {"x": x})])
    got = run(tmp_path / "measured.onnx")
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, ref, rtol=2e-2, atol=1e-3)
    by_range = record["fp32_by_range"]
    assert by_range["margin"] == RANGE_MARGIN and {"big", "big_eps"} <= set(by_range["largest"])
    held = {t for c in fp16_sources(onnx.load(str(tmp_path / "measured.onnx"))).values() for t in c}
    assert "big" not in held and "big_eps" not in held and "small" in held  # the rest is still FP16
