"""dream-check: on this machine's backend (ONNX Runtime CPU) it proves losslessness, compares with the reference
and reports per-graph times; the GPU runs are marked (pytest -m gpu on a machine with onnxruntime-gpu)."""

import json

import pytest

from dream_export.check import main


def test_dream_check_on_the_cpu(zoo, tmp_path, capsys):
    _, bundle = zoo.with_drafter("split_mha", "random")
    out = tmp_path / "report.json"
    assert main(["--bundle", str(bundle), "--backend", "ort-cpu", "--scenes", "3", "--max-new-tokens", "12",
                 "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report == json.loads(capsys.readouterr().out)
    assert report["lossless"] and report["speculative_mismatches"] == []
    assert report["reference"]["identical_answers"] == report["reference"]["of"] == 3
    assert report["backend"] == "ort-cpu" and report["mean_accept_length"] >= 1
    assert {"vision", "decoder/prefill"} <= set(report["graph_ms"]) and report["plain_tokens_per_s"] > 0


def test_dream_check_fp16_against_fp32(tiny, tmp_path, capsys):
    """An FP16 bundle is checked on its own (standard) graphs, against the FP32 bundle as the reference."""
    from dream_export.export.exporter import ExportOptions, export_bundle, load_target

    model_dir, fp32 = tiny
    model, processor = load_target(str(model_dir))
    fp16 = export_bundle(model, processor, {"model": "t"}, ExportOptions(out=tmp_path / "fp16", precision="fp16"), quiet=True)
    assert main(["--bundle", str(fp16), "--reference", str(fp32), "--scenes", "4", "--max-new-tokens", "24"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["precision"] == "fp16" and "decoder" in report["graphs"] and "decoder_ort_cpu" not in report["graphs"]
    assert report["reference"]["identical_answers"] >= 3


def test_dream_check_refuses_a_missing_gpu(zoo, capsys):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this machine has the CUDA provider")
    _, bundle = zoo.get("gqa_nosplit")
    assert main(["--bundle", str(bundle), "--backend", "ort-cuda", "--scenes", "1"]) == 2
    assert "onnxruntime-gpu" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["ort-cuda", "ort-trt"])
def test_dream_check_on_a_gpu(tiny, tmp_path, backend):
    """Run on a machine with an NVIDIA GPU and onnxruntime-gpu (TensorRT for ort-trt): pytest -m gpu."""
    _, bundle = tiny
    assert main(["--bundle", str(bundle), "--backend", backend, "--scenes", "20", "--json", str(tmp_path / "r.json")]) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["backend"] == backend and report["lossless"]


@pytest.mark.gpu
@pytest.mark.trt
def test_dream_check_on_our_tensorrt_backend(tiny, tmp_path):
    """On an NVIDIA GPU with TensorRT >= 10.3 and cuda-python: pytest -m "gpu and trt" tests/test_check.py.
    Builds the engines in a copy of the bundle, decodes with K/V on the device (CUDA graphs on)."""
    import shutil

    _, bundle = tiny
    b = tmp_path / "bundle"
    shutil.copytree(bundle, b)
    assert main(["--bundle", str(b), "--backend", "trt", "--scenes", "20", "--json", str(tmp_path / "r.json")]) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["backend"] == "trt" and report["lossless"] and report["device_kv"]
    assert report["reference"]["identical_answers"] >= 18
