"""The TensorRT backend's thin layer: executes what ``engine_plan`` decides, with TensorRT and cuda-python.

Written against NVIDIA's documented TensorRT 10 Python API (``IBuilder.build_serialized_network`` from an
``OnnxParser`` network, ``IOptimizationProfile.set_shape``, ``IExecutionContext.set_input_shape`` /
``set_tensor_address`` / ``execute_async_v3``) and the CUDA runtime API of cuda-python, as NVIDIA's Python samples
use them. It has NOT been run on a GPU by this project (none was at hand): everything it decides (profiles, engine
folders and keys, buffer sizes, which logits rows and K/V copies) lives in ``engine_plan``, ``device`` and
``memory`` and is tested on the CPU; the device decoder itself runs there over ONNX Runtime with host memory.

- Engines are built on the device that runs them (``build_engines``; ``dream-build-engines``; or at first use with
  a progress line), stored under ``engines/<gpu>-sm<cc>-trt<version>-<precision>/`` with a timing cache and the
  digest of the graph + weights each came from; anything changed means a rebuild, never a silent reuse.
- Networks are strongly typed: the precision lives in the graph (FP16 / INT8 QDQ bundles), as TensorRT 11 requires.
  TF32 is cleared (``BUILDER_FLAGS``): TensorRT enables it by default, which would run the graphs' FP32 parts (all
  of an fp32 bundle, the fp32 head and islands of the others) with a 10-bit mantissa.
- One execution context per optimization profile (a decoder has step, verify and prefill), all on one stream.
- The decoder keeps its K/V on the device (``device.DeviceDecoder``): bound in place as the past, new rows copied
  device to device, only logits / hidden rows / attention scores come back.
- CUDA graphs for steps and tree verifies: their past is padded to a multiple of ``GRAPH_BUCKET`` positions (the
  padding masked out; ``device.DeviceDecoder``) and their buffers are allocated once, so each (call size, bucket)
  has fixed shapes and addresses; it is captured once, on an execution context of its own, and replayed
  (``DREAM_CUDA_GRAPHS=0`` turns this off; a failed capture turns it off with one line). Graphs are keyed on what
  they bind (``device.GraphRunner``) and decoders' buffers come from one pool (``device.DecoderPool``), so the
  next request reuses the same addresses and replays the same graphs. The padding costs attention over at most
  GRAPH_BUCKET - 1 masked positions per call; not measured (no GPU here).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from ..bundle import Bundle
from ..errors import BundleError
from .base import TRT_MINIMUM, Backend, BackendUnavailable
from .device import DecoderPool, DeviceDecoder, GraphRunner
from .engine_plan import EngineCache, Plan, engine_dir, engine_key
from .memory import CudaMemory, ScratchBuffer, cuda_check

GRAPH_BUCKET = 64  # decoder calls bind their past padded to a multiple of this many positions (one graph per bucket)
GRAPH_LIMIT = 128  # CUDA graphs kept per engine (least recently used destroyed first)


def tensorrt_module():
    try:
        import tensorrt as trt  # type: ignore  # optional (GPU machines only): imported when the backend starts
    except ImportError as exc:
        raise BackendUnavailable(f"backend trt needs TensorRT's Python package ({TRT_MINIMUM[0]}.{TRT_MINIMUM[1]}+): "
                                 f"pip install 'dream-export[trt]' (on Jetson, JetPack 6.1+ ships it)") from exc
    found = tuple(int(x) for x in trt.__version__.split(".")[:2] if x.isdigit())
    if found < TRT_MINIMUM:
        raise BackendUnavailable(f"backend trt: TensorRT {trt.__version__} is older than the minimum "
                                 f"{TRT_MINIMUM[0]}.{TRT_MINIMUM[1]} (JetPack 6.1); upgrade TensorRT")
    return trt


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# What build_engine sets on the builder config besides the profiles; part of every engine's cache key.
BUILDER_FLAGS = {"network": "strongly_typed", "tf32": False}


def build_engine(trt, onnx_path: Path, profiles, inputs: list[dict], workspace_bytes: int | None,
                 timing_cache: Path) -> bytes:
    """One serialized engine for the graph at ``onnx_path`` with one optimization profile per ``profiles`` entry
    (in order: profile k of the engine is ``profiles[k]``)."""
    for prof in profiles:
        bad = prof.violations()
        if bad:
            raise BundleError(f"{onnx_path.name}: profile {prof.name!r} is not one the graph accepts: {'; '.join(bad)}")
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # resolves external data next to the file
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BundleError(f"{onnx_path.name}: TensorRT's ONNX parser failed: {errors}")
    config = builder.create_builder_config()
    if hasattr(trt.BuilderFlag, "TF32"):  # on by default in TensorRT; FP32 stays FP32 here
        config.clear_flag(trt.BuilderFlag.TF32)
    if workspace_bytes:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))
    cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.is_file() else b"")
    config.set_timing_cache(cache, False)
    for prof in profiles:
        p = builder.create_optimization_profile()
        for name, (lo, opt, hi) in prof.input_shapes(inputs).items():
            p.set_shape(name, lo, opt, hi)
        if config.add_optimization_profile(p) < 0:
            raise BundleError(f"{onnx_path.name}: TensorRT refused optimization profile {prof.name!r}")
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BundleError(f"{onnx_path.name}: TensorRT could not build an engine (see its log above)")
    tmp = timing_cache.with_name(timing_cache.name + ".tmp")
    tmp.write_bytes(bytes(memoryview(config.get_timing_cache().serialize())))
    tmp.replace(timing_cache)
    return bytes(memoryview(serialized))


class TrtEngine(GraphRunner):
    """A deserialized engine with one execution context per optimization profile, plus one per captured CUDA
    graph; all contexts run one at a time on one stream, so they share one activation buffer (USER_MANAGED).
    Which calls are captured, how graphs are keyed and bounded: ``device.GraphRunner``."""

    def __init__(self, trt, data: bytes, profiles, memory: CudaMemory, cuda_graphs: bool = True):
        super().__init__(enabled=cuda_graphs, limit=GRAPH_LIMIT, log=_log)
        self.trt, self.memory = trt, memory
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self.runtime.deserialize_cuda_engine(data)
        if self.engine is None:
            raise BundleError("TensorRT could not deserialize the engine (built by another TensorRT version?)")
        # TensorRT 11 has only the _v2 form (10.x has both; the old one is deprecated there)
        size = self.engine.device_memory_size_v2 if hasattr(self.engine, "device_memory_size_v2") else self.engine.device_memory_size
        self.activations = memory.alloc(int(size))
        self.profiles = [p.name for p in profiles]
        self.contexts = [self._context(k) for k in range(len(profiles))]
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.dtypes = {n: np.dtype(trt.nptype(self.engine.get_tensor_dtype(n))) for n in names}

    @property
    def cuda_graphs(self) -> bool:
        return self.enabled

    def _context(self, profile_index: int):
        strategy = self.trt.ExecutionContextAllocationStrategy.USER_MANAGED
        ctx = self.engine.create_execution_context(strategy)
        if hasattr(ctx, "set_device_memory"):  # TensorRT >= 10.1
            ctx.set_device_memory(self.activations.ptr, self.activations.nbytes)
        else:
            ctx.device_memory = self.activations.ptr
        ctx.set_optimization_profile_async(profile_index, int(self.memory.stream))
        self.memory.synchronize()
        return ctx

    def _bind(self, ctx, profile: str, inputs: dict, outputs: dict) -> None:
        for name, (ptr, shape, _) in inputs.items():
            if not ctx.set_input_shape(name, tuple(int(d) for d in shape)):
                raise BundleError(f"TensorRT refused shape {tuple(shape)} for input {name!r} (profile {profile})")
            ctx.set_tensor_address(name, int(ptr))
        for name, (ptr, _, _) in outputs.items():
            ctx.set_tensor_address(name, int(ptr))

    # --- the primitives GraphRunner.execute uses; nothing here waits: the caller's download does, once --------
    def run(self, profile: str, inputs: dict, outputs: dict) -> None:
        ctx = self.contexts[self.profiles.index(profile)]
        self._bind(ctx, profile, inputs, outputs)
        if not ctx.execute_async_v3(int(self.memory.stream)):
            raise BundleError(f"TensorRT execution failed (profile {profile})")

    def capture(self, profile: str, inputs: dict, outputs: dict):
        """As NVIDIA's guide does it: one ordinary execute_async_v3 after the shapes are set (this call's results,
        and it flushes TensorRT's deferred updates), then the same call captured and instantiated. A capture that
        fails ends the capture, destroys what it made and clears the error before raising."""
        cudart, stream = self.memory.cudart, self.memory.stream
        ctx = self._context(self.profiles.index(profile))
        self._bind(ctx, profile, inputs, outputs)
        if not ctx.execute_async_v3(int(stream)):
            raise BundleError(f"TensorRT execution failed (profile {profile})")
        self.memory.synchronize()
        mode = cudart.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
        cuda_check(cudart.cudaStreamBeginCapture(stream, mode))
        ok, graph = False, None
        try:
            ok = ctx.execute_async_v3(int(stream))
        finally:
            err, graph = cudart.cudaStreamEndCapture(stream)  # always ends the capture, even after a failure
            if int(err) != 0 or not ok:
                if graph is not None and int(err) == 0:
                    cudart.cudaGraphDestroy(graph)
                cudart.cudaGetLastError()  # clear the capture's error so later calls run
        if not ok:
            raise BundleError(f"TensorRT execution failed during CUDA-graph capture (profile {profile})")
        cuda_check((err,))
        try:
            exec_ = cuda_check(cudart.cudaGraphInstantiate(graph, 0))
        except Exception:
            cudart.cudaGetLastError()
            raise
        finally:
            cudart.cudaGraphDestroy(graph)  # the instantiated graph stands alone: the template is not needed
        return (ctx, exec_)

    def launch(self, handle) -> None:
        cuda_check(self.memory.cudart.cudaGraphLaunch(handle[1], self.memory.stream))

    def destroy(self, handle) -> None:
        self.memory.synchronize()  # a launch of it may still be queued
        self.memory.cudart.cudaGraphExecDestroy(handle[1])

    def close(self) -> None:
        self.clear()
        self.memory.free(self.activations)

    def output_shapes(self, profile: str, inputs: dict) -> dict:
        ctx = self.contexts[self.profiles.index(profile)]
        for name, (_, shape, _) in inputs.items():
            ctx.set_input_shape(name, tuple(int(d) for d in shape))
        return {n: tuple(ctx.get_tensor_shape(n)) for n in self.outputs}


class TrtBackend(Backend):
    name = "trt"
    ort_cpu = False
    device_kv = True

    def __init__(self, bundle, device_id: int = 0, workspace_gb: float | None = None, progress=_log,
                 cuda_graphs: bool | None = None):
        super().__init__(bundle)
        self.trt = tensorrt_module()
        self.memory = CudaMemory(device_id)
        self.plan = Plan.from_manifest(bundle.manifest)
        gpu, cc, _ = self.memory.properties()
        precision = str(bundle.manifest.get("precision") or "fp32")
        self.cache = EngineCache(engine_dir(bundle.path, gpu, cc, self.trt.__version__, precision))
        self.workspace = int(workspace_gb * (1 << 30)) if workspace_gb else None
        self.progress = progress
        # DREAM_CUDA_GRAPHS=0 turns CUDA graphs off (they are on by default: they have not run on a GPU here)
        self.cuda_graphs = os.environ.get("DREAM_CUDA_GRAPHS", "1") != "0" if cuda_graphs is None else cuda_graphs
        self.engines: dict[str, TrtEngine] = {}
        self._staging: dict[tuple[str, str], ScratchBuffer] = {}
        self.pool = DecoderPool()  # decoders' device buffers, reused request after request (CUDA graphs replay)

    def close(self) -> None:
        """Free every device buffer, graph and engine of this backend; idempotent."""
        for eng in self.engines.values():
            eng.close()
        self.engines.clear()
        for g in self._staging.values():
            g.free()
        self._staging.clear()
        self.pool.close()
        self.memory.close()

    def build_flags(self) -> dict:
        return {**BUILDER_FLAGS, "workspace_bytes": self.workspace or 0}

    def engine_path(self, graph: str, force: bool = False) -> Path:
        """The engine file of ``graph``, built now when missing or stale."""
        if graph not in self.plan.profiles:
            raise BundleError(f"graph {graph!r}: not a TensorRT graph of this bundle (it has {sorted(self.plan.profiles)})")
        digest = engine_key(self.bundle.manifest, self.plan, graph, self.build_flags())
        found = None if force else self.cache.lookup(graph, digest)
        if found is not None:
            return found
        spec = self._specs[graph]
        self.progress(f"dream-export: building the TensorRT engine for {graph} ({len(self.plan.profiles[graph])} "
                      f"profile(s)) in {self.cache.folder} — once per GPU, TensorRT version and graph")
        t0 = time.perf_counter()
        self.cache.folder.mkdir(parents=True, exist_ok=True)
        data = build_engine(self.trt, self.bundle.file(spec["file"]), self.plan.profiles[graph], spec["inputs"],
                            self.workspace, self.cache.folder / "timing.cache")
        extra = {"trt_version": self.trt.__version__, "profiles": [p.name for p in self.plan.profiles[graph]],
                 "flags": self.build_flags(), "build_s": round(time.perf_counter() - t0, 1)}
        path = self.cache.store(graph, digest, data, extra)
        self.progress(f"dream-export: {graph} engine built in {extra['build_s']} s")
        return path

    def open(self, graph: str) -> None:
        if graph not in self.engines:
            self.engines[graph] = TrtEngine(self.trt, self.engine_path(graph).read_bytes(), self.plan.profiles[graph],
                                            self.memory, cuda_graphs=self.cuda_graphs)

    def _run(self, graph, feeds, output_names):
        """Host in, host out (vision, drafter graphs): inputs uploaded, outputs sized by TensorRT's shape inference."""
        self.open(graph)
        eng = self.engines[graph]
        profile = self.plan.profile_for(graph, {k: v.shape for k, v in feeds.items()}).name
        inputs = {}
        for name, arr in feeds.items():
            arr = np.ascontiguousarray(arr, dtype=eng.dtypes[name])
            ptr = self._buffer(graph, name).get(arr.nbytes)
            self.memory.upload(ptr, arr)
            inputs[name] = (ptr, arr.shape, arr.dtype)
        shapes = eng.output_shapes(profile, inputs)
        outputs = {n: (self._buffer(graph, n).get(int(np.prod(s)) * eng.dtypes[n].itemsize), s, eng.dtypes[n])
                   for n, s in shapes.items()}
        eng.execute(profile, inputs, outputs)
        return self.memory.download_many([outputs[n] for n in output_names])

    def _buffer(self, graph: str, name: str) -> ScratchBuffer:
        return self._staging.setdefault((graph, name), ScratchBuffer(self.memory))

    def device_decoder(self, capacity: int) -> DeviceDecoder:
        self.open("decoder")
        eng = self.engines["decoder"]

        def execute(inputs, outputs, graph_key=None):
            shapes = {n: s for n, (_, s, _) in inputs.items()}
            eng.execute(self.plan.profile_for("decoder", shapes).name, inputs, outputs, graph_key)

        # steps and tree verifies: past padded to buckets of GRAPH_BUCKET positions, fixed buffers -> CUDA graphs
        n = int((self.bundle.manifest.get("tree") or {"total_tokens": 1})["total_tokens"])
        return DeviceDecoder(execute, self.memory, self._specs["decoder"], self.bundle.manifest["text"], capacity,
                             self.plan.logits_rows, bucket=GRAPH_BUCKET if self.cuda_graphs else None, fixed_q=max(n, 1),
                             max_past=int(self.bundle.manifest["text"]["max_positions"]) - 1, pool=self.pool)


def build_engines(bundle_path, device_id: int = 0, workspace_gb: float | None = None, graphs=None,
                  force: bool = False) -> dict:
    """Build (or find) the engine of every graph the TensorRT plan has; returns a report."""
    bundle = Bundle.load(Path(bundle_path))
    backend = TrtBackend(bundle, device_id=device_id, workspace_gb=workspace_gb)
    names = list(graphs or backend.plan.profiles)
    unknown = sorted(set(names) - set(backend.plan.profiles))
    if unknown:
        raise BundleError(f"graphs {unknown}: not TensorRT graphs of this bundle (it has {sorted(backend.plan.profiles)})")
    out = {}
    try:
        for g in names:
            path = backend.engine_path(g, force=force)
            out[g] = {"engine": str(path), **json.loads(path.with_suffix(".json").read_text())}
    finally:
        backend.close()
    return {"folder": str(backend.cache.folder), "engines": out}
