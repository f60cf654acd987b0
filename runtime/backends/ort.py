"""ONNX Runtime backend (CPU by default, CUDA when its provider is installed and asked for), its variant with the
TensorRT provider (``OrtTrtBackend``), and the providers and provider options each backend name means
(``provider_list``, ``trt_profile_options``)."""

from __future__ import annotations

import posixpath
from pathlib import Path

import onnxruntime as ort

from ..errors import BundleError
from ..onnx_external_data import ProtobufError, external_data_locations
from ..ort_threads import session_options
from .base import Backend
from .device import DeviceDecoder, OrtPointerExecutor
from .engine_plan import Plan, profile_shapes
from .memory import CudaMemory, HostMemory, cudart_module


def check_external_data(bundle, name: str, path) -> None:
    """Every external-data file the graph itself names (what ONNX Runtime will open, relative to the graph's
    folder) must be a file of the bundle that the manifest lists and so verifies; the manifest's own
    ``external_data`` list is only a declaration."""
    try:
        locations = external_data_locations(path)
    except ProtobufError as exc:
        raise BundleError(f"{path}: not a valid ONNX model ({exc})") from exc
    for loc in sorted(locations):
        joined = posixpath.normpath(posixpath.join(posixpath.dirname(name), loc))
        if posixpath.isabs(loc) or joined.startswith("../") or joined == "..":
            raise BundleError(f"{path}: external data {loc!r} lies outside the bundle folder; expected a file inside it")
        try:
            bundle.file(joined)
        except BundleError as exc:
            raise BundleError(f"{path}: names external data {loc!r}, which is not a verified file of the bundle: {exc}") from exc


class OrtBackend(Backend):
    name = "onnxruntime"

    def __init__(self, bundle, threads: int | None = None, providers: list[str] | None = None, device_id: int = 0):
        super().__init__(bundle)
        self.threads = threads
        self.device_id = device_id
        self.providers = providers or ["CPUExecutionProvider"]
        self._sessions: dict[str, ort.InferenceSession] = {}

    @property
    def ort_cpu(self) -> bool:
        return self.providers == ["CPUExecutionProvider"]

    @property
    def device_kv(self) -> bool:
        """On a GPU provider, K/V stay in device memory between calls (needs cuda-python for the device copies;
        without it the decoder keeps K/V on the host, as on the CPU)."""
        if self.ort_cpu:
            return False
        try:
            cudart_module()
            return True
        except ImportError:
            return False

    def memory(self):
        if not hasattr(self, "_memory"):
            self._memory = HostMemory() if self.ort_cpu else CudaMemory(self.device_id)
        return self._memory

    def device_decoder(self, capacity: int, bucket: int | None = None):
        """The ``decoder`` graph with K/V resident in this backend's memory, bound by pointer through IOBinding.
        ``bucket``: pad steps' and verifies' past as the TensorRT backend does for CUDA graphs (tests run it here)."""
        plan = Plan.from_manifest(self.bundle.manifest)
        execute = OrtPointerExecutor(self.session("decoder"), self.memory())
        n = int((self.bundle.manifest.get("tree") or {"total_tokens": 1})["total_tokens"])
        return DeviceDecoder(execute, self.memory(), self._specs["decoder"], self.bundle.manifest["text"], capacity,
                             plan.logits_rows, bucket=bucket, fixed_q=max(n, 1),
                             max_past=int(self.bundle.manifest["text"]["max_positions"]) - 1)

    def _prepare_caches(self) -> None:
        """The TensorRT provider writes engines into the bundle's engines/ folder: made when a session is."""
        for entry in self.providers:
            if isinstance(entry, tuple) and entry[1].get("trt_engine_cache_path"):
                Path(entry[1]["trt_engine_cache_path"]).mkdir(parents=True, exist_ok=True)

    def session(self, graph: str) -> ort.InferenceSession:
        if graph not in self._sessions:
            opts = session_options(self.threads)
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            name = self._specs[graph]["file"]
            path = self.bundle.file(name)
            for blob in self._specs[graph].get("external_data", []):  # listed, verified, inside the bundle
                self.bundle.file(blob)
            check_external_data(self.bundle, name, path)
            self._prepare_caches()
            self._sessions[graph] = ort.InferenceSession(str(path), opts, providers=self.providers)
        return self._sessions[graph]

    def open(self, graph: str) -> None:
        self.session(graph)

    def _run(self, graph, feeds, output_names):
        return self.session(graph).run(output_names, feeds)


class OrtTrtBackend(OrtBackend):
    """ONNX Runtime with the TensorRT provider, each graph's session given that graph's optimization profiles."""

    def providers_for(self, graph: str) -> list:
        return provider_list("ort-trt", self.bundle, self.device_id, graph=graph)

    def session(self, graph: str):
        if graph not in self._sessions:
            self.providers = self.providers_for(graph)
        return super().session(graph)


def trt_profile_options(bundle, graph: str) -> dict:
    """ONNX Runtime TensorRT provider options with the graph's optimization profiles (``engine_plan.Plan``): without
    them the provider builds an engine for the shapes it first sees and rebuilds it whenever the past grows past
    them. Format: ``name:d0xd1x...`` comma-separated; an input listed again starts the next profile."""
    plan = Plan.from_manifest(bundle.manifest)
    if graph not in plan.profiles:
        return {}
    out = {}
    for point in ("min", "opt", "max"):
        out[f"trt_profile_{point}_shapes"] = ",".join(
            f"{name}:{'x'.join(str(d) for d in shapes[point])}"
            for prof in profile_shapes(plan, graph) for name, shapes in prof.items())
    return out


def provider_list(name: str, bundle, device_id: int = 0, graph: str | None = None) -> list:
    """ONNX Runtime providers (with their options) for a resolved backend name; ``graph``: the graph the session
    is for (the TensorRT provider then gets its optimization profiles).

    The TensorRT provider's options: no ``trt_fp16_enable`` (a bundle's precision lives in its graphs; the flag
    would also let TensorRT run their fp32 head and islands in fp16), ``trt_int8_enable`` for INT8 bundles (their
    Q/DQ graphs need the builder's INT8 mode; no calibration table: the scales are in the graph). Engines and the
    timing cache go into ``engines/ort-trt-<onnxruntime version>/`` in the bundle: the provider names a cached
    engine by a hash of its subgraph and the GPU's compute capability only, not by the onnxruntime or TensorRT
    version, so a folder per onnxruntime version keeps an upgrade from loading an engine it did not build
    (after a TensorRT upgrade under the same onnxruntime, delete the folder)."""
    if name == "ort-cpu":
        return ["CPUExecutionProvider"]
    cuda = ("CUDAExecutionProvider", {"device_id": str(device_id)})
    if name == "ort-cuda":
        return [cuda, "CPUExecutionProvider"]
    precision = str((bundle.manifest.get("precision") or "fp32"))
    cache = str(Path(bundle.path) / "engines" / f"ort-trt-{ort.__version__}")
    options = {
        "device_id": str(device_id),
        "trt_fp16_enable": "False",
        "trt_int8_enable": "True" if precision == "int8" else "False",
        "trt_engine_cache_enable": "True", "trt_engine_cache_path": cache,
        "trt_timing_cache_enable": "True", "trt_timing_cache_path": cache,
    }
    if graph is not None:
        options.update(trt_profile_options(bundle, graph))
    return [("TensorrtExecutionProvider", options), cuda, "CPUExecutionProvider"]
