"""Device memory budgets (runtime/budget.py) computed from a bundle's manifest, the manifests derived from a
checkpoint's config alone (benchmarks/jetson_budget.py: for Jetson budgets of checkpoints that cannot be
downloaded here) checked against real exports, and the runtime's ``context`` knob that the budget recommends."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from runtime.budget import DEVICES, max_context, memory_budget
from runtime.cli import main as run_main
from runtime.engines import main as engines_main
from runtime.errors import InputError
from runtime.pipeline import Pipeline


def _manifest(bundle):
    return json.loads((bundle / "manifest.json").read_text())


def test_config_derived_weights_match_a_real_export(tiny):
    from transformers import Idefics3Config

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "jetson_budget.py"
    spec = importlib.util.spec_from_file_location("jetson_budget", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    manifest_from_config = module.manifest_from_config

    model_dir, bundle = tiny
    real = _manifest(bundle)
    derived = manifest_from_config(Idefics3Config.from_pretrained(str(model_dir)), "fp32")
    for g in ("vision", "decoder", "drafter"):
        want, got = real["graphs"][g]["weights_bytes"], derived["graphs"][g]["weights_bytes"]
        assert abs(got - want) <= 0.01 * want, (g, got, want)
    assert derived["text"] == {k: real["text"][k] for k in derived["text"]}
    # fp16 / int8 by the exporter's rules: matrices shrink, the head stays FP32
    w16 = manifest_from_config(Idefics3Config.from_pretrained(str(model_dir)), "fp16")["graphs"]["decoder"]["weights_bytes"]
    w8 = manifest_from_config(Idefics3Config.from_pretrained(str(model_dir)), "int8")["graphs"]["decoder"]["weights_bytes"]
    assert w8 < w16 < derived["graphs"]["decoder"]["weights_bytes"]


def test_budget_counts_what_the_runtime_allocates(tiny):
    _, bundle = tiny
    m = _manifest(bundle)
    t = m["text"]
    b = memory_budget(m, context=512, prefill=128)
    cap = 512 + m["tree"]["total_tokens"]
    assert b["mib"]["kv"] == round(2 * t["num_layers"] * t["kv_heads"] * t["head_dim"] * 4 * cap / 2**20, 1)
    assert b["mib"]["engines"] == round(sum(m["graphs"][g]["weights_bytes"] for g in ("vision", "decoder", "drafter", "draft_tree")) / 2**20, 1)
    assert b["kv_dtype"] == "float32" and b["fits"] and b["context"] == 512 and b["prefill"] == 128
    longer = memory_budget(m, context=1024, prefill=128)
    assert longer["mib"]["kv"] > b["mib"]["kv"] and longer["total_mib"] > b["total_mib"]
    with pytest.raises(ValueError, match="expected one of"):
        memory_budget(m, device="jetson-tx2")
    broken = json.loads(json.dumps(m))
    del broken["graphs"]["decoder"]["weights_bytes"]
    with pytest.raises(ValueError, match="re-export"):
        memory_budget(broken)


def test_max_context_is_the_longest_that_fits(tiny):
    """A model made huge on paper: the longest fitting context fits, 256 more does not."""
    _, bundle = tiny
    m = _manifest(bundle)
    m["text"].update(num_layers=400, kv_heads=32, head_dim=128, max_positions=16384)
    n = max_context(m, "orin-nano-8gb")
    assert 0 < n < 16384 and n % 256 == 0
    assert memory_budget(m, n, min(1024, n))["fits"] and not memory_budget(m, n + 256, 1024)["fits"]
    assert max_context(m, "agx-orin-64gb") > n and set(DEVICES) >= {"orin-nano-8gb", "agx-orin-64gb"}


def test_budget_cli_needs_no_gpu(tiny, capsys):
    _, bundle = tiny
    capsys.readouterr()
    assert engines_main(["--bundle", str(bundle), "--budget", "--context", "256"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["context"] == 256 and report["fits"] and report["longest_context_that_fits"] >= 256


def test_a_shorter_context_limits_prompts_and_answers(tiny, images, capsys):
    _, bundle = tiny
    full = Pipeline.from_bundle(bundle)
    prompt = "Describe the image."
    n = len(full.prepare([images["coffee"]], prompt).input_ids)
    ctx = n + 12  # room for a few answer tokens only
    short = Pipeline.from_bundle(bundle, context=ctx)
    assert short.new_decoder().capacity < full.new_decoder().capacity
    want = full.generate([images["coffee"]], prompt, max_new_tokens=40, speculative=False)
    assert len(want.token_ids) > 12  # the full answer does not fit the short context
    for speculative in (False, True):
        got = short.generate([images["coffee"]], prompt, max_new_tokens=40, speculative=speculative)
        assert got.token_ids == want.token_ids[: len(got.token_ids)] and len(got.token_ids) >= 10
        assert got.stop_reason == "context_full" and n + len(got.token_ids) <= ctx
    with pytest.raises(InputError, match="context"):
        Pipeline.from_bundle(bundle, context=10).generate([images["coffee"]], prompt)
    with pytest.raises(InputError, match="expected 2"):
        Pipeline.from_bundle(bundle, context=10**6)
    capsys.readouterr()
    assert run_main([str(images["coffee"]), prompt, "--bundle", str(bundle), "--context", "1"]) == 2
    assert "context 1" in capsys.readouterr().err
    assert np.isfinite(memory_budget(_manifest(bundle), ctx)["total_mib"])
