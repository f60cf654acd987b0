"""Memory for device-resident decoding, behind one small interface (``alloc`` / ``upload`` / ``download`` /
``copy`` / ``synchronize`` / ``free``): ``CudaMemory`` (cuda-python) on a GPU, ``HostMemory`` on the CPU. The host
one runs the very same decoder code here, in CI, so everything but the CUDA calls themselves is tested without a GPU.
Also the cuda-python helpers both backends use (``cudart_module``, ``cuda_check``) and ``ScratchBuffer``.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from importlib import metadata

import numpy as np

ALIGN = 256  # TensorRT: "The pointer must have at least 256-byte alignment" (IExecutionContext::setTensorAddress)


@dataclass
class Buffer:
    ptr: int
    nbytes: int
    owner: object = None  # keeps host memory alive; None for device memory freed by the Memory


class HostMemory:
    """The memory interface on host memory (numpy + memmove), aligned as TensorRT requires device pointers. It
    counts what is live (``live_bytes``) and how often a caller waits (``syncs``), as the CUDA memory does, so
    lifetimes and synchronization are tested here."""

    device_type = "cpu"
    device_id = 0

    def __init__(self):
        self.live: dict[int, int] = {}  # ptr -> bytes of every allocation not freed yet
        self.syncs = 0

    @property
    def live_bytes(self) -> int:
        return sum(self.live.values())

    def alloc(self, nbytes: int) -> Buffer:
        raw = np.zeros(max(int(nbytes), 1) + ALIGN, np.uint8)
        base = raw.ctypes.data
        start = (-base) % ALIGN
        buf = Buffer(base + start, int(nbytes), raw)
        self.live[buf.ptr] = buf.nbytes
        return buf

    def upload(self, dst: int, arr: np.ndarray) -> None:
        a = np.ascontiguousarray(arr)
        ctypes.memmove(dst, a.ctypes.data, a.nbytes)

    def download(self, src: int, shape, dtype) -> np.ndarray:
        return self.download_many([(src, shape, dtype)])[0]

    def download_many(self, items) -> list[np.ndarray]:
        """Several device-to-host copies, then one wait: ``items`` are (src, shape, dtype)."""
        out = []
        for src, shape, dtype in items:
            a = np.empty(shape, dtype)
            ctypes.memmove(a.ctypes.data, src, a.nbytes)
            out.append(a)
        self.synchronize()
        return out

    def copy(self, dst: int, src: int, nbytes: int) -> None:
        ctypes.memmove(dst, src, nbytes)

    def synchronize(self) -> None:
        self.syncs += 1

    def free(self, buf: Buffer) -> None:
        """Idempotent: a buffer freed twice is freed once."""
        self.live.pop(buf.ptr, None)
        buf.owner = None

    def close(self) -> None:
        self.live.clear()


CUDA_PYTHON_SUPPORTED = (12, 13)  # [12, 13): what pyproject's trt extra pins, to match tensorrt-cu12 and JetPack 6


def check_cuda_python_version(version: str) -> None:
    """Refuse a cuda-python outside 12.x with what to install: 13.x needs a CUDA 13 driver (JetPack 6 has 12.x)
    and changes how handles convert to ints, which this backend relies on."""
    try:
        major = int(str(version).split(".")[0])
    except ValueError:
        raise ImportError(f"cuda-python version {version!r}: expected a version like 12.6.0") from None
    lo, hi = CUDA_PYTHON_SUPPORTED
    if not lo <= major < hi:
        raise ImportError(f"cuda-python {version} is installed; this runtime supports {lo}.x "
                          f"(pip install 'cuda-python>={lo}.2,<{hi}')")


def cudart_module():
    """cuda-python's runtime API: ``cuda.bindings.runtime`` (cuda-python >= 12.6), else the older ``cuda.cudart``."""
    # cuda-python is optional (GPU machines only): imported when a CUDA memory or a probe asks for it
    try:
        from cuda.bindings import runtime as cudart  # type: ignore
    except ImportError:
        from cuda import cudart  # type: ignore

    for dist in ("cuda-python", "cuda-bindings"):
        try:
            check_cuda_python_version(metadata.version(dist))
            break
        except metadata.PackageNotFoundError:
            continue
    return cudart


def cuda_check(result):
    """cuda-python calls return (error, *values): raise on an error, return the value(s)."""
    err, *values = result
    if int(err) != 0:
        cudart = cudart_module()
        name = cudart.cudaGetErrorName(err)[1]
        raise RuntimeError(f"CUDA error {int(err)} ({name.decode() if isinstance(name, bytes) else name})")
    return values[0] if len(values) == 1 else (tuple(values) if values else None)


class CudaMemory:
    """The memory interface on a CUDA device through cuda-python, on one stream (written against the CUDA runtime
    API as NVIDIA's TensorRT Python samples use it; runs only where a GPU and cuda-python are present).

    Host sides of copies go through one pinned staging area (``cudaMallocHost``): uploads are queued without a
    wait, downloads of one call are queued together and waited for once (``download_many``). The staging area
    is reused from its start after every wait."""

    device_type = "cuda"

    def __init__(self, device_id: int = 0):
        self.cudart = cudart_module()
        self.device_id = device_id
        cuda_check(self.cudart.cudaSetDevice(device_id))
        self.stream = cuda_check(self.cudart.cudaStreamCreate())
        self.live: dict[int, int] = {}
        self.syncs = 0
        self._pinned, self._pinned_bytes, self._pinned_used = None, 0, 0

    @property
    def live_bytes(self) -> int:
        return sum(self.live.values())

    def properties(self) -> tuple[str, tuple[int, int], int]:
        """(GPU name, compute capability, total memory bytes)."""
        prop = cuda_check(self.cudart.cudaGetDeviceProperties(self.device_id))
        name = prop.name.decode(errors="replace") if isinstance(prop.name, bytes) else str(prop.name)
        return name.strip("\x00 "), (int(prop.major), int(prop.minor)), int(prop.totalGlobalMem)

    def mem_info(self) -> tuple[int, int]:
        """(free, total) device bytes (``cudaMemGetInfo``)."""
        free, total = cuda_check(self.cudart.cudaMemGetInfo())
        return int(free), int(total)

    def alloc(self, nbytes: int) -> Buffer:
        n = max(int(nbytes), 1)
        ptr = _address(cuda_check(self.cudart.cudaMalloc(n)))  # cudaMalloc aligns to >= 256 bytes
        # finite padding rows (device.DeviceDecoder); queued on our stream, ordered before any use of the buffer
        cuda_check(self.cudart.cudaMemsetAsync(ptr, 0, n, self.stream))
        self.live[ptr] = int(nbytes)
        return Buffer(ptr, int(nbytes))

    def _kind(self, name: str):
        return getattr(self.cudart.cudaMemcpyKind, name)

    def _stage(self, nbytes: int) -> int:
        """Host address of ``nbytes`` of pinned staging, valid until the next wait."""
        need = self._pinned_used + (int(nbytes) + ALIGN - 1) // ALIGN * ALIGN
        if need > self._pinned_bytes:
            self.synchronize()  # queued copies may still read the old area
            if self._pinned is not None:
                cuda_check(self.cudart.cudaFreeHost(self._pinned))
            size = 1 << max(20, int(max(need, 2 * self._pinned_bytes) - 1).bit_length())
            self._pinned, self._pinned_bytes = _address(cuda_check(self.cudart.cudaMallocHost(size))), size
            need = (int(nbytes) + ALIGN - 1) // ALIGN * ALIGN
        ptr = self._pinned + self._pinned_used
        self._pinned_used = need
        return ptr

    def upload(self, dst: int, arr: np.ndarray) -> None:
        a = np.ascontiguousarray(arr)
        host = self._stage(a.nbytes)
        ctypes.memmove(host, a.ctypes.data, a.nbytes)
        cuda_check(self.cudart.cudaMemcpyAsync(dst, host, a.nbytes, self._kind("cudaMemcpyHostToDevice"), self.stream))

    def download(self, src: int, shape, dtype) -> np.ndarray:
        return self.download_many([(src, shape, dtype)])[0]

    def download_many(self, items) -> list[np.ndarray]:
        outs, staged = [], []
        for src, shape, dtype in items:
            a = np.empty(shape, dtype)
            host = self._stage(a.nbytes)
            cuda_check(self.cudart.cudaMemcpyAsync(host, src, a.nbytes, self._kind("cudaMemcpyDeviceToHost"), self.stream))
            outs.append(a)
            staged.append(host)
        self.synchronize()
        for a, host in zip(outs, staged):
            ctypes.memmove(a.ctypes.data, host, a.nbytes)
        return outs

    def copy(self, dst: int, src: int, nbytes: int) -> None:
        cuda_check(self.cudart.cudaMemcpyAsync(dst, src, nbytes, self._kind("cudaMemcpyDeviceToDevice"), self.stream))

    def synchronize(self) -> None:
        cuda_check(self.cudart.cudaStreamSynchronize(self.stream))
        self.syncs += 1
        self._pinned_used = 0

    def free(self, buf: Buffer) -> None:
        """Idempotent. Waits for queued work first: a kernel or copy may still use the buffer."""
        if buf.ptr in self.live:
            self.synchronize()
            del self.live[buf.ptr]
            cuda_check(self.cudart.cudaFree(buf.ptr))

    def close(self) -> None:
        self.synchronize()
        for ptr in list(self.live):
            self.cudart.cudaFree(ptr)
        self.live.clear()
        if self._pinned is not None:
            self.cudart.cudaFreeHost(self._pinned)
            self._pinned, self._pinned_bytes = None, 0


def _address(handle) -> int:
    """A device or host pointer as an int (cuda-python returns ints for these in both 12.x and 13.x)."""
    return int(handle)


class ScratchBuffer:
    """A buffer reused from call to call for what one call needs (staged inputs and outputs, new K/V rows): when a
    call needs more bytes than it has, it is freed and allocated again, larger (a power of two); what it held is
    not kept."""

    def __init__(self, memory):
        self.memory, self.buf = memory, None

    def get(self, nbytes: int) -> int:
        if self.buf is None or self.buf.nbytes < nbytes:
            if self.buf is not None:
                self.memory.free(self.buf)
            self.buf = self.memory.alloc(1 << max(8, int(nbytes - 1).bit_length()))
        return self.buf.ptr

    def free(self) -> None:
        if self.buf is not None:
            self.memory.free(self.buf)
            self.buf = None
