"""The backend interface: ``run(graph, feeds)`` validates names, dtypes and ranks against the manifest;
the concrete backend only executes."""

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


def make_backend(bundle, backend: str = "auto", threads: int | None = None) -> Backend:
    if backend in ("auto", "ort", "onnxruntime"):
        from .ort import OrtBackend

        return OrtBackend(bundle, threads=threads)
    raise BundleError(f"backend {backend!r} is not available; expected one of: auto, ort")
