"""The runtime-owned KV cache: preallocated once, appended in place, rolled back by length."""

from __future__ import annotations

import numpy as np


class KVCache:
    def __init__(self, num_layers: int, kv_heads: int, head_dim: int, capacity: int):
        # keys[i], values[i]: [1, kv_heads, capacity, head_dim]; positions >= length are garbage
        shape = (1, kv_heads, capacity, head_dim)
        self.keys = [np.zeros(shape, np.float32) for _ in range(num_layers)]
        self.values = [np.zeros(shape, np.float32) for _ in range(num_layers)]
        self.capacity = capacity
        self.length = 0

    def past(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
        n = self.length
        return (np.ascontiguousarray(self.keys[layer][:, :, :n]), np.ascontiguousarray(self.values[layer][:, :, :n]))

    def append(self, new_keys: list[np.ndarray], new_values: list[np.ndarray], rows=None) -> None:
        """Append this call's entries ([1,kvh,Q,hd] per layer); ``rows`` picks a subset of the Q (accepted path)."""
        q = new_keys[0].shape[2] if rows is None else len(rows)
        if self.length + q > self.capacity:
            raise ValueError(f"KV cache full: {self.length} + {q} > capacity {self.capacity}")
        sl = slice(self.length, self.length + q)
        for i, (k, v) in enumerate(zip(new_keys, new_values)):
            if rows is not None:
                k, v = k[:, :, rows], v[:, :, rows]
            self.keys[i][:, :, sl] = k
            self.values[i][:, :, sl] = v
        self.length += q

    def truncate(self, length: int) -> None:
        self.length = min(self.length, length)
