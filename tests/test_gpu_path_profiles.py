"""TensorRT optimization profiles that TensorRT can build: every point (min, opt, max) of every profile is a shape
set the graph itself accepts, checked by running each graph on ONNX Runtime's CPU provider at those shapes, and
``dream-build-engines --print-profiles --json`` prints them without TensorRT."""

import json

import numpy as np
import onnxruntime as ort
import pytest

from runtime.backends.engine_plan import SUM_DIMS, Plan, Profile, engine_key, profile_shapes
from runtime.bundle import Bundle
from runtime.engines import main as build_engines_main


def _feeds(inputs: list[dict], shapes: dict, max_positions: int, rng) -> dict:
    """Random feeds of the given shapes: masks all-allowed (zeros), position ids counting up from the past."""
    feeds = {}
    for t in inputs:
        shape = tuple(shapes[t["name"]])
        dtype = np.dtype(t["dtype"])
        if t["name"] == "position_ids":
            q = shape[-1]
            past = next((s[2] if len(s) == 4 and s[1] != 1 else s[1] for n, s in shapes.items() if n.startswith("past_")), 0)
            pos = np.minimum(past + np.arange(q), max_positions - 1)
            feeds[t["name"]] = np.broadcast_to(pos, shape).astype(dtype).copy()
        elif "mask" in t["name"]:
            feeds[t["name"]] = np.zeros(shape, dtype)
        elif dtype.kind == "f":
            feeds[t["name"]] = (rng.standard_normal(shape) * 0.5).astype(dtype)
        else:
            feeds[t["name"]] = np.zeros(shape, dtype)
    return feeds


def _run_profiles(bundle_path, points=(0, 1, 2)):
    b = Bundle.load(bundle_path)
    plan = Plan.from_manifest(b.manifest)
    P = int(b.manifest["text"]["max_positions"])
    rng = np.random.default_rng(0)
    ran = []
    for graph, profiles in plan.profiles.items():
        spec = b.graph(graph)
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        sess = ort.InferenceSession(str(b.file(spec["file"])), opts, providers=["CPUExecutionProvider"])
        for prof, shapes in zip(profiles, profile_shapes(plan, graph)):
            for k in points:
                point = {name: s[("min", "opt", "max")[k]] for name, s in shapes.items()}
                try:
                    outs = sess.run(None, _feeds(spec["inputs"], point, P, rng))
                except Exception as exc:  # the message names the graph, profile and point that the graph refused
                    raise AssertionError(f"{graph} / {prof.name} at {('min', 'opt', 'max')[k]} {prof.point(k)}: {exc}") from exc
                assert all(np.isfinite(o).all() for o in outs if o.dtype.kind == "f"), (graph, prof.name, k)
                ran.append((graph, prof.name, k))
    return plan, ran


def test_every_profile_point_runs_on_onnx_runtime(tiny):
    """smolvlm-tiny (vision, decoder, drafter, one-call draft tree): min, opt and max of every profile run."""
    _, bundle = tiny
    plan, ran = _run_profiles(bundle)
    graphs = {g for g, _, _ in ran}
    assert {"vision", "decoder", "drafter", "draft_tree"} <= graphs
    assert len(ran) == 3 * sum(len(p) for p in plan.profiles.values())


def test_profile_points_run_on_a_drafter_with_a_wide_tree(zoo):
    """A tree of 8 tokens (top-2): verify and drafter profiles at their min and opt."""
    _, bundle = zoo.with_drafter("split_mha", "random")
    plan, ran = _run_profiles(bundle, points=(0, 1))
    assert {g for g, _, _ in ran} >= {"decoder", "drafter", "vision"}


def _scaled_manifest(tiny_bundle, max_positions: int, tree: dict) -> dict:
    m = json.loads((tiny_bundle / "manifest.json").read_text())
    m["text"]["max_positions"] = max_positions
    m["tree"] = tree
    return m


@pytest.mark.parametrize("P,tree", [(8192, {"total_tokens": 8, "depth": 3, "top_k": 2}),
                                    (96, {"total_tokens": 6, "depth": 5, "top_k": 1}),
                                    (2, {"total_tokens": 1, "depth": 1, "top_k": 1})])
def test_profiles_satisfy_the_graphs_shape_constraints(tiny, P, tree):
    """At smollm2's 8K context too (no graph run): total_len = past_len + q_len and mem_total_len = mem_len + m_len
    at min, opt and max, ranges ordered, and every call the runtime can make (q new positions after p cached ones,
    p + q <= the context) fits some decoder profile."""
    _, bundle = tiny
    plan = Plan.from_manifest(_scaled_manifest(bundle, P, tree))
    for graph, profiles in plan.profiles.items():
        for prof in profiles:
            assert prof.violations() == [], (graph, prof.name)
            for total, (a, b) in SUM_DIMS.items():
                if total in prof.dims:
                    for k in range(3):
                        assert prof.dims[total][k] == prof.dims[a][k] + prof.dims[b][k]
    inputs = plan.graph_inputs("decoder")
    n = tree["total_tokens"]
    for p in sorted(x for x in {0, 1, P // 2 - 1, P // 2, P // 2 + 1, P - 2, P - 1} if 0 <= x <= P - 1):
        # a step or a tree verify after any past; a prompt or a turn that leaves room for a generated token
        for q in sorted({1, 2, n, P // 2, P - p - 2, P - p - 1}):
            if q < 1 or (q > n and p + q > P - 1):
                continue
            dims = {"q_len": q, "past_len": p, "total_len": p + q}
            shapes = {t["name"]: tuple(dims.get(d, d) for d in t["shape"]) for t in inputs}
            plan.profile_for("decoder", shapes)  # raises when no profile serves the call


def test_an_infeasible_profile_is_named():
    bad = Profile("step", {"q_len": (1, 1, 1), "past_len": (0, 4096, 8191), "total_len": (1, 4096, 8192)})
    why = bad.violations()
    assert why == ["opt: total_len=4096, but the graph needs past_len + q_len = 4096 + 1 = 4097"]
    assert Profile("x", {"q_len": (2, 1, 3)}).violations()[0].startswith("q_len: min 2, opt 1, max 3")


def test_print_profiles_json_without_tensorrt(tiny, capsys):
    _, bundle = tiny
    capsys.readouterr()
    assert build_engines_main(["--bundle", str(bundle), "--print-profiles", "--json"]) == 0
    table = json.loads(capsys.readouterr().out)
    plan = Plan.from_manifest(Bundle.load(bundle).manifest)
    assert list(table) == list(plan.profiles) and set(table) <= set(plan.manifest["graphs"])
    for graph, profiles in table.items():
        assert len(profiles) == len(plan.profiles[graph])
        names = [t["name"] for t in plan.graph_inputs(graph)]
        for prof in profiles:
            assert list(prof) == names
            for shapes in prof.values():
                assert set(shapes) == {"min", "opt", "max"}
                assert all(lo <= opt <= hi for lo, opt, hi in zip(shapes["min"], shapes["opt"], shapes["max"]))
    step = table["decoder"][0]
    for point in ("min", "opt", "max"):  # the mask's width = the past's length + the call's
        assert step["attention_mask"][point][3] == step["past_key_0"][point][1] + step["inputs_embeds"][point][1]
    assert build_engines_main(["--bundle", str(bundle), "--print-profiles"]) == 0
    assert "decoder / step:" in capsys.readouterr().out
    assert build_engines_main(["--bundle", str(bundle), "--json"]) == 2
    assert "--json goes with --print-profiles" in capsys.readouterr().err


def test_engine_key_follows_profiles_flags_and_graph(tiny):
    _, bundle = tiny
    m = Bundle.load(bundle).manifest
    plan = Plan.from_manifest(m)
    flags = {"tf32": False, "strongly_typed": True}
    key = engine_key(m, plan, "decoder", flags)
    assert key == engine_key(json.loads(json.dumps(m)), Plan.from_manifest(json.loads(json.dumps(m))), "decoder", dict(flags))
    assert engine_key(m, plan, "decoder", {**flags, "tf32": True}) != key
    m2 = json.loads(json.dumps(m))
    m2["text"]["max_positions"] = 512  # other profiles
    assert engine_key(m2, Plan.from_manifest(m2), "decoder", flags) != key
    m3 = json.loads(json.dumps(m))
    m3["files"][m3["graphs"]["decoder"]["file"]] = "0" * 64
    assert engine_key(m3, Plan.from_manifest(m3), "decoder", flags) != key
