"""Choosing a backend: which one ``auto`` or an explicit name means on this machine (``resolve_backend``), whether
a GPU provider is really in effect (``provider_in_effect``), and building it (``make_backend``).

The backends themselves are imported inside ``make_backend``: TensorRT (``.trt``) is optional, so it must not be
imported unless asked for, and ONNX Runtime (``.ort``) is left to first use as well, so that importing
``runtime.backends`` (which re-exports ``make_backend``) loads neither."""

from __future__ import annotations

from ..errors import BundleError
from .base import ALIASES, BACKENDS, TRT_MINIMUM, Backend, BackendUnavailable
from .memory import cudart_module


def _trt_versions(trt_version: str | None = "probe", cuda_python: bool | None = None) -> tuple[str | None, bool]:
    if trt_version == "probe":
        try:
            import tensorrt  # optional: probed only when asked which backend to use

            trt_version = tensorrt.__version__
        except ImportError:
            trt_version = None
    if cuda_python is None:
        try:
            cudart_module()
            cuda_python = True
        except ImportError:
            cuda_python = False
    return trt_version, cuda_python


def resolve_backend(backend: str, providers: list[str] | None = None, trt_version: str | None = "probe",
                    cuda_python: bool | None = None) -> tuple[str, str]:
    """(the backend to use, why). ``auto`` takes ONNX Runtime's TensorRT provider, then its CUDA provider, then
    this project's own TensorRT backend (when TensorRT and cuda-python are installed), then the CPU. The native
    TensorRT backend comes after ONNX Runtime's providers because it has never been run on a GPU: only what it
    decides (``engine_plan``, ``device``, ``memory``) is tested, on the CPU. Explicit names are checked here,
    before anything is loaded or written, and refused with one line naming what is missing. ``providers`` /
    ``trt_version`` / ``cuda_python`` default to what this machine has (for tests)."""
    name = ALIASES.get(backend, backend)
    if name not in BACKENDS:
        raise BundleError(f"backend {backend!r}: expected one of {', '.join(BACKENDS)} (or ort = ort-cpu)")
    if providers is None:
        import onnxruntime as ort  # at first use: see the module docstring

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
    from .ort import OrtBackend, OrtTrtBackend, provider_list  # at first use: see the module docstring

    while True:
        if name == "trt":
            from .trt import TrtBackend  # tensorrt is optional: imported only when the trt backend is chosen

            b = TrtBackend(bundle, device_id=device_id)
            b.why = why
            return b
        cls = OrtTrtBackend if name == "ort-trt" else OrtBackend
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
