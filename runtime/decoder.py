"""Running the target decoder over a runtime-owned KV cache.

Runners, one contract (``runner.DecoderRunner``): ``run`` computes Q new positions (their K/V are held, not yet part of the
context), ``commit`` keeps all of them or an ordered subset (an accepted draft path), ``truncate``
rolls back by length.
- PlainDecoder: the standard-op graph (what TensorRT gets); K/V come back as outputs and are copied
  into a preallocated cache.
- FusedOrtDecoder: the ORT-CPU graph with GroupQueryAttention; one preallocated buffer per layer is
  bound through IOBinding as both past and present, so ORT writes new rows in place and a step copies
  nothing. Accepting a subset moves the accepted rows down (they were rotated at their final positions).
- ChainDecoder (``chains.py``): the written ORT-CPU graph, verifying a tree as root-to-leaf chains.
"""

from __future__ import annotations

import numpy as np

from .chains import ChainDecoder, chains_of
from .errors import BundleError
from .kv import KVCache
from .runner import DecoderRunner
from .tree import causal_mask


class PlainDecoder(DecoderRunner):
    """``row_consistent`` (ONNX Runtime on a CPU): every position is computed with the same arithmetic in a plain
    step and in a tree verify, so greedy speculative decoding equals plain decoding bit for bit at any precision
    (an INT8 graph included, where a 1-ulp difference flips an activation's rounding and grows). Two rules make
    it so, both measured on ONNX Runtime's CPU kernels (tests/test_generation.py, tests/test_calibration.py):
    - MLAS's float GEMM takes its own kernel for a 1-row product and computes each row of a 2-or-more-row
      product independently of the others, so a 1-row call is padded to 2 rows (the pad row repeats the row;
      its outputs are dropped);
    - softmax and the attention-weighted sum give a row the same bits when its unmasked columns (context, then
      its ancestors) are the same and contiguous, whatever masked columns follow, but not when masked columns
      sit between them: so a branched tree is verified one root-to-leaf chain per call.
    Elsewhere (GPU backends) a tree is verified in one call: GPU kernels promise no such row independence."""

    def __init__(self, backend, graph: dict, text: dict, capacity: int, row_consistent: bool = False):
        self.backend = backend
        self.names = graph["kv"]
        self.cache = KVCache(text["num_layers"], text["kv_heads"], text["head_dim"], capacity, self.names.get("layout", "bhsd"))
        self.capacity = capacity
        self.tree_native = row_consistent
        self.mask_min = float(graph.get("mask_min", -1e4))
        self._pending = None

    @property
    def length(self) -> int:
        return self.cache.length

    def run(self, embeds, mask, positions, logits="all"):
        q = embeds.shape[1]
        if mask is None:  # a causal run: one chain of a tree
            mask = causal_mask(q, self.length, self.mask_min)
        if self.tree_native and q == 1:  # padded to 2 rows: see the class docstring
            # the pad row repeats the row, its position and what it sees (not the pad column), so it attends
            # exactly as the row does and the mean attention each position receives is the row's
            embeds = np.concatenate([embeds, embeds], axis=1)
            row = np.concatenate([mask[:, :, :1], np.full(mask.shape[:2] + (1, 1), self.mask_min, mask.dtype)], -1)
            mask = np.concatenate([row, row], axis=2)
            positions = np.repeat(np.asarray(positions), 2, axis=-1)
        feeds = {"inputs_embeds": embeds, "attention_mask": mask, "position_ids": self.position_feed(positions)}
        for i, (kn, vn) in enumerate(zip(self.names["past_key"], self.names["past_value"])):
            feeds[kn], feeds[vn] = self.cache.past(i)
        out = self.backend.run("decoder", feeds)
        self._pending = ("call", [out[n] for n in self.names["present_key"]], [out[n] for n in self.names["present_value"]], q)
        if embeds.shape[1] != q:
            out = {name: self._first_rows(name, a, q) for name, a in out.items()}
        return out

    def _first_rows(self, name: str, a: np.ndarray, q: int) -> np.ndarray:
        """Output ``name`` of a padded call without the pad row."""
        if name in self.names["present_key"] or name in self.names["present_value"]:
            return np.take(a, np.arange(q), axis=self.cache.keys[0].axis)
        if name == "attention_received":  # [1, P + Q]: the pad's column (it received nothing) goes
            return a[:, : self.length + q]
        return a[:, :q]  # logits, hidden states: [1, Q, ...]

    def run_tree(self, embeds: np.ndarray, parents: np.ndarray) -> dict:
        """A verify over the tree's N nodes (parents before children), one causal call per root-to-leaf chain over
        the committed context; each node's outputs come from the first chain that holds it."""
        rows, _, depth = chains_of(parents)
        n, p = embeds.shape[1], self.length
        logits = hidden = None
        done = np.zeros(n, bool)
        chain_of = np.zeros(n, np.int64)
        pending = []
        for c, chain in enumerate(rows):
            nodes = chain[: int(depth[chain[-1]]) + 1]  # a chain shorter than the widest repeats its leaf
            out = self.run(embeds[:, nodes], None, p + np.arange(len(nodes)))
            pending.append(self._pending[1:3])
            if logits is None:
                logits = np.empty((1, n, out["logits"].shape[-1]), np.float32)
                hidden = np.empty((1, n, out["hidden_states"].shape[-1]), np.float32)
            new = ~done[nodes]
            logits[0, nodes[new]] = out["logits"][0, new]
            hidden[0, nodes[new]] = out["hidden_states"][0, new]
            chain_of[nodes[new]] = c
            done[nodes] = True
        self._pending = ("tree", pending, chain_of)
        return {"logits": logits, "hidden_states": hidden}

    def commit(self, rows=None):
        kind, *pending = self._pending
        if kind == "tree":  # the accepted path: the rows of the chain that holds its last node
            by_chain, chain_of = pending
            keys, values = by_chain[int(chain_of[int(rows[-1])])]
            rows = np.arange(len(rows))
        else:
            keys, values, q = pending
            if rows is None:
                rows = np.arange(q)
        self.cache.append(keys, values, rows)
        self._pending = None

    def truncate(self, length):
        self.cache.truncate(length)


class FusedOrtDecoder(DecoderRunner):
    GRAPH = "decoder_ort_cpu"

    def __init__(self, backend, graph: dict, text: dict, capacity: int):
        import onnxruntime as ort  # at first use: importing the runtime loads no heavy library

        self.names = graph["kv"]
        self.session = backend.session(self.GRAPH)
        shape = (1, text["kv_heads"], capacity, text["head_dim"])
        # keys[i] / values[i]: [1, kv_heads, capacity, head_dim]; rows >= length are scratch
        self.keys = [np.zeros(shape, np.float32) for _ in range(text["num_layers"])]
        self.values = [np.zeros(shape, np.float32) for _ in range(text["num_layers"])]
        self.capacity = capacity
        self.length = 0
        self._pending_q = 0
        self.io = self.session.io_binding()
        self._outputs = [t["name"] for t in graph["outputs"] if not t["name"].startswith("present_")]
        self._kv_values = []
        for i in range(text["num_layers"]):
            k = ort.OrtValue.ortvalue_from_numpy(self.keys[i])
            v = ort.OrtValue.ortvalue_from_numpy(self.values[i])
            self.io.bind_ortvalue_input(self.names["past_key"][i], k)
            self.io.bind_ortvalue_input(self.names["past_value"][i], v)
            self._kv_values.append((k, v))
            # the K/V buffers are outputs too: ORT writes the new rows in place
            self.io.bind_ortvalue_output(self.names["present_key"][i], k)
            self.io.bind_ortvalue_output(self.names["present_value"][i], v)

    def _bind_outputs(self) -> None:
        """Logits, hidden states, attention received: freshly allocated each call (their shapes change);
        binding a name again replaces its previous binding and leaves the K/V bindings alone."""
        for name in self._outputs:
            self.io.bind_output(name)

    def run(self, embeds, mask, positions, logits="all"):
        q = embeds.shape[1]
        if self.length + q > self.capacity:
            raise ValueError(f"KV buffer full: {self.length} + {q} > capacity {self.capacity}")
        if mask.shape[-1] != self.length + q:
            raise ValueError(f"mask width {mask.shape[-1]} != context {self.length} + {q}")
        self.io.bind_cpu_input("inputs_embeds", np.ascontiguousarray(embeds, dtype=np.float32))
        self.io.bind_cpu_input("attention_mask", np.ascontiguousarray(mask, dtype=np.float32))
        self.io.bind_cpu_input("position_ids", np.ascontiguousarray(self.position_feed(positions)))
        self._bind_outputs()
        self.session.run_with_iobinding(self.io)
        outs = self.io.get_outputs()
        # bound outputs come back in binding order: the K/V buffers first, then logits, hidden_states
        tail = outs[len(outs) - len(self._outputs):]
        self._pending_q = q
        return {name: o.numpy() for name, o in zip(self._outputs, tail)}

    def commit(self, rows=None):
        p = self.length
        if rows is None:
            self.length += self._pending_q
        else:
            rows = np.asarray(rows)
            if not np.array_equal(rows, np.arange(len(rows))):  # the accepted rows move down in one gather each
                src = p + rows
                for buf in self.keys + self.values:
                    buf[:, :, p:p + len(rows)] = buf[:, :, src]
            self.length += len(rows)
        self._pending_q = 0

    def truncate(self, length):
        self.length = min(self.length, length)


def make_decoder(backend, bundle, capacity: int, fused: bool | str | None = None) -> DecoderRunner:
    """``fused``: None picks the fused ORT-CPU decoder where it applies; ``"device"`` keeps K/V resident in the
    backend's memory (``backends/device.py``; what GPU backends use, also runnable on the CPU)."""
    dec = _make_decoder(backend, bundle, capacity, fused)
    dec.rope_axes = int(bundle.manifest["text"].get("rope_axes", 1))
    return dec


def written_cpu_graphs(bundle) -> dict[int, str]:
    """{most chains per call: graph name} of the bundle's written ORT-CPU decoders (``runtime/chains.py``)."""
    return {int(g["kv"]["chains"]): name for name, g in bundle.manifest["graphs"].items()
            if g.get("kv_layout") == "chain_buffers"}


def _make_decoder(backend, bundle, capacity: int, fused) -> DecoderRunner:
    graphs = bundle.manifest["graphs"]
    text = bundle.manifest["text"]
    if fused == "device" or (fused is not True and getattr(backend, "device_kv", False)):
        return backend.device_decoder(capacity)
    written = written_cpu_graphs(bundle)
    if written and backend.ort_cpu and fused is not False:
        tables = bundle.manifest["rope_tables"]
        return ChainDecoder({c: backend.session(name) for c, name in written.items()}, graphs[written[max(written)]], text, capacity,
                            np.asarray(bundle.array(tables["cos"])), np.asarray(bundle.array(tables["sin"])))
    if "decoder" not in graphs:
        raise BundleError(f"{bundle.path}: a CPU-only bundle (no decoder graph for other backends); its written ORT-CPU "
                          f"decoder runs only on ONNX Runtime's CPU provider (--backend ort-cpu), not on {backend.name}")
    can_fuse = FusedOrtDecoder.GRAPH in graphs and backend.ort_cpu
    if fused is None:
        fused = can_fuse
    if fused and not can_fuse:
        raise BundleError("the fused ORT-CPU decoder was asked for, but the bundle has no decoder_ort_cpu graph "
                          "or the backend is not ONNX Runtime on the CPU")
    if fused:
        return FusedOrtDecoder(backend, graphs[FusedOrtDecoder.GRAPH], text, capacity)
    return PlainDecoder(backend, graphs["decoder"], text, capacity, row_consistent=bool(backend.ort_cpu))
