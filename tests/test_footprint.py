"""benchmarks/footprint.py and benchmarks/session_reuse.py run and report what they claim (figures are printed
by the benchmarks; tests assert behaviour: memory that grows per call is a leak, whatever the machine)."""

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_footprint_reports_imports_rss_and_no_growth(tiny, tmp_path):
    _, bundle = tiny
    out = tmp_path / "footprint.json"
    assert load("footprint").main(["--bundle", str(bundle), "--generations", "60", "--warmup", "20", "--json", str(out)]) == 0
    fig = json.loads(out.read_text())
    assert set(fig["runs"]) == {"plain", "speculative"}
    assert 0 < fig["rss_before_load_mb"] < fig["rss_after_load_mb"]
    assert fig["rss_before_load_mb"] < 150  # numpy + onnxruntime + tokenizers + pillow, no torch
    for run in fig["runs"].values():
        assert run["generations"] == 60 and len(run["trace_mb"]) == 10
        assert run["growth_after_warmup"] < 0.10, run  # 40 more generations must not keep allocating


def test_session_reuse_benchmark_runs_and_matches(zoo):
    _, bundle = zoo.with_drafter("split_mha", "random")
    fig = load("session_reuse").measure(str(bundle), 1, max_new_tokens=6)  # asserts session == fresh internally
    assert 0 < fig["second_question_cached_fraction"] < 1
    assert fig["second_question_ttft_ms"]["session"] > 0 and fig["third_turn_ttft_ms"]["fresh"] > 0
