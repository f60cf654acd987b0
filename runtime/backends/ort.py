"""ONNX Runtime backend (CPU by default, CUDA when its provider is installed and asked for)."""

from __future__ import annotations

import posixpath
from pathlib import Path

import onnxruntime as ort

from ..errors import BundleError
from ..onnx_refs import ProtobufError, external_data_locations
from ..ort_threads import session_options
from .base import Backend


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
            from .device import cudart_module

            cudart_module()
            return True
        except ImportError:
            return False

    def memory(self):
        if not hasattr(self, "_memory"):
            from .device import CudaMemory, HostMemory

            self._memory = HostMemory() if self.ort_cpu else CudaMemory(self.device_id)
        return self._memory

    def device_decoder(self, capacity: int, bucket: int | None = None):
        """The ``decoder`` graph with K/V resident in this backend's memory, bound by pointer through IOBinding.
        ``bucket``: pad steps' and verifies' past as the TensorRT backend does for CUDA graphs (tests run it here)."""
        from .device import DeviceDecoder, OrtPointerExecutor
        from .trt_plan import Plan

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
