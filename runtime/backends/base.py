"""The backend interface: ``run(graph, feeds)`` validates names, dtypes and ranks against the manifest;
the concrete backend only executes."""

from __future__ import annotations

from pathlib import Path

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


def _trt_versions(trt_version: str | None = "probe", cuda_python: bool | None = None) -> tuple[str | None, bool]:
    if trt_version == "probe":
        try:
            import tensorrt

            trt_version = tensorrt.__version__
        except ImportError:
            trt_version = None
    if cuda_python is None:
        try:
            from .device import cudart_module

            cudart_module()
            cuda_python = True
        except ImportError:
            cuda_python = False
    return trt_version, cuda_python


def resolve_backend(backend: str, providers: list[str] | None = None, trt_version: str | None = "probe",
                    cuda_python: bool | None = None) -> tuple[str, str]:
    """(the backend to use, why). ``auto`` takes ONNX Runtime's TensorRT provider, then its CUDA provider, then
    this project's own TensorRT backend (when TensorRT and cuda-python are installed), then the CPU. The native
    TensorRT backend comes after ONNX Runtime's providers until a GPU run of it is committed (README). Explicit
    names are checked here, before anything is loaded or written, and refused with one line naming what is
    missing. ``providers`` / ``trt_version`` / ``cuda_python`` default to what this machine has (for tests)."""
    name = ALIASES.get(backend, backend)
    if name not in BACKENDS:
        raise BundleError(f"backend {backend!r}: expected one of {', '.join(BACKENDS)} (or ort = ort-cpu)")
    if providers is None:
        import onnxruntime as ort

        providers = list(ort.get_available_providers())
    if name == "auto":
        if "TensorrtExecutionProvider" in providers:
            return "ort-trt", "auto: ONNX Runtime's TensorRT provider is installed"
        if "CUDAExecutionProvider" in providers:
            return "ort-cuda", "auto: ONNX Runtime's CUDA provider is installed"
        version, cuda_ok = _trt_versions(trt_version, cuda_python)
        if version is not None and cuda_ok and _at_least(version, TRT_MINIMUM):
            return "trt", f"auto: TensorRT {version} and cuda-python are installed"
        return "ort-cpu", "auto: no GPU provider in this onnxruntime and no TensorRT, so the CPU"
    if name == "ort-cuda" and "CUDAExecutionProvider" not in providers:
        raise BackendUnavailable(
            f"backend ort-cuda needs ONNX Runtime's CUDA provider; this onnxruntime has {providers}: "
            f"pip uninstall onnxruntime && pip install onnxruntime-gpu (on Jetson, the JetPack build of onnxruntime-gpu)")
    if name == "ort-trt" and "TensorrtExecutionProvider" not in providers:
        raise BackendUnavailable(
            f"backend ort-trt needs ONNX Runtime's TensorRT provider; this onnxruntime has {providers}: install "
            f"onnxruntime-gpu and TensorRT {TRT_MINIMUM[0]}.{TRT_MINIMUM[1]}+ (pip install tensorrt; on Jetson, JetPack 6.1+)")
    if name == "trt":
        version, cuda_ok = _trt_versions(trt_version, cuda_python)
        if version is None or not cuda_ok:
            missing = " and ".join(x for x, ok in ((f"TensorRT's Python package ({TRT_MINIMUM[0]}.{TRT_MINIMUM[1]} or newer)",
                                                     version is not None), ("cuda-python", cuda_ok)) if not ok)
            raise BackendUnavailable(
                f"backend trt needs {missing}, not importable here: pip install 'dream-export[trt]' "
                f"(on Jetson, JetPack 6.1+ ships TensorRT 10.3; pip install cuda-python)")
        if not _at_least(version, TRT_MINIMUM):
            raise BackendUnavailable(f"backend trt: TensorRT {version} is older than the minimum "
                                     f"{TRT_MINIMUM[0]}.{TRT_MINIMUM[1]} (JetPack 6.1); upgrade TensorRT")
    return name, "asked for"


def _at_least(version: str, minimum: tuple[int, int]) -> bool:
    return tuple(int(x) for x in version.split(".")[:2] if x.isdigit()) >= minimum


def make_backend(bundle, backend: str = "auto", threads: int | None = None, device_id: int = 0) -> Backend:
    name, why = resolve_backend(backend)
    from .ort import OrtBackend

    if name == "trt":
        from .trt import TrtBackend

        b = TrtBackend(bundle, device_id=device_id)
        b.why = why
        return b
    b = OrtBackend(bundle, threads=threads, providers=provider_list(name, bundle, device_id), device_id=device_id)
    b.name, b.why = name, why
    return b


def provider_list(name: str, bundle, device_id: int = 0) -> list:
    """ONNX Runtime providers (with their options) for a resolved backend name. The TensorRT provider caches its
    engines and timing cache inside the bundle (``engines/ort-trt/``; engines are not portable: the provider
    keys them by GPU, TensorRT version and graph)."""
    if name == "ort-cpu":
        return ["CPUExecutionProvider"]
    cuda = ("CUDAExecutionProvider", {"device_id": str(device_id)})
    if name == "ort-cuda":
        return [cuda, "CPUExecutionProvider"]
    precision = str((bundle.manifest.get("precision") or "fp32"))
    cache = str(Path(bundle.path) / "engines" / "ort-trt")
    trt = ("TensorrtExecutionProvider", {
        "device_id": str(device_id),
        "trt_fp16_enable": "True" if precision == "fp16" else "False",
        "trt_engine_cache_enable": "True", "trt_engine_cache_path": cache,
        "trt_timing_cache_enable": "True", "trt_timing_cache_path": cache,
    })
    return [trt, cuda, "CPUExecutionProvider"]
