"""ONNX Runtime's TensorRT provider options, the provider-in-effect check, the cuda-python pin and the engine cache
key, without a GPU."""

import copy
import re
import tomllib
from pathlib import Path

import pytest

from runtime.backends.ort import provider_list, trt_profile_options
from runtime.backends.select import provider_in_effect
from runtime.backends.memory import check_cuda_python_version
from runtime.backends.engine_plan import EngineCache, Plan, engine_key, profile_shapes
from runtime.bundle import Bundle

ROOT = Path(__file__).resolve().parent.parent


def _parse(option: str) -> list[dict]:
    """'a:1x2,b:3,a:4x5' -> [{'a': [1, 2], 'b': [3]}, {'a': [4, 5]}]: an input seen again starts a profile."""
    profiles = [{}]
    for item in option.split(","):
        name, dims = item.rsplit(":", 1)
        if name in profiles[-1]:
            profiles.append({})
        profiles[-1][name] = [int(d) for d in dims.split("x")]
    return profiles


def test_tensorrt_provider_gets_the_plans_profiles(tiny):
    _, bundle = tiny
    b = Bundle.load(bundle)
    plan = Plan.from_manifest(b.manifest)
    for graph in plan.profiles:
        opts = dict(provider_list("ort-trt", b, graph=graph)[0][1])
        want = profile_shapes(plan, graph)
        for point in ("min", "opt", "max"):
            got = _parse(opts[f"trt_profile_{point}_shapes"])
            assert got == [{n: s[point] for n, s in prof.items()} for prof in want], (graph, point)
    assert "trt_profile_min_shapes" not in dict(provider_list("ort-trt", b)[0][1])  # no graph: no profiles
    assert trt_profile_options(b, "decoder_ort_cpu") == {}  # not a TensorRT graph


def test_tensorrt_provider_precision_options(tiny):
    _, bundle = tiny
    b = Bundle.load(bundle)
    for precision, int8 in (("fp32", "False"), ("fp16", "False"), ("int8", "True")):
        b2 = copy.copy(b)
        b2.manifest = {**b.manifest, "precision": precision}
        opts = dict(provider_list("ort-trt", b2)[0][1])
        assert opts["trt_fp16_enable"] == "False"  # the precision is the graph's own
        assert opts["trt_int8_enable"] == int8
        import onnxruntime as ort

        assert opts["trt_engine_cache_path"].endswith(f"ort-trt-{ort.__version__}")


def test_a_provider_not_in_effect_is_named():
    assert provider_in_effect("ort-trt", ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]) is None
    why = provider_in_effect("ort-trt", ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert why.startswith("backend ort-trt: ONNX Runtime lists TensorrtExecutionProvider") and "CUDAExecutionProvider" in why
    assert "CUDA" in provider_in_effect("ort-cuda", ["CPUExecutionProvider"])
    assert provider_in_effect("ort-cpu", ["CPUExecutionProvider"]) is None


def test_cuda_python_is_pinned_to_12():
    trt = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["trt"]
    pins = [d for d in trt if d.startswith("cuda-python")]
    assert pins and re.search(r"<\s*13", pins[0]), pins
    check_cuda_python_version("12.6.2")
    for bad in ("13.0.0", "11.8.0"):
        with pytest.raises(ImportError, match="cuda-python"):
            check_cuda_python_version(bad)


def test_engine_cache_rebuilds_for_other_profiles_or_flags(tiny, tmp_path):
    _, bundle = tiny
    m = Bundle.load(bundle).manifest
    plan = Plan.from_manifest(m)
    cache = EngineCache(tmp_path / "engines" / "x")
    key = engine_key(m, plan, "decoder", {"tf32": False})
    cache.store("decoder", key, b"engine", {"profiles": [p.name for p in plan.profiles["decoder"]]})
    assert cache.lookup("decoder", key) is not None
    assert cache.lookup("decoder", engine_key(m, plan, "decoder", {"tf32": True})) is None
    m2 = copy.deepcopy(m)
    m2["text"]["max_positions"] //= 2
    assert cache.lookup("decoder", engine_key(m2, Plan.from_manifest(m2), "decoder", {"tf32": False})) is None
    (cache.folder / "decoder.json").write_text('["not a record"]')
    assert cache.lookup("decoder", key) is None


def test_no_stale_text_about_the_tensorrt_layer_or_cuda_graphs():
    plan_doc = (ROOT / "runtime" / "backends" / "engine_plan.py").read_text()
    assert "does not exist yet" not in plan_doc
    readme = (ROOT / "README.md").read_text().lower()
    assert not re.search(r"cuda graphs? (are|is) not (done|implemented|yet)|not done\W*:?\W*cuda graphs", readme)



def test_each_ort_trt_session_gets_its_graphs_profiles(tiny):
    """What each session of the ort-trt backend is created with (creating one needs the provider): the graph's
    own profiles, never another graph's."""
    from runtime.backends.ort import OrtTrtBackend

    _, bundle = tiny
    b = Bundle.load(bundle)
    backend = OrtTrtBackend(b, providers=provider_list("ort-trt", b), device_id=0)
    vision = dict(backend.providers_for("vision")[0][1])
    decoder = dict(backend.providers_for("decoder")[0][1])
    assert _parse(vision["trt_profile_min_shapes"])[0].keys() == {"pixel_values"}
    assert "attention_mask" in _parse(decoder["trt_profile_opt_shapes"])[0]
    assert not backend.ort_cpu
