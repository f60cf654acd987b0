"""The written ORT-CPU draft graph (dream_export/export/cpu_draft_tree.py): at fp32 it proposes exactly the tree the
PyTorch drafter proposes (same candidates and parents, scores and cache rows within float rounding), on prompts
whose positions skip image tokens too; CPU-only bundles carry it, quantized, and check it at export."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch


@pytest.fixture(scope="module")
def target_and_drafter(zoo):
    from dream_export.drafter.model import DrafterConfig, build_drafter
    from dream_export.export.exporter import load_target
    from dream_export.targets import adapter_for

    model_dir, _ = zoo.get("gqa_nosplit")
    model, processor = load_target(str(model_dir))
    adapter = adapter_for(model, processor)
    torch.manual_seed(11)
    cfg = DrafterConfig.for_target(model.config.text_config)
    drafter = build_drafter(cfg, adapter.lm_head().weight).eval()
    with torch.no_grad():  # open the gates, or the cross-attention block would contribute nothing
        drafter.cross.attn_gate.fill_(0.8)
        drafter.cross.mlp_gate.fill_(-0.6)
        for p in drafter.parameters():
            if p.dim() == 1 and p.numel() > 1:
                p.add_(0.05 * torch.randn_like(p))  # norms that are not all ones
    return adapter, drafter


def _cases(cfg, spec, rng):
    """Catch-ups as the runtime makes them: a prompt with no past whose positions skip dropped image tokens, a
    prompt with no skips, and a mid-sequence step of 3 accepted tokens over long caches."""
    from dream_export.export.drafter_export import drafter_feeds

    cases = []
    kept = np.array([0, 1, 2, 5, 6, 7, 11, 12, 13, 14])  # visual token compression: positions 3-4 and 8-10 dropped
    for name, positions, past_len, mem_past in (("prompt with skipped image positions", kept, 0, 0),
                                                ("prompt", np.arange(9), 0, 0),
                                                ("step over long caches", 40 + np.arange(3), 40, 39)):
        q = len(positions)
        self_pos = np.concatenate([np.arange(past_len), positions])
        mem_pos = np.concatenate([np.arange(mem_past), positions[:-1] if past_len == 0 else positions - 1])
        self_allowed = self_pos[None] <= positions[:, None]
        cross_allowed = mem_pos[None] < positions[:, None]
        feeds = drafter_feeds(spec, rng, cfg.hidden_size, past_len, mem_past, self_allowed, cross_allowed)
        feeds["position_ids"] = positions[None].astype(np.int64)
        assert feeds["inputs_embeds"].shape[1] == q
        cases.append((name, feeds))
    return cases


@pytest.mark.parametrize("depth,top_k", [(3, 2), (4, 3), (1, 4)])
def test_written_graph_proposes_the_pytorch_tree(target_and_drafter, depth, top_k, tmp_path):
    import onnxruntime as ort

    from dream_export.export.cpu_draft_tree import build_cpu_draft_tree, drafter_weights, unsupported
    from dream_export.export.draft_tree import DraftTreeGraph, draft_tree_spec
    from dream_export.export.specs import drafter_spec
    from runtime.tree import TreeSpec

    adapter, drafter = target_and_drafter
    assert unsupported(drafter) is None
    cfg = drafter.config
    tree = TreeSpec(8, depth, top_k)
    base = drafter_spec(drafter.past_shapes(), cfg.hidden_size, cfg.draft_vocab_size, tree.to_json())
    spec = draft_tree_spec(base, depth, top_k)
    reference = DraftTreeGraph(drafter, adapter.embed_tokens().weight, depth, top_k, base.extra["mask_min"]).eval()
    path = tmp_path / "tree.onnx"
    build_cpu_draft_tree(drafter_weights(drafter, adapter.embed_tokens().weight, 1.0), spec, path, None)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [t.name for t in spec.inputs]
    outs = [t.name for t in spec.outputs]
    for case, feeds in _cases(cfg, spec, np.random.default_rng(depth * 10 + top_k)):
        with torch.no_grad():
            ref = [r.numpy() for r in reference(*[torch.from_numpy(feeds[n]) for n in names])]
        got = dict(zip(outs, sess.run(outs, feeds)))
        np.testing.assert_array_equal(got["tree_tokens"], ref[0], err_msg=case)
        np.testing.assert_array_equal(got["tree_parents"], ref[2], err_msg=case)
        np.testing.assert_allclose(got["tree_scores"], ref[1], atol=1e-4, err_msg=case)
        for name, r in zip(outs[3:], ref[3:]):
            assert got[name].shape == r.shape, (case, name)
            np.testing.assert_allclose(got[name], r, atol=1e-4, rtol=1e-4, err_msg=f"{case}: {name}")


def test_cpu_only_bundle_carries_the_written_graph(target_and_drafter, zoo, tmp_path):
    """--cpu-precision int4: draft_tree_ort_cpu is the written graph (GroupQueryAttention per self-attention block and
    pass, int8-compute MatMulNBits), checked at export at fp32 against PyTorch and quantized against that build."""
    from dream_export.export.exporter import ExportOptions, export_bundle, load_target
    from runtime.tree import TreeSpec

    _, drafter = target_and_drafter
    drafter.save(tmp_path / "drafter")
    model_dir, _ = zoo.get("gqa_nosplit")
    model, processor = load_target(str(model_dir))
    bundle = export_bundle(model, processor, {"model": "int4"},
                           ExportOptions(out=tmp_path / "b", drafter=tmp_path / "drafter", tree=TreeSpec(8, 3, 2),
                                         cpu_precision="int4"), quiet=True)
    manifest = json.loads((bundle / "manifest.json").read_text())
    g = manifest["graphs"]["draft_tree_ort_cpu"]
    graph = onnx.load(str(bundle / g["file"]), load_external_data=False)
    ops = [n.op_type for n in graph.graph.node]
    passes = 3  # the catch-up and depths 2, 3
    assert ops.count("GroupQueryAttention") == 2 * passes and ops.count("RotaryEmbedding") == 4 * passes
    assert ops.count("MatMulNBits") == 14 * passes and "MatMul" in ops  # 13 projections + the head per pass
    levels = {a.i for n in graph.graph.node if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "accuracy_level"}
    assert levels == {4}
    checks = manifest["validation"]
    for name in ("draft_tree_ort_cpu_fp32", "draft_tree_ort_cpu"):
        got = [c for c in checks if c["graph"] == name]
        assert {c["case"] for c in got} == {"prefill", "step"}, name
        assert all(c["within"] in (True, None) for c in got), name


def test_other_architectures_keep_the_traced_graph(zoo):
    from dream_export.drafter.model import DrafterConfig, build_drafter
    from dream_export.export.cpu_draft_tree import unsupported
    from dream_export.export.exporter import load_target

    model_dir, _ = zoo.get("gqa_nosplit")
    model, _ = load_target(str(model_dir))
    cfg = DrafterConfig.for_target(model.config.text_config)
    cfg.arch = "concat"
    reason = unsupported(build_drafter(cfg, model.lm_head.weight))
    assert reason and "concat" in reason
