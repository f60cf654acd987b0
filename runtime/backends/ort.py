"""ONNX Runtime backend (CPU by default, CUDA when its provider is installed and asked for)."""

from __future__ import annotations

import onnxruntime as ort

from .base import Backend


class OrtBackend(Backend):
    name = "onnxruntime"

    def __init__(self, bundle, threads: int | None = None, providers: list[str] | None = None):
        super().__init__(bundle)
        self.threads = threads
        self.providers = providers or ["CPUExecutionProvider"]
        self._sessions: dict[str, ort.InferenceSession] = {}

    @property
    def ort_cpu(self) -> bool:
        return self.providers == ["CPUExecutionProvider"]

    def session(self, graph: str) -> ort.InferenceSession:
        if graph not in self._sessions:
            opts = ort.SessionOptions()
            opts.log_severity_level = 3
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            # several sessions share few cores: spinning threads of one session starve the next call
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
            if self.threads:
                opts.intra_op_num_threads = self.threads
            path = self.bundle.file(self._specs[graph]["file"])
            for blob in self._specs[graph].get("external_data", []):  # listed, verified, inside the bundle
                self.bundle.file(blob)
            self._sessions[graph] = ort.InferenceSession(str(path), opts, providers=self.providers)
        return self._sessions[graph]

    def open(self, graph: str) -> None:
        self.session(graph)

    def _run(self, graph, feeds, output_names):
        return self.session(graph).run(output_names, feeds)
