"""The TensorRT plan layer, without TensorRT: every call the runtime makes (recorded on ONNX Runtime: prefill,
step, verify, both drafting paths, sessions, a context filled to the end) fits a profile of its graph's engine;
device buffer sizes; engine-cache keys and rebuilds."""

import numpy as np
import pytest

from runtime.backends.engine_plan import EngineCache, Plan, engine_dir, max_tiles
from runtime.pipeline import Pipeline
from runtime.tree import TreeSpec


def recording(pipe):
    calls = []
    run = pipe.backend.run

    def wrapped(graph, feeds, outputs=None):
        calls.append((graph, {k: tuple(v.shape) for k, v in feeds.items()}))
        return run(graph, feeds, outputs)

    pipe.backend.run = wrapped
    return calls


@pytest.mark.parametrize("combo", [("split_mha", "random"), ("ctx_small", "random")])
def test_every_recorded_call_fits_a_profile(zoo, images, combo, monkeypatch):
    from runtime import decoder

    # TensorRT runs 1-row steps and a tree verify in one call: the ORT-CPU runner's row-consistency rules
    # (1-row calls padded to 2, one call per chain) are off while recording what TensorRT gets
    init = decoder.PlainDecoder.__init__
    monkeypatch.setattr(decoder.PlainDecoder, "__init__",
                        lambda self, *a, row_consistent=False, **k: init(self, *a, row_consistent=False, **k))
    model_dir, bundle = zoo.with_drafter(*combo)
    pipe = Pipeline.from_bundle(bundle, fused=False)  # the standard graphs: what TensorRT gets
    calls = recording(pipe)
    plan = Plan.from_manifest(pipe.bundle.manifest)
    big = 200 if combo[0] == "ctx_small" else 48  # ctx_small: a 96-token context, filled to its end
    for unrolled in (False, None):
        pipe.unrolled_draft = unrolled
        for name in ("astronaut", "wide_strip"):
            pipe.generate(str(images[name]), "Describe the image.", max_new_tokens=big, speculative=True)
            pipe.generate(str(images[name]), "Describe the image.", max_new_tokens=big, speculative=False)
        pipe.generate(None, "What color is the circle?", max_new_tokens=big)
    sess = pipe.session(str(images["coffee"]))
    for q in ("What color is the circle?", "How many shapes are there?"):
        try:
            sess.ask(q, max_new_tokens=16, speculative=True)
        except Exception as exc:  # a small context may refuse the second turn: that is the session's error
            assert "context" in str(exc)
    kinds = set()
    for graph, shapes in calls:
        prof = plan.profile_for(graph, shapes)
        kinds.add((graph, prof.name))
    assert {("decoder", "prefill"), ("decoder", "step"), ("decoder", "verify")} <= kinds
    assert any(g == "vision" for g, _ in kinds) and any(g.startswith("draft") for g, _ in kinds)
    if combo[0] == "ctx_small":
        ctx = pipe.max_positions
        assert any(g == "decoder" and s["attention_mask"][-1] >= ctx - 1 for g, s in calls)  # reached the end


def test_profile_miss_says_why(zoo):
    _, bundle = zoo.with_drafter("split_mha", "random")
    plan = Plan.from_manifest(Pipeline.from_bundle(bundle).bundle.manifest)
    text = plan.manifest["text"]
    P, h = text["max_positions"], text["hidden_size"]
    kv = {f"past_{k}_{i}": (1, P + 50, text["kv_heads"], text["head_dim"]) for i in range(text["num_layers"]) for k in ("key", "value")}
    shapes = {"inputs_embeds": (1, 1, h), "attention_mask": (1, 1, 1, P + 51), "position_ids": (1, 1), **kv}
    with pytest.raises(ValueError, match="no profile serves"):
        plan.profile_for("decoder", shapes)
    with pytest.raises(ValueError, match="shape"):
        plan.profile_for("decoder", {**shapes, "inputs_embeds": (1, 1, h + 1)})
    prof = plan.profiles["vision"][0]
    lo, opt, hi = prof.input_shapes(plan.graph_inputs("vision"))["pixel_values"]
    assert lo[0] == 1 and hi[0] == max_tiles(plan.manifest) >= opt[0] >= 1 and lo[1:] == hi[1:]


def test_kv_buffer_plan_and_copy_back(zoo):
    _, bundle = zoo.with_drafter("gqa_nosplit", "random")
    manifest = Pipeline.from_bundle(bundle).bundle.manifest
    plan = Plan.from_manifest(manifest)
    text, n = manifest["text"], manifest["tree"]["total_tokens"]
    kv = plan.kv_buffers("float16")
    per = text["kv_heads"] * (text["max_positions"] + n) * text["head_dim"] * 2
    assert kv["capacity"] == text["max_positions"] + n and len(kv["buffers"]) == 2 * text["num_layers"]
    offsets = sorted(b["offset"] for b in kv["buffers"].values())
    assert all(b["bytes"] == per for b in kv["buffers"].values())
    assert all(o % 256 == 0 for o in offsets) and np.all(np.diff(offsets) >= per) and kv["total_bytes"] >= per * len(offsets)
    assert plan.kv_buffers("float32")["total_bytes"] >= 2 * kv["total_bytes"] - 256 * len(offsets)
    verify = plan.copy_back("verify", n, accepted=2)
    assert verify["kv_bytes"] == 0 and verify["hidden_bytes"] == 3 * text["hidden_size"] * 4
    assert plan.copy_back("step", 1)["logits_bytes"] == text["vocab_size"] * 4
    # a prompt prefill longer than the tree brings back one logits row; the shapes are the device decoder's layout
    assert plan.copy_back("prefill", n + 40)["logits_bytes"] == text["vocab_size"] * 4
    assert plan.logits_rows(n) == n and plan.logits_rows(n + 1) == 1
    assert next(iter(kv["buffers"].values()))["shape"] == (1, kv["capacity"], text["kv_heads"], text["head_dim"])
    assert kv["row_bytes"] == text["kv_heads"] * text["head_dim"] * 2


def test_engine_cache_keys_and_rebuilds(tmp_path):
    base = engine_dir(tmp_path, "NVIDIA Jetson Orin Nano", (8, 7), "10.3.0", "fp16")
    assert base == tmp_path / "engines" / "nvidia-jetson-orin-nano-sm87-trt10.3.0-fp16"
    others = {engine_dir(tmp_path, "NVIDIA H200", (9, 0), "10.3.0", "fp16"),
              engine_dir(tmp_path, "NVIDIA Jetson Orin Nano", (8, 7), "10.7.0", "fp16"),
              engine_dir(tmp_path, "NVIDIA Jetson Orin Nano", (8, 7), "10.3.0", "int8")}
    assert base not in others and len(others) == 3
    cache = EngineCache(base)
    assert cache.lookup("decoder", "a" * 64) is None
    path = cache.store("decoder", "a" * 64, b"engine-bytes", {"profiles": ["prefill", "step", "verify"]})
    assert cache.lookup("decoder", "a" * 64) == path and path.read_bytes() == b"engine-bytes"
    assert cache.lookup("decoder", "b" * 64) is None  # the graph changed: rebuild, never reuse
    assert not list(base.glob("*.tmp"))
