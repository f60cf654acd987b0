"""Device-resident decoding: the target's K/V stay in (device) memory between calls (issue 9, item 3).

Three small pieces, each replaceable:
- a **memory** (``alloc`` / ``upload`` / ``download`` / ``copy``): ``CudaMemory`` (cuda-python) on a GPU,
  ``HostMemory`` on the CPU. The host one runs the very same decoder code here, in CI, so everything but the
  CUDA calls themselves is tested without a GPU;
- an **executor** that runs one graph over named pointers (``OrtPointerExecutor``: ONNX Runtime's IOBinding on
  the CPU or CUDA; ``trt.TrtExecutor``: TensorRT's ``set_tensor_address`` + ``execute_async_v3``);
- ``DeviceDecoder``: the runtime's decoder contract (run / commit / truncate) over them.

The K/V layout is ``[1, positions, kv_heads, head_dim]`` (the decoder graph's ``kv.layout == "bshd"``), so the
first L positions of a buffer preallocated to the capacity are one contiguous block: a call binds the buffer's
base address with shape ``[1, L, kvh, hd]`` as its past (nothing is copied), the graph writes the new rows into an
aligned scratch buffer (TensorRT wants 256-byte aligned tensor addresses, which row L of the cache is not in
general), and ``commit`` copies the kept rows into place, device to device (``trt_plan.kv_row_copies``: an
accepted draft path is compacted there, never via the host). Only logits, hidden states and attention scores
come back to the host (``trt_plan.Plan.logits_rows``).
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import numpy as np

from ..decoder import DecoderRunner
from ..errors import BundleError
from .trt_plan import kv_row_copies

ALIGN = 256  # TensorRT: "The pointer must have at least 256-byte alignment" (IExecutionContext::setTensorAddress)


@dataclass
class Buffer:
    ptr: int
    nbytes: int
    owner: object = None  # keeps host memory alive; None for device memory freed by the Memory


class HostMemory:
    """The memory interface on host memory (numpy + memmove), aligned as TensorRT requires device pointers."""

    device_type = "cpu"
    device_id = 0

    def alloc(self, nbytes: int) -> Buffer:
        raw = np.zeros(max(int(nbytes), 1) + ALIGN, np.uint8)
        base = raw.ctypes.data
        start = (-base) % ALIGN
        return Buffer(base + start, int(nbytes), raw)

    def upload(self, dst: int, arr: np.ndarray) -> None:
        a = np.ascontiguousarray(arr)
        ctypes.memmove(dst, a.ctypes.data, a.nbytes)

    def download(self, src: int, shape, dtype) -> np.ndarray:
        out = np.empty(shape, dtype)
        ctypes.memmove(out.ctypes.data, src, out.nbytes)
        return out

    def copy(self, dst: int, src: int, nbytes: int) -> None:
        ctypes.memmove(dst, src, nbytes)

    def synchronize(self) -> None:
        pass

    def free(self, buf: Buffer) -> None:
        buf.owner = None


def cudart_module():
    """cuda-python's runtime API: ``cuda.bindings.runtime`` (cuda-python >= 12.6), else the older ``cuda.cudart``."""
    try:
        from cuda.bindings import runtime as cudart  # type: ignore
    except ImportError:
        from cuda import cudart  # type: ignore
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
    API as NVIDIA's TensorRT Python samples use it; runs only where a GPU and cuda-python are present)."""

    device_type = "cuda"

    def __init__(self, device_id: int = 0):
        self.cudart = cudart_module()
        self.device_id = device_id
        cuda_check(self.cudart.cudaSetDevice(device_id))
        self.stream = cuda_check(self.cudart.cudaStreamCreate())
        self._live: list[int] = []

    def properties(self) -> tuple[str, tuple[int, int], int]:
        """(GPU name, compute capability, total memory bytes)."""
        prop = cuda_check(self.cudart.cudaGetDeviceProperties(self.device_id))
        name = prop.name.decode(errors="replace") if isinstance(prop.name, bytes) else str(prop.name)
        return name.strip("\x00 "), (int(prop.major), int(prop.minor)), int(prop.totalGlobalMem)

    def alloc(self, nbytes: int) -> Buffer:
        ptr = int(cuda_check(self.cudart.cudaMalloc(max(int(nbytes), 1))))  # cudaMalloc aligns to >= 256 bytes
        cuda_check(self.cudart.cudaMemset(ptr, 0, max(int(nbytes), 1)))  # finite padding rows (device.DeviceDecoder)
        self._live.append(ptr)
        return Buffer(ptr, int(nbytes))

    def _kind(self, name: str):
        return getattr(self.cudart.cudaMemcpyKind, name)

    def upload(self, dst: int, arr: np.ndarray) -> None:
        a = np.ascontiguousarray(arr)
        cuda_check(self.cudart.cudaMemcpyAsync(dst, a.ctypes.data, a.nbytes, self._kind("cudaMemcpyHostToDevice"), self.stream))
        # pageable source: the copy has left ``a`` once the call returns, but keep ordering simple and explicit
        self.synchronize()

    def download(self, src: int, shape, dtype) -> np.ndarray:
        out = np.empty(shape, dtype)
        cuda_check(self.cudart.cudaMemcpyAsync(out.ctypes.data, src, out.nbytes, self._kind("cudaMemcpyDeviceToHost"), self.stream))
        self.synchronize()
        return out

    def copy(self, dst: int, src: int, nbytes: int) -> None:
        cuda_check(self.cudart.cudaMemcpyAsync(dst, src, nbytes, self._kind("cudaMemcpyDeviceToDevice"), self.stream))

    def synchronize(self) -> None:
        cuda_check(self.cudart.cudaStreamSynchronize(self.stream))

    def free(self, buf: Buffer) -> None:
        if buf.ptr in self._live:
            self._live.remove(buf.ptr)
            cuda_check(self.cudart.cudaFree(buf.ptr))

    def close(self) -> None:
        for ptr in self._live:
            self.cudart.cudaFree(ptr)
        self._live.clear()


class OrtPointerExecutor:
    """Runs one ONNX Runtime session over named pointers with IOBinding: ``(ptr, shape, dtype)`` per input and
    output, all in ``memory``'s device (the CPU, or CUDA with onnxruntime-gpu)."""

    def __init__(self, session, memory):
        self.session = session
        self.memory = memory

    def __call__(self, inputs: dict, outputs: dict, graph_key=None) -> None:
        """``graph_key`` (same shapes and addresses as every call with that key) is for executors that capture
        CUDA graphs; ONNX Runtime runs each call as it comes."""
        io = self.session.io_binding()
        dev, dev_id = self.memory.device_type, self.memory.device_id
        for name, (ptr, shape, dtype) in inputs.items():
            io.bind_input(name, dev, dev_id, np.dtype(dtype), list(shape), ptr)
        for name, (ptr, shape, dtype) in outputs.items():
            io.bind_output(name, dev, dev_id, np.dtype(dtype), list(shape), ptr)
        self.memory.synchronize()  # our copies (another stream) are done before ORT reads
        self.session.run_with_iobinding(io)


class _Grown:
    """A device buffer that grows (to a power of two) when a call needs more bytes than it has."""

    def __init__(self, memory):
        self.memory, self.buf = memory, None

    def get(self, nbytes: int) -> int:
        if self.buf is None or self.buf.nbytes < nbytes:
            if self.buf is not None:
                self.memory.free(self.buf)
            self.buf = self.memory.alloc(1 << max(8, int(nbytes - 1).bit_length()))
        return self.buf.ptr


class DeviceDecoder(DecoderRunner):
    """The target decoder with its K/V resident in ``memory`` (see the module docstring).

    ``execute(inputs, outputs, graph_key)`` runs the ``decoder`` graph over pointers. ``logits_rows(q)`` says how
    many trailing logits rows a call of q positions copies back (a tree verify needs all; a prompt prefill only
    its last row).

    ``bucket`` (for CUDA graphs): calls of at most ``fixed_q`` positions (steps, tree verifies) bind the past
    padded up to a multiple of ``bucket`` positions (at most ``max_past``) with the padding masked out, and use
    buffers allocated once, so every such call of one (q, padded past) has the same shapes and addresses: its
    ``graph_key`` lets the executor capture it once and replay it. Masked rows get weight exactly 0 (an additive
    -1e4 underflows exp in FP32); only the order of the softmax sums changes."""

    def __init__(self, execute, memory, graph: dict, text: dict, capacity: int, logits_rows,
                 bucket: int | None = None, fixed_q: int = 0, max_past: int | None = None):
        kv = graph["kv"]
        if kv.get("layout") != "bshd":
            raise BundleError("this bundle's decoder keeps K/V as [1, kv_heads, positions, head_dim]; the device "
                              "decoder needs [1, positions, kv_heads, head_dim]: re-export the bundle with this "
                              "version of dream-export")
        self.execute, self.memory, self.capacity, self.logits_rows = execute, memory, capacity, logits_rows
        self.names = kv
        types = {t["name"]: t for t in graph["inputs"] + graph["outputs"]}
        self.kv_dtype = np.dtype(types[kv["past_key"][0]]["dtype"])
        self.dtypes = {n: np.dtype(t["dtype"]) for n, t in types.items()}
        self.mask_min = float(graph.get("mask_min", -1e4))
        self.row_shape = (int(text["kv_heads"]), int(text["head_dim"]))
        self.row_bytes = int(np.prod(self.row_shape)) * self.kv_dtype.itemsize
        self.hidden, self.vocab = int(text["hidden_size"]), int(text["vocab_size"])
        self.past_names = [n for pair in zip(kv["past_key"], kv["past_value"]) for n in pair]
        self.present_names = [n for pair in zip(kv["present_key"], kv["present_value"]) for n in pair]
        self.cache = [memory.alloc(capacity * self.row_bytes) for _ in self.past_names]  # zeroed: padding is finite
        self.scratch = [_Grown(memory) for _ in self.present_names]
        self.staging = {n: _Grown(memory) for n in ("inputs_embeds", "attention_mask", "position_ids",
                                                     "logits", "hidden_states", "attention_received")}
        self.bucket = int(bucket) if bucket else None
        self.fixed_q = int(fixed_q) if self.bucket else 0
        self.max_past = min(int(max_past if max_past is not None else capacity - 1), capacity - self.fixed_q)
        if self.fixed_q:  # allocated once at their largest: fixed addresses for captured graphs
            widest = self.max_past + self.fixed_q
            f32 = 4
            sizes = {"inputs_embeds": self.fixed_q * self.hidden * f32, "attention_mask": self.fixed_q * widest * f32,
                     "position_ids": 3 * self.fixed_q * 8, "logits": self.fixed_q * self.vocab * f32,
                     "hidden_states": self.fixed_q * self.hidden * f32, "attention_received": widest * f32}
            self._fixed_buffers = [memory.alloc(b) for b in sizes.values()]  # kept: they own the memory
            self._fixed_buffers += [memory.alloc(self.fixed_q * self.row_bytes) for _ in self.present_names]
            self.fixed = {n: b.ptr for n, b in zip(sizes, self._fixed_buffers)}
            self.fixed_scratch = [b.ptr for b in self._fixed_buffers[len(sizes):]]
        self.length = 0
        self._pending_q = 0
        self._scratch_used: list[int] = []

    def padded_past(self, p: int, q: int) -> int:
        """The past length a call binds: p, or (bucketed calls) p rounded up to the bucket, at most max_past."""
        if not self.fixed_q or q > self.fixed_q or p == 0:
            return p
        return max(p, min(-(-p // self.bucket) * self.bucket, self.max_past))

    def run(self, embeds, mask, positions):
        q = embeds.shape[1]
        p = self.length
        if p + q > self.capacity:
            raise ValueError(f"KV buffer full: {p} + {q} > capacity {self.capacity}")
        if mask.shape[-1] != p + q:
            raise ValueError(f"mask width {mask.shape[-1]} != context {p} + {q}")
        pb = self.padded_past(p, q)
        if pb > p:  # the padded rows [p, pb) are masked out for every query
            padded = np.full((*mask.shape[:-1], pb + q), self.mask_min, mask.dtype)
            padded[..., :p] = mask[..., :p]
            padded[..., pb:] = mask[..., p:]
            mask = padded
        fixed = bool(self.fixed_q) and q <= self.fixed_q
        dt = self.dtypes
        feeds = {"inputs_embeds": embeds.astype(dt["inputs_embeds"], copy=False),
                 "attention_mask": mask.astype(dt["attention_mask"], copy=False),
                 "position_ids": self.position_feed(positions).astype(dt["position_ids"], copy=False)}
        inputs = {}
        for name, arr in feeds.items():
            arr = np.ascontiguousarray(arr)
            ptr = self.fixed[name] if fixed else self.staging[name].get(arr.nbytes)
            self.memory.upload(ptr, arr)
            inputs[name] = (ptr, arr.shape, arr.dtype)
        for name, buf in zip(self.past_names, self.cache):
            inputs[name] = (buf.ptr, (1, pb, *self.row_shape), self.kv_dtype)  # the first pb rows: contiguous
        shapes = {"logits": (1, q, self.vocab), "hidden_states": (1, q, self.hidden), "attention_received": (1, pb + q)}
        outputs = {n: (self.fixed[n] if fixed else self.staging[n].get(int(np.prod(s)) * dt[n].itemsize), s, dt[n])
                   for n, s in shapes.items()}
        self._scratch_used = self.fixed_scratch if fixed else [s.get(q * self.row_bytes) for s in self.scratch]
        for name, ptr in zip(self.present_names, self._scratch_used):
            outputs[name] = (ptr, (1, q, *self.row_shape), self.kv_dtype)
        self.execute(inputs, outputs, (q, pb) if fixed else None)
        rows = self.logits_rows(q)
        lptr, _, ldt = outputs["logits"]
        received = self.memory.download(outputs["attention_received"][0], shapes["attention_received"], dt["attention_received"])
        out = {
            "logits": self.memory.download(lptr + (q - rows) * self.vocab * ldt.itemsize, (1, rows, self.vocab), ldt),
            "hidden_states": self.memory.download(outputs["hidden_states"][0], shapes["hidden_states"], dt["hidden_states"]),
            "attention_received": np.concatenate([received[:, :p], received[:, pb:]], axis=1) if pb > p else received,
        }
        self._pending_q = q
        return {k: v.astype(np.float32, copy=False) for k, v in out.items()}

    def commit(self, rows=None):
        q = self._pending_q
        copies = kv_row_copies(self.length, q, rows)
        for buf, src_ptr in zip(self.cache, self._scratch_used):
            for dst, src, n in copies:
                self.memory.copy(buf.ptr + dst * self.row_bytes, src_ptr + src * self.row_bytes, n * self.row_bytes)
        self.length += q if rows is None else len(rows)
        self._pending_q = 0

    def truncate(self, length):
        self.length = min(self.length, length)

    def read_kv(self, index: int) -> np.ndarray:
        """[1, length, kvh, hd] of the index-th past tensor (key_0, value_0, key_1, ...): for tests and checks."""
        return self.memory.download(self.cache[index].ptr, (1, self.length, *self.row_shape), self.kv_dtype)
