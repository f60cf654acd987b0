"""The exporter's own checks and storage: realistic validation inputs, tolerances scaled to each output, one copy
of every weight, the weight-only quantized ORT-CPU decoder, and what the runtime prepares when it loads."""

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from dream_export.export.validate import Check, TextSample, compare, decoder_cases


def test_compare_scales_with_magnitude_and_flags_clear_top1_mismatches():
    ref = np.array([[[20.0, 10.0, -5.0], [1.0, 1.0000001, 0.0]]], np.float32)
    close = ref + np.float32(0.015)  # 1.5e-2 off: beyond atol 1e-3, within atol + 1e-3 x 20
    assert compare("g", "c", "logits", ref, close, 1e-3, 1e-3).within is False  # |1.0| entries: 1.5e-2 > 2e-3
    big = ref * np.float32(1.0005)
    c = compare("g", "c", "logits", ref, big, 1e-3, 1e-3)
    assert c.ok and c.argmax_agreement == 1.0
    swapped = ref.copy()
    swapped[0, 0, [0, 1]] = swapped[0, 0, [1, 0]]  # a clear top-1 change (margin 10)
    c = compare("g", "c", "logits", ref, swapped, 1e-3, 1e-3)
    assert not c.ok and c.argmax_clear_mismatches == 1 and c.argmax_agreement == 0.5
    tie = ref.copy()
    tie[0, 1, [0, 1]] = tie[0, 1, [1, 0]]  # a near-tie flips: reported, not a failure
    c = compare("g", "c", "logits", ref, tie, 1e-3, 1e-3)
    assert c.ok and c.argmax_agreement == 0.5 and c.argmax_clear_mismatches == 0
    assert not Check("g", "c", "x", float("nan"), 1.0).ok


def test_quantized_checks_catch_a_broken_graph_not_quantization_noise():
    """Quantized graphs: relative L2 error of K/V (a few outliers do not fail it; an unrelated output does) and a
    least top-1 agreement of the logits."""
    from dream_export.export.quantize import MIN_TOP1_AGREEMENT, RELATIVE_TOLERANCE
    from dream_export.export.validate import relative_error_check

    rng = np.random.default_rng(0)
    ref = rng.standard_normal((1, 3, 16, 64)).astype(np.float32)
    noisy = ref + 0.1 * rng.standard_normal(ref.shape).astype(np.float32)
    noisy[0, 0, 0, :4] += 3.0  # outliers far beyond any max-abs bound scaled to |ref|
    for p in ("int8", "int4"):
        assert relative_error_check("g", "c", "present_key_0", ref, noisy, RELATIVE_TOLERANCE[p]).ok
        unrelated = rng.standard_normal(ref.shape).astype(np.float32)
        c = relative_error_check("g", "c", "present_key_0", ref, unrelated, RELATIVE_TOLERANCE[p])
        assert not c.ok and "at most" in c.describe() and c.max_abs_diff > 1.0
        c = Check("g", "c", "logits (finite)", 0.0, 0.0, argmax_agreement=0.3, min_agreement=MIN_TOP1_AGREEMENT[p])
        assert not c.ok and "expected" in c.describe()
        c.argmax_agreement = 0.9
        assert c.ok
    nan = ref.copy()
    nan[0, 0, 0, 0] = np.nan
    assert not relative_error_check("g", "c", "present_key_0", ref, nan, 0.7).ok


def test_decoder_cases_use_real_tokens_and_the_graphs_own_prefill(zoo):
    """prefill = the embeddings of real ids; the step's past K/V = what the exported graph's prefill returned."""
    import onnxruntime as ort

    from dream_export.export.exporter import load_target
    from dream_export.export.specs import decoder_spec
    from dream_export.targets import adapter_for

    model_dir, bundle = zoo.get("gqa_nosplit")
    model, processor = load_target(str(model_dir))
    adapter = adapter_for(model, processor)
    sample = adapter.validation_sample()
    assert isinstance(sample, TextSample) and len(sample.prompt_ids) > 10 and len(sample.continuation_ids) > 10
    manifest = json.loads((bundle / "manifest.json").read_text())
    t = manifest["text"]
    spec = decoder_spec(t["num_layers"], t["kv_heads"], t["head_dim"], t["hidden_size"], t["vocab_size"])
    emb = adapter.embed_tokens().weight.detach().numpy()
    cases = dict(decoder_cases(spec, emb, sample, bundle / "decoder.onnx", seed=0))
    prefill, step, tree = cases["prefill"], cases["step"], cases["tree16"]
    np.testing.assert_array_equal(prefill["inputs_embeds"][0], emb[sample.prompt_ids])
    np.testing.assert_array_equal(step["inputs_embeds"][0], emb[sample.continuation_ids[:1]])
    sess = ort.InferenceSession(str(bundle / "decoder.onnx"), providers=["CPUExecutionProvider"])
    present = sess.run(["present_key_0"], prefill)[0]
    np.testing.assert_array_equal(step["past_key_0"], present)
    assert tree["past_key_0"].shape[1] == len(sample.prompt_ids) + 1 and tree["inputs_embeds"].shape[1] == 16  # [1,P,kvh,hd]


def test_weights_are_stored_once_and_embeddings_come_from_them(zoo):
    from dream_export.export.exporter import load_target
    from runtime.pipeline import Pipeline

    model_dir, bundle = zoo.get("gqa_nosplit")  # tied head: the head's Gemm weight is the embedding matrix
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert sorted(p.name for p in bundle.iterdir() if p.suffix in (".bin", ".npy", ".data")) == ["weights.bin"]
    for name, g in manifest["graphs"].items():
        assert g["external_data"] == ["weights.bin"], name
        model = onnx.load(str(bundle / g["file"]), load_external_data=False)
        big = [t for t in model.graph.initializer if t.data_location != onnx.TensorProto.EXTERNAL and len(t.raw_data) >= 1024]
        assert not big, (name, [t.name for t in big])
    model, _ = load_target(str(model_dir))
    params = sum(p.numel() for p in model.parameters())  # tied: counted once
    assert (bundle / "weights.bin").stat().st_size < 1.1 * 4 * params + 4096 * 200
    pipe = Pipeline.from_bundle(bundle)
    np.testing.assert_array_equal(pipe.embeddings[np.arange(len(pipe.embeddings))],
                                  model.get_input_embeddings().weight.detach().numpy())


def test_draft_tree_reexport_reuses_the_shared_weights(zoo):
    """set_draft_tree (dream-export --tune) adds a graph whose target embeddings/head/drafter layers are found in
    weights.bin; only what is new (if anything) gets its own blob, and the bundle stays verified."""
    from runtime.bundle import Bundle
    from runtime.tree import TreeSpec

    _, bundle = zoo.with_tree("gqa_nosplit", "random", TreeSpec(6, 5, 1))
    b = Bundle.load(bundle)
    entry = b.manifest["graphs"]["draft_tree"]
    assert entry["file"] == "draft_tree_d5k1.onnx" and "weights.bin" in entry["external_data"]
    listed = set(b.manifest["files"])
    assert {p.name for p in bundle.iterdir() if p.is_file()} == listed | {"manifest.json"}


def test_gemm_head_becomes_matmul_for_the_quantizer(tmp_path):
    """gemm_to_matmul keeps the graph's outputs (so MatMulNBits can take the LM head)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from dream_export.export.quantize import gemm_to_matmul

    rng = np.random.default_rng(0)
    w = rng.standard_normal((50, 8)).astype(np.float32)
    for bias in (np.zeros(50, np.float32), rng.standard_normal(50).astype(np.float32)):
        g = helper.make_graph([helper.make_node("Gemm", ["x", "w", "b"], ["y"], transB=1)], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 50])],
                              [numpy_helper.from_array(w, "w"), numpy_helper.from_array(bias, "b")])
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
        x = rng.standard_normal((3, 8)).astype(np.float32)
        before = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
        assert len(gemm_to_matmul(m)) == 1
        assert [n.op_type for n in m.graph.node] == (["MatMul"] if not bias.any() else ["MatMul", "Add"])
        after = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
        np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-5)


def test_int8_cpu_decoder_is_checked_and_lossless(zoo, images, tmp_path):
    """--cpu-precision int8: a CPU-only bundle whose written ORT-CPU decoders (one per chain count) have MatMulNBits
    weights with int8 compute, the LM head included, checked at export against their fp32 build (itself checked
    against PyTorch); plain and speculative decoding run the same graphs, so they agree token for token."""
    import torch

    from dream_export.drafter.model import DrafterConfig, build_drafter
    from dream_export.export.exporter import ExportOptions, export_bundle, load_target
    from runtime.pipeline import Pipeline
    from runtime.tree import TreeSpec

    model_dir, _ = zoo.get("gqa_nosplit")
    model, processor = load_target(str(model_dir))
    torch.manual_seed(3)
    drafter = build_drafter(DrafterConfig.for_target(model.config.text_config), model.lm_head.weight)
    drafter.save(tmp_path / "drafter")
    bundle = export_bundle(model, processor, {"model": "int8"},
                           ExportOptions(out=tmp_path / "b", drafter=tmp_path / "drafter", tree=TreeSpec(8, 3, 2),
                                         cpu_precision="int8"), quiet=True)
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert "decoder" not in manifest["graphs"] and manifest["embeddings"] is None  # no float graphs for TensorRT
    layers = manifest["text"]["num_layers"]
    for chains, name in ((1, "decoder_ort_cpu"), (2, "decoder_ort_cpu_c2")):
        g = manifest["graphs"][name]
        assert g["precision"] == "int8" and g["file"] == f"{name}_int8.onnx" and g["kv"]["chains"] == chains
        assert "com.microsoft::MatMulNBits" in g["non_standard"]
        graph = onnx.load(str(bundle / g["file"]), load_external_data=False)
        ops = [n.op_type for n in graph.graph.node]
        # packed q/k/v, o, gate, up, down per layer and the LM head; one GroupQueryAttention per chain per layer
        assert ops.count("MatMulNBits") == 5 * layers + 1 and ops.count("GroupQueryAttention") == chains * layers
        assert "MatMul" not in ops and "Gemm" not in ops
        levels = {a.i for n in graph.graph.node if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "accuracy_level"}
        assert levels == {4}, levels  # int8 compute: rows are computed independently (export/cpu_decoder.py)
    # the fp32 build of the largest graph vs PyTorch, then each int8 graph vs its fp32 build
    for graph in ("decoder_ort_cpu_c2", "decoder_ort_cpu_int8", "decoder_ort_cpu_c2_int8"):
        checks = [c for c in manifest["validation"] if c["graph"] == graph]
        assert {c["case"] for c in checks} >= {"prefill", "step", "tree16"}, graph
    pipe = Pipeline.from_bundle(bundle)
    # the same positions one token at a time and in one call (what verify does) give the same logits, bit for bit
    prep = pipe.prepare([str(images["coffee"])], "Describe the image.")
    ids = np.arange(5, 17)
    one, many = pipe.new_decoder(), pipe.new_decoder()
    pipe.step(one, pipe.prompt_embeds(prep)), pipe.step(many, pipe.prompt_embeds(prep))
    stepwise = np.stack([pipe.step(one, pipe.embed(ids[i:i + 1])[None])["logits"][0, -1] for i in range(len(ids))])
    np.testing.assert_array_equal(pipe.step(many, pipe.embed(ids)[None])["logits"][0], stepwise)
    for name in ("coffee", "astronaut", "chelsea"):
        spec = pipe.generate([str(images[name])], "Describe the image.", max_new_tokens=24, speculative=True)
        plain = pipe.generate([str(images[name])], "Describe the image.", max_new_tokens=24, speculative=False)
        assert spec.token_ids == plain.token_ids, name


def test_pipeline_creates_its_sessions_at_load(zoo):
    """ttft_ms never pays session creation: every graph of the default path is opened by from_bundle."""
    from runtime.pipeline import Pipeline

    _, bundle = zoo.with_drafter("gqa_nosplit", "random")
    pipe = Pipeline.from_bundle(bundle)
    used = pipe.graphs_in_use()
    assert set(used) == {"vision", "decoder_ort_cpu", "draft_tree"}
    assert set(pipe.backend._sessions) == set(used)
    assert pipe.load_ms > 0 and pipe.speculative_default
    cold = Pipeline.from_bundle(bundle, warm=False)
    assert cold.backend._sessions == {}


def test_text_only_prompt_from_the_cli(zoo, capsys):
    """dream-run PROMPT with no image answers text-only, as transformers does."""
    from helpers import hf_generate
    from runtime import cli

    model_dir, bundle = zoo.get("split_mha")
    capsys.readouterr()
    assert cli.main(["What is a robot?", "--bundle", str(bundle), "--json", "--max-new-tokens", "12"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["token_ids"] == hf_generate(str(model_dir), [], "What is a robot?", 12)


def test_drafter_accepts_the_train_out_folder(tmp_path):
    """dream-export --drafter takes dream-train's --out folder as well as its drafter/ subfolder."""
    from dream_export.drafter.config import drafter_folder as _drafter_folder

    (tmp_path / "drafter").mkdir()
    (tmp_path / "drafter" / "drafter_config.json").write_text("{}")
    assert _drafter_folder(tmp_path) == tmp_path / "drafter"
    assert _drafter_folder(tmp_path / "drafter") == tmp_path / "drafter"
