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


# The provider each GPU backend name stands for, and what ``auto`` tries next when it is not in effect.
_PROVIDER = {"ort-trt": "TensorrtExecutionProvider", "ort-cuda": "CUDAExecutionProvider"}
_FALLBACK = {"ort-trt": "ort-cuda", "ort-cuda": "ort-cpu"}


def provider_in_effect(name: str, active: list[str]) -> str | None:
    """None when a session created for backend ``name`` really runs on its provider (``active`` is that
    session's ``get_providers()``), else why not. onnxruntime-gpu lists the TensorRT provider as available even
    where TensorRT's libraries are missing; a session then silently runs on CUDA (or the CPU)."""
    want = _PROVIDER.get(name)
    if want is None or want in active:
        return None
    return (f"backend {name}: ONNX Runtime lists {want} but a session created with it runs on {active} "
            f"(its libraries did not load: for TensorRT, libnvinfer of a version this onnxruntime was built for; "
            f"for CUDA, the CUDA and cuDNN libraries)")


def make_backend(bundle, backend: str = "auto", threads: int | None = None, device_id: int = 0) -> Backend:
    name, why = resolve_backend(backend)
    from .ort import OrtBackend

    while True:
        if name == "trt":
            from .trt import TrtBackend

            b = TrtBackend(bundle, device_id=device_id)
            b.why = why
            return b
        cls = _ort_trt_backend() if name == "ort-trt" else OrtBackend
        b = cls(bundle, threads=threads, providers=provider_list(name, bundle, device_id), device_id=device_id)
        b.name, b.why = name, why
        if name not in _PROVIDER:
            return b
        # the first session (kept: the backend would open it anyway) says which provider is in effect
        first = next(g for g in ("vision", "decoder", *b._specs) if g in b._specs)
        problem = provider_in_effect(name, list(b.session(first).get_providers()))
        if problem is None:
            return b
        if backend != "auto":
            raise BackendUnavailable(problem)
        name, why = _FALLBACK[name], f"auto: {problem}; so {_FALLBACK[name]}"


def _ort_trt_backend():
    """ONNX Runtime with the TensorRT provider, each graph's session given that graph's optimization profiles."""
    from .ort import OrtBackend

    class OrtTrtBackend(OrtBackend):
        def providers_for(self, graph: str) -> list:
            return provider_list("ort-trt", self.bundle, self.device_id, graph=graph)

        def session(self, graph: str):
            if graph not in self._sessions:
                self.providers = self.providers_for(graph)
            return super().session(graph)

    return OrtTrtBackend


def trt_profile_options(bundle, graph: str) -> dict:
    """ONNX Runtime TensorRT provider options with the graph's optimization profiles (``trt_plan.Plan``): without
    them the provider builds an engine for the shapes it first sees and rebuilds it whenever the past grows past
    them. Format: ``name:d0xd1x...`` comma-separated; an input listed again starts the next profile."""
    from .trt_plan import Plan, profile_shapes

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
    import onnxruntime as ort

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
