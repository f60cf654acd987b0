"""The backend interface: ``run(graph, feeds)`` validates names, dtypes and ranks against the manifest;
the concrete backend only executes. Only the interface and what every backend shares live here (the backend names,
the TensorRT minimum, ``BackendUnavailable``); choosing a backend is ``select``'s, so this module imports no
backend."""

from __future__ import annotations

import numpy as np

from ..errors import BundleError


class Backend:
    name = "base"
    ort_cpu = False  # ONNX Runtime on the CPU only: the bundle's *_ort_cpu graphs apply

    def __init__(self, bundle):
        self.bundle = bundle
        self._specs = {g: bundle.graph(g) for g in bundle.manifest["graphs"]}

    def run(self, graph: str, feeds: dict[str, np.ndarray], outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        spec = self._specs[graph]
        expected = {t["name"]: t for t in spec["inputs"]}
        if set(feeds) != set(expected):
            missing, extra = sorted(set(expected) - set(feeds)), sorted(set(feeds) - set(expected))
            raise BundleError(f"graph {graph!r}: inputs missing {missing}, unexpected {extra}")
        for name, arr in feeds.items():
            t = expected[name]
            if arr.dtype != np.dtype(t["dtype"]) or arr.ndim != len(t["shape"]):
                raise BundleError(
                    f"graph {graph!r} input {name!r}: got {arr.dtype} rank {arr.ndim}, expected {t['dtype']} shape {t['shape']}"
                )
            for dim, want in zip(arr.shape, t["shape"]):
                if isinstance(want, int) and dim != want:
                    raise BundleError(f"graph {graph!r} input {name!r}: shape {arr.shape}, expected {t['shape']}")
        names = outputs or [t["name"] for t in spec["outputs"]]
        return dict(zip(names, self._run(graph, feeds, names)))

    def open(self, graph: str) -> None:
        """Prepare ``graph`` for running (create its session or engine) so that the first call pays no setup."""

    def _run(self, graph, feeds, output_names):  # pragma: no cover - interface
        raise NotImplementedError


BACKENDS = ("auto", "ort-cpu", "ort-cuda", "ort-trt", "trt")
ALIASES = {"ort": "ort-cpu", "onnxruntime": "ort-cpu", "cpu": "ort-cpu", "cuda": "ort-cuda", "tensorrt": "trt"}
TRT_MINIMUM = (10, 3)  # TensorRT 10.3 = JetPack 6.1 / 6.2


class BackendUnavailable(BundleError):
    """The asked-for backend cannot run on this machine: the message names what is missing and how to install it."""
