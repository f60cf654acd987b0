#!/usr/bin/env bash
# The first run of the GPU path, prepared as one script: bash benchmarks/gpu_first_run.sh BUNDLE OUT_DIR
#
# BUNDLE: a small bundle made beforehand (smolvlm-tiny, at most 64 MB); OUT_DIR gets report.json (written
# atomically) and the logs of the commands it runs. Needs only Python with numpy and onnxruntime; uses PyTorch,
# CuPy, cuda-python, TensorRT and onnxruntime-gpu where they exist, and skips each step whose library is missing,
# saying why in the report. Nothing is downloaded. Steps, in order:
#   1. environment and versions;
#   2. the cuda-python calls the runtime uses (alloc, copies, CUDA-graph capture of a memcpy);
#   3. DeviceDecoder on real device memory with an ORT-CPU executor, against the host decoder; three decoders
#      created and closed, with device memory logged;
#   4. if TensorRT imports: vision and decoder engines built, dream-check --backend trt with CUDA graphs off and
#      on, two generate calls in one process equal to ort-cpu;
#   5. if onnxruntime-gpu is present: ort-cuda and ort-trt, counting engine builds over 20 steps.
# The whole run is bounded by 7 minutes (GPU_FIRST_RUN_TIMEOUT seconds).
set -uo pipefail
if [ $# -ne 2 ]; then
    echo "usage: bash benchmarks/gpu_first_run.sh BUNDLE OUT_DIR (a bundle folder with manifest.json; a folder for report.json)" >&2
    exit 2
fi
BUNDLE=$1
OUT=$2
if [ ! -f "$BUNDLE/manifest.json" ]; then
    echo "gpu_first_run: $BUNDLE is not a bundle folder (no manifest.json); expected a dream-export output" >&2
    exit 2
fi
SIZE_MB=$(du -sm "$BUNDLE" | cut -f1)
if [ "$SIZE_MB" -gt 64 ]; then
    echo "gpu_first_run: $BUNDLE is ${SIZE_MB} MB; expected at most 64 MB (smolvlm-tiny)" >&2
    exit 2
fi
mkdir -p "$OUT"
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-}
if [ -z "$PY" ]; then
    if [ -x "$ROOT/.venv/bin/python" ]; then PY="$ROOT/.venv/bin/python"; else PY=python3; fi
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1
timeout "${GPU_FIRST_RUN_TIMEOUT:-420}" "$PY" - "$BUNDLE" "$OUT" <<'PY'
import json, os, platform, shutil, subprocess, sys, time, traceback
from pathlib import Path

import numpy as np

bundle, out = Path(sys.argv[1]).resolve(), Path(sys.argv[2]).resolve()
report = {"bundle": str(bundle), "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "steps": []}


def write():
    """report.json after every step, temp then rename: a run stopped midway leaves the steps that finished."""
    tmp = out / "report.json.tmp"
    tmp.write_text(json.dumps(report, indent=1, default=str))
    tmp.replace(out / "report.json")


def step(name, fn):
    t0 = time.perf_counter()
    rec = {"step": name}
    try:
        data = fn()
        if isinstance(data, str):
            rec.update(status="skipped", why=data)
        else:
            rec.update(status="ok", **(data or {}))
    except Exception as exc:  # a failed step is recorded and the next one runs
        rec.update(status="failed", error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc()[-4000:])
    rec["seconds"] = round(time.perf_counter() - t0, 2)
    report["steps"].append(rec)
    write()
    print(f"gpu_first_run: {name}: {rec['status']} {rec.get('why') or rec.get('error') or ''}", file=sys.stderr, flush=True)
    return rec


def version(mod):
    try:
        m = __import__(mod)
        return getattr(m, "__version__", "?")
    except Exception as exc:  # noqa: BLE001 - absent or broken: said in the report
        return None


def run(cmd, log, env=None):
    with open(out / log, "w") as f:
        p = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}, timeout=240)
    return {"cmd": " ".join(map(str, cmd)), "rc": p.returncode, "log": log}


def environment():
    import onnxruntime as ort
    from importlib.metadata import PackageNotFoundError, version as dist_version

    def dist(n):
        try:
            return dist_version(n)
        except PackageNotFoundError:
            return None

    smi = shutil.which("nvidia-smi")
    gpu = subprocess.run([smi, "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                         capture_output=True, text=True).stdout.strip() if smi else None
    return {"python": sys.version.split()[0], "platform": platform.platform(), "numpy": np.__version__,
            "onnxruntime": ort.__version__, "ort_providers": ort.get_available_providers(),
            "torch": version("torch"), "cupy": version("cupy"), "tensorrt": version("tensorrt"),
            "cuda_python": dist("cuda-python"), "cuda_bindings": dist("cuda-bindings"), "nvidia_smi": gpu}


def memory_or_reason():
    try:
        from runtime.backends.memory import CudaMemory, cudart_module, cuda_check

        cudart = cudart_module()
    except ImportError as exc:
        return None, f"cuda-python not importable ({exc})"
    err, n = cudart.cudaGetDeviceCount()
    if int(err) != 0 or n == 0:
        return None, f"no CUDA device (cudaGetDeviceCount: error {int(err)}, {n if int(err) == 0 else 0} devices)"
    return CudaMemory(0), None


def cuda_calls():
    mem, why = memory_or_reason()
    if mem is None:
        return why
    from runtime.backends.memory import cuda_check

    cudart = mem.cudart
    a = np.arange(1 << 16, dtype=np.float32)
    src, dst = mem.alloc(a.nbytes), mem.alloc(a.nbytes)
    mem.upload(src.ptr, a)
    mem.copy(dst.ptr, src.ptr, a.nbytes)
    assert np.array_equal(mem.download(dst.ptr, a.shape, a.dtype), a), "host -> device -> device -> host differs"
    # a memcpy captured as a CUDA graph and replayed into a zeroed buffer
    cuda_check(cudart.cudaMemsetAsync(dst.ptr, 0, a.nbytes, mem.stream))
    mode = cudart.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
    cuda_check(cudart.cudaStreamBeginCapture(mem.stream, mode))
    mem.copy(dst.ptr, src.ptr, a.nbytes)
    graph = cuda_check(cudart.cudaStreamEndCapture(mem.stream))
    exec_ = cuda_check(cudart.cudaGraphInstantiate(graph, 0))
    cudart.cudaGraphDestroy(graph)
    cuda_check(cudart.cudaGraphLaunch(exec_, mem.stream))
    ok = np.array_equal(mem.download(dst.ptr, a.shape, a.dtype), a)
    cudart.cudaGraphExecDestroy(exec_)
    mem.free(src), mem.free(dst)
    live = mem.live_bytes
    name, cc, total = mem.properties()
    mem.close()
    assert ok, "the replayed memcpy graph did not copy"
    return {"gpu": name, "compute_capability": list(cc), "total_bytes": total, "graph_replay_ok": ok, "live_after_free": live}


class StagedOrtExecutor:
    """ORT on the CPU over device pointers: inputs copied to the host, run, outputs copied back."""

    def __init__(self, session, memory):
        self.session, self.memory = session, memory

    def __call__(self, inputs, outputs, graph_key=None):
        feeds = {n: self.memory.download(p, s, d) for n, (p, s, d) in inputs.items()}
        names = list(outputs)
        for n, arr in zip(names, self.session.run(names, feeds)):
            self.memory.upload(outputs[n][0], np.ascontiguousarray(arr, dtype=outputs[n][2]))


def device_decoder():
    mem, why = memory_or_reason()
    if mem is None:
        return why
    from runtime.backends.device import DecoderPool, DeviceDecoder
    from runtime.backends.engine_plan import Plan
    from runtime.pipeline import Pipeline

    pipe = Pipeline.from_bundle(bundle, backend="ort-cpu", fused=False, warm=False)
    m = pipe.bundle.manifest
    n = int((m.get("tree") or {"total_tokens": 1})["total_tokens"])
    plan = Plan.from_manifest(m)
    ex = StagedOrtExecutor(pipe.backend.session("decoder"), mem)
    host = pipe.new_decoder()
    rng = np.random.default_rng(0)
    H = int(pipe.text["hidden_size"])
    pool, free_log, worst = DecoderPool(), [], 0.0
    free_log.append(("start", mem.mem_info()[0]))
    for k in range(3):
        dev = DeviceDecoder(ex, mem, pipe.bundle.graph("decoder"), m["text"], host.capacity, plan.logits_rows,
                            bucket=64, fixed_q=n, max_past=int(m["text"]["max_positions"]) - 1, pool=pool if k else None)
        if k == 0:
            for q in (33, 1, 1, n, 1):
                p = dev.length
                emb = (rng.standard_normal((1, q, H)) * 0.5).astype(np.float32)
                mask = np.zeros((1, 1, q, p + q), np.float32)
                mask[0, 0, :, p:] = np.triu(np.full((q, q), pipe.mask_min, np.float32), 1)
                a, b = host.run(emb, mask, np.arange(p, p + q)), dev.run(emb, mask, np.arange(p, p + q))
                rows = plan.logits_rows(q)
                worst = max(worst, float(np.abs(a["logits"][:, q - rows:] - b["logits"]).max()))
                assert np.array_equal(a["logits"][:, q - rows:].argmax(-1), b["logits"].argmax(-1)), "argmax differs"
                host.commit(), dev.commit()
        free_log.append((f"decoder {k} open", mem.mem_info()[0]))
        dev.close()
        free_log.append((f"decoder {k} closed", mem.mem_info()[0]))
    pool.close()
    live = mem.live_bytes
    free_log.append(("pool closed", mem.mem_info()[0]))
    mem.close()
    assert live == 0, f"{live} bytes still allocated after every decoder closed"
    return {"max_abs_logit_diff": worst, "free_bytes": free_log, "live_after_close": live}


def tensorrt():
    try:
        import tensorrt  # noqa: F401
    except ImportError as exc:
        return f"TensorRT not importable ({exc})"
    b = out / "bundle-trt"
    if not b.exists():
        shutil.copytree(bundle, b)
    res = {"build": run([sys.executable, "-m", "runtime.engines", "--bundle", str(b), "--graph", "vision", "--graph", "decoder"],
                        "build_engines.log")}
    for graphs in ("0", "1"):
        res[f"check_cuda_graphs_{graphs}"] = run([sys.executable, "-m", "dream_export.check", "--bundle", str(b), "--backend", "trt",
                                                 "--json", str(out / f"check_trt_graphs{graphs}.json")],
                                                f"check_trt_graphs{graphs}.log", env={"DREAM_CUDA_GRAPHS": graphs})
    from runtime.pipeline import Pipeline

    trt_pipe, cpu = Pipeline.from_bundle(b, backend="trt"), Pipeline.from_bundle(b, backend="ort-cpu")
    prompts = ["Describe the image.", "How many shapes are there?"]
    got = [trt_pipe.generate(None, p, max_new_tokens=24).token_ids for p in prompts]
    want = [cpu.generate(None, p, max_new_tokens=24).token_ids for p in prompts]
    res["two_generates_equal_ort_cpu"] = got == want
    res["device_live_bytes_after"] = trt_pipe.backend.memory.live_bytes
    trt_pipe.backend.close()
    return res


def ort_gpu():
    import onnxruntime as ort

    have = ort.get_available_providers()
    if "CUDAExecutionProvider" not in have:
        return f"onnxruntime has no CUDA provider ({have}): onnxruntime-gpu not installed"
    from runtime.pipeline import Pipeline

    b = out / "bundle-ort"
    if not b.exists():
        shutil.copytree(bundle, b)
    cpu = Pipeline.from_bundle(b, backend="ort-cpu")
    want = cpu.generate(None, "Describe the image.", max_new_tokens=20).token_ids
    res = {}
    for name in ("ort-cuda", "ort-trt"):
        if name == "ort-trt" and "TensorrtExecutionProvider" not in have:
            res[name] = "skipped: no TensorRT provider in this onnxruntime"
            continue
        try:
            pipe = Pipeline.from_bundle(b, backend=name)
            engines = lambda: len(list((b / "engines").rglob("*.engine"))) if (b / "engines").exists() else 0
            before = engines()
            got = pipe.generate(None, "Describe the image.", max_new_tokens=20).token_ids
            res[name] = {"equal_ort_cpu": got == want, "engine_files_built_over_20_steps": engines() - before,
                         "why": getattr(pipe.backend, "why", None)}
        except Exception as exc:  # noqa: BLE001 - recorded; the other provider still runs
            res[name] = f"failed: {type(exc).__name__}: {exc}"
    return res


os.chdir(out)
for name, fn in (("environment", environment), ("cuda-python calls", cuda_calls), ("DeviceDecoder on device memory", device_decoder),
                 ("TensorRT backend", tensorrt), ("onnxruntime-gpu providers", ort_gpu)):
    step(name, fn)
report["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
write()
print(f"gpu_first_run: {out / 'report.json'}", file=sys.stderr)
sys.exit(1 if any(s["status"] == "failed" for s in report["steps"]) else 0)
PY
rc=$?
if [ $rc -eq 124 ]; then
    echo "gpu_first_run: stopped after ${GPU_FIRST_RUN_TIMEOUT:-420} s; $OUT/report.json has the steps that finished" >&2
fi
exit $rc
