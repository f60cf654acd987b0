"""Device-resident decoding: the target's K/V stay in (device) memory between calls, so no call copies the past
between host and device: only logits / hidden rows / attention scores come back.

Three small pieces, each replaceable:
- a **memory** (``memory.py``: ``CudaMemory`` on a GPU, ``HostMemory`` on the CPU, so this decoder runs in CI);
- an **executor** that runs one graph over named pointers (``OrtPointerExecutor``: ONNX Runtime's IOBinding on
  the CPU or CUDA; the TensorRT backend's ``trt.TrtEngine``: TensorRT's ``set_tensor_address`` +
  ``execute_async_v3``), with CUDA graphs of repeated calls (``GraphRunner``);
- ``DeviceDecoder``: the runtime's decoder contract (run / commit / truncate) over them, its buffers reused across
  requests (``DecoderPool``).

The K/V layout is ``[1, positions, kv_heads, head_dim]`` (the decoder graph's ``kv.layout == "bshd"``), so the
first L positions of a buffer preallocated to the capacity are one contiguous block: a call binds the buffer's
base address with shape ``[1, L, kvh, hd]`` as its past (nothing is copied), the graph writes the new rows into an
aligned scratch buffer (TensorRT wants 256-byte aligned tensor addresses, which row L of the cache is not in
general), and ``commit`` copies the kept rows into place, device to device (``engine_plan.kv_row_copies``: an
accepted draft path is compacted there, never via the host). Only logits, hidden states and attention scores
come back to the host (``engine_plan.Plan.logits_rows``).
"""

from __future__ import annotations

import sys
import weakref
from collections import OrderedDict

import numpy as np

from ..errors import BundleError
from ..runner import DecoderRunner
from .engine_plan import kv_row_copies
from .memory import Buffer, ScratchBuffer


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


class GraphRunner:
    """Runs one engine's calls and keeps CUDA graphs of those a caller marks as repeatable (``graph_key``).

    A graph replays the very addresses and shapes it was captured with, so it is keyed on all of them: the
    profile and every bound tensor's (name, address, shape). A call whose buffers live elsewhere (another
    decoder, a buffer freed and allocated again) gets a graph of its own, never another call's. At most
    ``limit`` graphs are kept, the least recently used destroyed first. A failed capture turns graphs off for this
    engine, said once, and the call runs as usual.

    Subclasses give the four primitives: ``run`` (execute now), ``capture`` (execute once as a graph, return a
    handle), ``launch`` (replay a handle) and ``destroy`` (release it)."""

    def __init__(self, enabled: bool = True, limit: int = 64, log=None):
        self.enabled, self.limit = enabled, int(limit)
        self.graphs: OrderedDict = OrderedDict()
        self.captures = self.replays = 0
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))

    @staticmethod
    def key(profile: str, inputs: dict, outputs: dict) -> tuple:
        bound = tuple(sorted((name, int(ptr), tuple(int(d) for d in shape))
                             for name, (ptr, shape, _) in {**inputs, **outputs}.items()))
        return (profile, bound)

    def execute(self, profile: str, inputs: dict, outputs: dict, graph_key=None) -> None:
        """``graph_key`` not None: the caller keeps these buffers for later calls of these shapes, so the call may
        be captured and replayed."""
        if graph_key is None or not self.enabled:
            self.run(profile, inputs, outputs)
            return
        key = self.key(profile, inputs, outputs)
        handle = self.graphs.get(key)
        if handle is not None:
            self.graphs.move_to_end(key)
            self.launch(handle)
            self.replays += 1
            return
        try:
            handle = self.capture(profile, inputs, outputs)
        except Exception as exc:  # noqa: BLE001 - an unsupported capture must not stop decoding
            self.enabled = False
            self.clear()
            self.log(f"dream-export: CUDA graphs off for this engine ({type(exc).__name__}: {exc}); running without")
            self.run(profile, inputs, outputs)
            return
        self.captures += 1
        self.graphs[key] = handle
        while len(self.graphs) > self.limit:
            _, old = self.graphs.popitem(last=False)
            self.destroy(old)

    def clear(self) -> None:
        while self.graphs:
            _, handle = self.graphs.popitem(last=False)
            self.destroy(handle)

    def run(self, profile, inputs, outputs):  # pragma: no cover - interface
        raise NotImplementedError

    def capture(self, profile, inputs, outputs):  # pragma: no cover - interface
        raise NotImplementedError

    def launch(self, handle):  # pragma: no cover - interface
        raise NotImplementedError

    def destroy(self, handle) -> None:
        pass


class HostGraphs(GraphRunner):
    """The host stand-in for CUDA graphs over an ONNX Runtime session: a "capture" runs the call and records its
    bindings; a "launch" runs the recorded bindings again, whatever the caller bound this time, which is what
    replaying a CUDA graph does. Tests of graph keying and of buffer reuse run on it."""

    def __init__(self, session, memory, enabled: bool = True, limit: int = 64):
        super().__init__(enabled, limit)
        self.executor = OrtPointerExecutor(session, memory)

    def run(self, profile, inputs, outputs):
        self.executor(inputs, outputs)

    def capture(self, profile, inputs, outputs):
        self.executor(inputs, outputs)
        return (dict(inputs), dict(outputs))

    def launch(self, handle):
        self.executor(*handle)

    def __call__(self, inputs, outputs, graph_key=None):
        self.execute("decoder", inputs, outputs, graph_key)


class DecoderBuffers:
    """Every buffer one ``DeviceDecoder`` uses: the K/V cache, the scratch rows, the staging of inputs and
    outputs, and (for CUDA graphs) the fixed-address buffers of steps and verifies. ``free`` returns all of it."""

    def __init__(self, memory, n_past: int, capacity: int, row_bytes: int, fixed_sizes: dict | None, fixed_q: int):
        self.memory, self.capacity, self.row_bytes = memory, int(capacity), int(row_bytes)
        self.cache = [memory.alloc(capacity * row_bytes) for _ in range(n_past)]  # zeroed: padding is finite
        self.scratch = [ScratchBuffer(memory) for _ in range(n_past)]
        self.staging = {n: ScratchBuffer(memory) for n in ("inputs_embeds", "attention_mask", "position_ids",
                                                     "logits", "hidden_states", "attention_received")}
        self.fixed_buffers: list[Buffer] = []
        self.fixed, self.fixed_scratch = {}, []
        if fixed_sizes:
            self.fixed_buffers = [memory.alloc(b) for b in fixed_sizes.values()]
            self.fixed_buffers += [memory.alloc(fixed_q * row_bytes) for _ in range(n_past)]
            self.fixed = {n: b.ptr for n, b in zip(fixed_sizes, self.fixed_buffers)}
            self.fixed_scratch = [b.ptr for b in self.fixed_buffers[len(fixed_sizes):]]

    def free(self) -> None:
        for b in self.cache + self.fixed_buffers:
            self.memory.free(b)
        for g in self.scratch + list(self.staging.values()):
            g.free()
        self.cache, self.fixed_buffers, self.fixed, self.fixed_scratch = [], [], {}, []


class DecoderPool:
    """Decoder buffers reused from one request to the next: a closed (or collected) ``DeviceDecoder`` gives its
    buffers back, the next decoder of the same layout takes them, so a long-running process holds one set per
    decoder alive at once (not one per request ever made), and CUDA graphs keyed on those addresses replay
    across requests. ``close`` frees everything, in use or not."""

    def __init__(self):
        self.idle: dict[tuple, list[DecoderBuffers]] = {}
        self.in_use: set[int] = set()
        self._all: list[DecoderBuffers] = []

    def take(self, layout: tuple, make) -> DecoderBuffers:
        free = self.idle.get(layout)
        bufs = free.pop() if free else None
        if bufs is None:
            bufs = make()
            self._all.append(bufs)
        self.in_use.add(id(bufs))
        return bufs

    def give_back(self, layout: tuple, bufs: DecoderBuffers) -> None:
        if id(bufs) in self.in_use:
            self.in_use.discard(id(bufs))
            self.idle.setdefault(layout, []).append(bufs)

    def close(self) -> None:
        for bufs in self._all:
            bufs.free()
        self._all, self.idle, self.in_use = [], {}, set()


def _release(pool, layout, bufs) -> None:
    """What a decoder's close (or its collection) does: buffers back to the pool, or freed."""
    if pool is not None:
        pool.give_back(layout, bufs)
    else:
        bufs.free()


class DeviceDecoder(DecoderRunner):
    """The target decoder with its K/V resident in ``memory`` (see the module docstring).

    ``execute(inputs, outputs, graph_key)`` runs the ``decoder`` graph over pointers. ``logits_rows(q)`` says how
    many trailing logits rows a call of q positions copies back (a tree verify needs all; a prompt prefill only
    its last row).

    ``bucket`` (for CUDA graphs): calls of at most ``fixed_q`` positions (steps, tree verifies) bind the past
    padded up to a multiple of ``bucket`` positions (at most ``max_past``) with the padding masked out, and use
    buffers allocated once, so every such call of one (q, padded past) has the same shapes and addresses: its
    ``graph_key`` lets the executor capture it once and replay it. Masked rows get weight exactly 0 (an additive
    -1e4 underflows exp in FP32); only the order of the softmax sums changes.

    Lifetime: ``close()`` (or leaving a ``with`` block, or the decoder being collected) frees its buffers, or
    gives them back to ``pool`` for the next decoder. A closed decoder refuses to run."""

    def __init__(self, execute, memory, graph: dict, text: dict, capacity: int, logits_rows,
                 bucket: int | None = None, fixed_q: int = 0, max_past: int | None = None, pool: DecoderPool | None = None):
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
        self.bucket = int(bucket) if bucket else None
        self.fixed_q = int(fixed_q) if self.bucket else 0
        self.max_past = min(int(max_past if max_past is not None else capacity - 1), capacity - self.fixed_q)
        sizes = None
        if self.fixed_q:  # allocated once at their largest: fixed addresses for captured graphs
            widest = self.max_past + self.fixed_q
            f32 = 4
            sizes = {"inputs_embeds": self.fixed_q * self.hidden * f32, "attention_mask": self.fixed_q * widest * f32,
                     "position_ids": 3 * self.fixed_q * 8, "logits": self.fixed_q * self.vocab * f32,
                     "hidden_states": self.fixed_q * self.hidden * f32, "attention_received": widest * f32}
        layout = (len(self.past_names), int(capacity), self.row_bytes, tuple(sorted((sizes or {}).items())), self.fixed_q)

        def make():
            return DecoderBuffers(memory, len(self.past_names), capacity, self.row_bytes, sizes, self.fixed_q)

        self.buffers = pool.take(layout, make) if pool is not None else make()
        self.cache, self.scratch, self.staging = self.buffers.cache, self.buffers.scratch, self.buffers.staging
        self.fixed, self.fixed_scratch = self.buffers.fixed, self.buffers.fixed_scratch
        # the buffers' release must not hold the decoder itself, or collection would never happen
        self._release = weakref.finalize(self, _release, pool, layout, self.buffers)
        self.length = 0
        self._pending_q = 0
        self._scratch_used: list[int] = []

    @property
    def closed(self) -> bool:
        return not self._release.alive

    def close(self) -> None:
        """Free this decoder's buffers (or give them back to its pool). Idempotent."""
        self._release()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def padded_past(self, p: int, q: int) -> int:
        """The past length a call binds: p, or (bucketed calls) p rounded up to the bucket, at most max_past."""
        if not self.fixed_q or q > self.fixed_q or p == 0:
            return p
        return max(p, min(-(-p // self.bucket) * self.bucket, self.max_past))

    def run(self, embeds, mask, positions, logits="all"):
        if self.closed:
            raise RuntimeError("this DeviceDecoder was closed: its device buffers are freed or reused; make a new one")
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
        received, logits_out, hidden = self.memory.download_many([
            (outputs["attention_received"][0], shapes["attention_received"], dt["attention_received"]),
            (lptr + (q - rows) * self.vocab * ldt.itemsize, (1, rows, self.vocab), ldt),
            (outputs["hidden_states"][0], shapes["hidden_states"], dt["hidden_states"])])  # one wait for all three
        out = {
            "logits": logits_out,
            "hidden_states": hidden,
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
