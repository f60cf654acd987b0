"""Backend selection: auto picks TensorRT provider > CUDA provider > CPU and says which; an explicit GPU backend
that this machine cannot run exits 2 with one line naming what is missing and how to install it, and writes
nothing. (The GPU backends themselves run only where onnxruntime-gpu / TensorRT exist: tests marked gpu / trt.)"""

import pytest

from runtime import cli
from runtime.backends.base import BackendUnavailable
from runtime.backends.ort import provider_list
from runtime.backends.select import resolve_backend
from runtime.bundle import Bundle
from runtime.errors import BundleError

CPU = ["CPUExecutionProvider"]
CUDA = ["CUDAExecutionProvider", "CPUExecutionProvider"]
TRT = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]


def test_auto_prefers_tensorrt_then_cuda_then_cpu():
    assert resolve_backend("auto", TRT)[0] == "ort-trt"
    assert resolve_backend("auto", CUDA)[0] == "ort-cuda"
    name, why = resolve_backend("auto", CPU)
    assert name == "ort-cpu" and "CPU" in why
    assert resolve_backend("ort", CPU)[0] == "ort-cpu" and resolve_backend("ort-cuda", CUDA)[0] == "ort-cuda"


def test_auto_takes_native_tensorrt_only_after_onnx_runtimes_providers():
    assert resolve_backend("auto", CPU, trt_version="10.3.0", cuda_python=True)[0] == "trt"
    assert resolve_backend("auto", CUDA, trt_version="10.3.0", cuda_python=True)[0] == "ort-cuda"
    assert resolve_backend("auto", CPU, trt_version="10.3.0", cuda_python=False)[0] == "ort-cpu"
    assert resolve_backend("auto", CPU, trt_version="8.6.1", cuda_python=True)[0] == "ort-cpu"
    assert resolve_backend("trt", CPU, trt_version="10.3.0", cuda_python=True) == ("trt", "asked for")
    assert resolve_backend("trt", CPU, trt_version="11.0.0", cuda_python=True)[0] == "trt"


@pytest.mark.parametrize("name,providers,trt,cuda_python,needle", [
    ("ort-cuda", CPU, None, None, "pip install onnxruntime-gpu"),
    ("ort-trt", CUDA, None, None, "TensorRT provider"),
    ("trt", TRT, None, True, "pip install 'dream-export[trt]'"),
    ("trt", TRT, "10.3.0", False, "needs cuda-python"),
    ("trt", TRT, None, False, "TensorRT's Python package (10.3 or newer) and cuda-python"),
    ("trt", TRT, "10.2.0.post1", True, "older than the minimum 10.3"),
    ("trt", TRT, "8.6.1", True, "older than the minimum 10.3"),
])
def test_unavailable_backends_name_what_is_missing(name, providers, trt, cuda_python, needle):
    with pytest.raises(BackendUnavailable) as info:
        resolve_backend(name, providers, trt_version=trt, cuda_python=cuda_python)
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_unknown_backend_lists_the_choices():
    with pytest.raises(BundleError, match="expected one of auto, ort-cpu, ort-cuda, ort-trt, trt"):
        resolve_backend("metal", CPU)


def test_provider_options(zoo):
    _, bundle = zoo.get("gqa_nosplit")
    b = Bundle.load(bundle)
    assert provider_list("ort-cpu", b) == ["CPUExecutionProvider"]
    cuda = provider_list("ort-cuda", b, device_id=1)
    assert cuda[0] == ("CUDAExecutionProvider", {"device_id": "1"})
    trt = dict(provider_list("ort-trt", b)[0][1])
    assert trt["trt_engine_cache_path"].startswith(str(bundle)) and trt["trt_fp16_enable"] == "False"
    assert trt["trt_engine_cache_enable"] == "True"


@pytest.mark.parametrize("backend,needle", [("ort-cuda", "onnxruntime-gpu"), ("trt", "TensorRT"), ("ort-trt", "TensorRT")])
def test_cli_gpu_backend_without_a_gpu_exits_2_and_writes_nothing(zoo, images, capsys, backend, needle):
    import onnxruntime as ort

    if {"ort-cuda": "CUDAExecutionProvider", "ort-trt": "TensorrtExecutionProvider"}.get(backend) in ort.get_available_providers():
        pytest.skip(f"this machine has {backend}")  # the point is the machine without it
    _, bundle = zoo.get("gqa_nosplit")
    before = sorted(p.relative_to(bundle) for p in bundle.rglob("*"))
    capsys.readouterr()
    rc = cli.main([str(images["coffee"]), "What is it?", "--bundle", str(bundle), "--backend", backend])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and needle in err and "\n" not in err and err.startswith("dream-run: error:")
    assert sorted(p.relative_to(bundle) for p in bundle.rglob("*")) == before


def test_cli_json_reports_the_backend(zoo, images, capsys):
    import json

    _, bundle = zoo.get("gqa_nosplit")
    capsys.readouterr()
    assert cli.main([str(images["coffee"]), "What is it?", "--bundle", str(bundle), "--json", "--max-new-tokens", "2"]) == 0
    assert json.loads(capsys.readouterr().out)["backend"] == "ort-cpu"
