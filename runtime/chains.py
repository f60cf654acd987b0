"""The ORT-CPU decoder whose attention runs over root-to-leaf chains (``dream_export/export/cpu_decoder.py``).

Why chains: with int8 compute a position must be computed bit-identically in a plain step and in a tree verify,
and attention gives the same bits only when a row's window is the context followed by its own ancestors,
contiguous. So a verify call holds each distinct tree node once for the projections and MLPs, and attention
runs with one chain per batch entry of GroupQueryAttention, each over its own copy of the context's K/V.

Lone rows: on CPUs whose int8 MatMul kernels compute a 1-row call their own way (AVX2 without AVX-512 VNNI, measured),
a call with one token row or one logits row runs it beside a copy of itself (``lone_row_differs``, asked once per
pipeline at load; about +8% per plain step there), so that every product has 2 rows or more, as a verify's do.

Buffers: ``kv [layers, 2, chains, kv_heads, capacity, head_dim]``; slot 0 is the primary copy. A call with C
chains binds slots 0..C-1 of every layer as both past and present, so ORT writes each chain's new rows in place
at [P, P+L) of its slot. Accepting a path keeps the rows of the chain that holds it (they sit at P + depth, no
move) and copies them into slot 0 when that chain was another one; the other slots are brought up to date
lazily, just before a call needs them. Capacity grows by doubling (a copy and a rebind) up to the context.
"""

from __future__ import annotations

import numpy as np

from .runner import DecoderRunner


def chains_of(parents: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A tree (``parents[i] < i``, root 0 with -1) as its root-to-leaf chains: ``chain_rows [C, L]`` (node indices;
    a chain shorter than L repeats its leaf), ``row_slots [N]`` (node n's place c * L + depth in the flattened
    chains, for the first chain that holds it) and ``depth [N]``. L is at least 2 (the graph's minimum)."""
    parents = np.asarray(parents, np.int64)
    n = len(parents)
    depth = np.zeros(n, np.int64)
    has_child = np.zeros(n, bool)
    for i in range(1, n):
        p = parents[i]
        if not 0 <= p < i:
            raise ValueError(f"parents[{i}] = {p}: a parent must come before its child")
        depth[i] = depth[p] + 1
        has_child[p] = True
    leaves = np.flatnonzero(~has_child)
    width = max(int(depth.max()) + 1, 2)
    rows = np.empty((len(leaves), width), np.int64)
    slots = np.full(n, -1, np.int64)
    for c, leaf in enumerate(leaves):
        d = int(depth[leaf])
        u = leaf
        while u >= 0:
            rows[c, depth[u]] = u
            if slots[u] < 0:
                slots[u] = c * width + depth[u]
            u = parents[u]
        rows[c, d + 1:] = leaf
    return rows, slots, depth


class ChainDecoder(DecoderRunner):
    tree_native = True  # verify calls pass the tree (``run_tree``), not a mask
    reads_mask = False  # the graph is causal: its calls take no mask

    def __init__(self, sessions: dict, graph: dict, text: dict, capacity: int, cos: np.ndarray, sin: np.ndarray):
        """``sessions``: {most chains per call: its graph's session} (a call uses the smallest that fits);
        ``graph``: the manifest entry of the graph with the most chains (the others' names are a prefix of its names)."""
        self.sessions = dict(sorted(sessions.items()))
        self.names = graph["kv"]
        self.chains = max(self.sessions)
        self.min_len = int(graph.get("min_chain_len", 2))
        self.layers = int(text["num_layers"])
        self.kvh, self.hd = int(text["kv_heads"]), int(text["head_dim"])
        self.heads = int(graph["num_heads"])
        self.scale = float(graph["scale"])
        self.hidden, self.vocab = int(text["hidden_size"]), int(text["vocab_size"])
        self.capacity = capacity
        self.cos, self.sin = cos, sin
        self.length = 0
        self.track_attention = False  # prefills report the attention each position receives (the drafter's images)
        self.pad_single = False  # a 1-row call runs beside a copy of its row (``lone_row_differs``)
        # kv[layer, key/value, slot, kv_heads, capacity, head_dim]; rows >= a slot's valid length are scratch
        self._kv = np.zeros((self.layers, 2, self.chains, self.kvh, min(capacity, 512), self.hd), np.float32)
        self._scratch = np.zeros((self.layers, 2, 1, self.kvh, 16, self.hd), np.float32)  # unused chain slots
        self._valid = [0] * self.chains    # per slot: committed rows it holds correctly
        self._bindings: dict[int, object] = {}
        self._pending = None               # (chain_rows, row_slots) of the last run, until commit

    # --- buffers ------------------------------------------------------------------------------------
    def _ensure(self, width: int) -> None:
        need = self.length + width
        if need > self.capacity:
            raise ValueError(f"KV buffer full: {self.length} + {width} > capacity {self.capacity}")
        if width > self._scratch.shape[4]:
            self._scratch = np.zeros(self._scratch.shape[:4] + (2 * width,) + self._scratch.shape[5:], np.float32)
            self._bindings.clear()
        cap = self._kv.shape[4]
        if need <= cap:
            return
        while cap < need:
            cap = min(2 * cap, self.capacity)
        grown = np.zeros(self._kv.shape[:4] + (cap,) + self._kv.shape[5:], np.float32)
        grown[..., : self._kv.shape[4], :] = self._kv
        self._kv = grown
        self._bindings.clear()

    def _binding(self, used: int):
        """(session, IOBinding) for a call that uses chain slots 0..used-1: the smallest graph that holds ``used``
        chains; its other chain slots attend over scratch."""
        size = next(c for c in self.sessions if c >= used)
        key = (size, used)
        io = self._bindings.get(key)
        if io is None:
            import onnxruntime as ort  # at first use: importing the runtime loads no heavy library

            io = self.sessions[size].io_binding()
            for i in range(self.layers):
                for c in range(size):
                    for kind, past, present in ((0, "past_key", "present_key"), (1, "past_value", "present_value")):
                        mem = self._kv[i, kind, c:c + 1] if c < used else self._scratch[i, kind]
                        buf = ort.OrtValue.ortvalue_from_numpy(mem)
                        io.bind_ortvalue_input(self.names[past][i][c], buf)
                        io.bind_ortvalue_output(self.names[present][i][c], buf)  # ORT writes new rows in place
            self._bindings[key] = io
        return self.sessions[size], io

    def _sync(self, used: int) -> None:
        """Slots 1..used-1 get the committed rows they miss from slot 0."""
        for c in range(1, used):
            v = self._valid[c]
            if v < self.length:
                self._kv[:, :, c, :, v:self.length] = self._kv[:, :, 0, :, v:self.length]
                self._valid[c] = self.length

    # --- one row alone ------------------------------------------------------------------------------
    def lone_row_differs(self, row: np.ndarray) -> bool:
        """Whether this machine computes a 1-row call differently from the same row beside another: run ``row`` ([H], a
        token embedding) at position 0 alone, then beside a copy of itself, and compare logits and hidden states bit
        for bit. MatMulNBits with int8 compute takes its own kernel for one row on some CPUs (measured: AVX2 without
        AVX-512 VNNI, ~1e-6 apart, which int8 rounding grows to whole logits) and not on others. Leaves the decoder
        empty; sets ``pad_single`` to the answer."""
        if self.length:
            raise ValueError("lone_row_differs runs on an empty decoder")
        x = np.asarray(row, np.float32)[None]
        chain = np.zeros((1, 1), np.int64)
        self.pad_single = False
        alone = self._call(x, chain, np.zeros(1, np.int64), np.zeros(1, np.int64))
        pair = self._call(np.concatenate([x, x]), chain, np.zeros(2, np.int64), np.zeros(2, np.int64))  # the LM head too
        self.pad_single = not (np.array_equal(alone["logits"][:, 0], pair["logits"][:, 0])
                               and np.array_equal(alone["hidden_states"][:, 0], pair["hidden_states"][:, 0]))
        self._pending = None
        return self.pad_single

    # --- calls --------------------------------------------------------------------------------------
    def _call(self, embeds: np.ndarray, rows: np.ndarray, slots: np.ndarray, logit_rows: np.ndarray) -> dict:
        used, width = rows.shape
        if used > self.chains:
            raise ValueError(f"{used} chains in one call; this graph holds at most {self.chains}")
        n, m = embeds.shape[0], len(logit_rows)
        if self.pad_single and 1 in (n, m):  # every MatMul (the LM head's too) on 2 rows or more: a lone row runs beside
            # a copy of itself (``lone_row_differs``), whose outputs are dropped
            out = self._call(embeds if n > 1 else np.concatenate([embeds, embeds]), rows,
                             slots if n > 1 else np.repeat(slots, 2), logit_rows if m > 1 else np.repeat(logit_rows, 2))
            return {"logits": out["logits"][:, :m], "hidden_states": out["hidden_states"][:, :n],
                    "last_query": out["last_query"][:n]}
        self._ensure(max(width, self.min_len))
        self._sync(used)
        session, io = self._binding(used)
        size = next(c for c in self.sessions if c >= used)
        full = np.zeros((size, width), np.int64)
        full[:used] = rows
        seqlens = np.full(size, width - 1, np.int32)   # unused slots: a fresh sequence over scratch
        seqlens[:used] += self.length
        io.bind_cpu_input("inputs_embeds", np.ascontiguousarray(embeds, np.float32))
        io.bind_cpu_input("chain_rows", full)
        io.bind_cpu_input("row_slots", slots)
        io.bind_cpu_input("seqlens_k", seqlens)
        io.bind_cpu_input("total_sequence_length", seqlens + 1)
        io.bind_cpu_input("logits_rows", logit_rows)
        logits = np.empty((len(logit_rows), self.vocab), np.float32)
        hidden = np.empty((n, self.hidden), np.float32)
        query = np.empty((n, self.heads * self.hd), np.float32)
        for name, arr in (("logits", logits), ("hidden_states", hidden), ("last_query", query)):
            io.bind_output(name, "cpu", 0, np.float32, list(arr.shape), arr.ctypes.data)
        session.run_with_iobinding(io)
        return {"logits": logits[None], "hidden_states": hidden[None], "last_query": query}

    def run(self, embeds, mask=None, positions=None, logits: str = "all"):
        """Q causal positions (a prompt chunk or a step); ``mask`` is not read (this graph is causal)."""
        emb = embeds[0]
        q = emb.shape[0]
        rows = np.arange(q, dtype=np.int64)[None]
        out = self._call(emb, rows, np.arange(q, dtype=np.int64),
                         np.array([q - 1], np.int64) if logits == "last" else np.arange(q, dtype=np.int64))
        if self.track_attention and q > 1:
            out["attention_received"] = self._received(out["last_query"], q)[None]
        self._pending = (rows, None)
        return out

    def run_tree(self, embeds: np.ndarray, parents: np.ndarray) -> dict:
        """A verify call over the tree's N nodes (parents before children); positions are context + depth."""
        rows, slots, depth = chains_of(parents)
        emb = embeds[0]
        padded = max(rows.shape[1], self.min_len)
        slots = (slots // rows.shape[1]) * padded + slots % rows.shape[1]  # the graph pads chains to min_len
        out = self._call(emb, rows, slots, np.arange(emb.shape[0], dtype=np.int64))
        self._pending = (rows, slots // padded)
        self._layout = (rows, slots, depth)
        return out

    def last_layout(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The last tree call's ``chains_of`` layout (chain_rows, row_slots in the padded chains, depth)."""
        return self._layout

    def new_rows(self, chain: np.ndarray, depth: np.ndarray) -> dict[str, np.ndarray]:
        """The last call's new K/V of nodes that sit in chain slot ``chain[n]`` at depth ``depth[n]``:
        ``{"key" | "value": [layers, 1, N, kv_heads, head_dim]}`` (validation reads them)."""
        pos = self.length + np.asarray(depth)
        k = self._kv[:, 0, chain, :, pos]     # [N, layers, kvh, hd] (advanced indices first)
        v = self._kv[:, 1, chain, :, pos]
        return {"key": k.transpose(1, 0, 2, 3)[:, None], "value": v.transpose(1, 0, 2, 3)[:, None]}

    def commit(self, rows=None) -> None:
        """Keep the last run's rows (a causal run: all; a tree: the accepted path ``rows``, root first)."""
        p = self.length
        chain_rows, chain_of = self._pending
        self._pending = None
        if rows is None:
            kept, chain = chain_rows.shape[1], 0
        else:
            kept = len(rows)
            chain = int(chain_of[int(rows[-1])])  # the chain holding the path's last node holds the whole path
            if chain:
                self._kv[:, :, 0, :, p:p + kept] = self._kv[:, :, chain, :, p:p + kept]
        self.length = p + kept
        self._valid = [self.length if c in (0, chain) else min(v, p) for c, v in enumerate(self._valid)]

    def truncate(self, length: int) -> None:
        self.length = min(self.length, length)
        self._valid = [min(v, self.length) for v in self._valid]

    def _received(self, query: np.ndarray, q: int) -> np.ndarray:
        """Last layer: mean over heads and the Q new queries of the attention each of the P+Q positions receives
        (the drafter's visual token compression ranks image tokens by it; numpy, prompt chunks only)."""
        p = self.length
        pos = np.arange(p, p + q)
        qh = query.reshape(q, self.heads, self.hd)
        half = self.hd // 2
        c, s = self.cos[pos][:, None], self.sin[pos][:, None]
        x1, x2 = qh[..., :half], qh[..., half:]
        qr = np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)          # [Q, H, hd]
        keys = self._kv[-1, 0, 0, :, : p + q]                                        # [kvh, T, hd]
        g = self.heads // self.kvh
        scores = np.einsum("qkgd,ktd->kgqt", qr.reshape(q, self.kvh, g, self.hd), keys) * self.scale
        scores = np.where(np.arange(p + q)[None, :] <= pos[:, None], scores, -np.inf)
        scores = np.exp(scores - scores.max(-1, keepdims=True))
        probs = scores / scores.sum(-1, keepdims=True)
        return probs.mean(axis=(0, 1, 2)).astype(np.float32)
