"""The runtime-owned KV cache: preallocated once, appended in place, rolled back by length."""

from __future__ import annotations

import numpy as np


class KVCache:
    """Per layer one key and one value buffer preallocated to ``capacity`` positions.

    ``layout="bshd"`` (bundles of this version): [1, capacity, kv_heads, head_dim], so the past handed to the
    graph is a view of the first ``length`` positions, no copy. ``"bhsd"``: [1, kv_heads, capacity, head_dim]
    (bundles exported before the device path), where the past is copied out."""

    def __init__(self, num_layers: int, kv_heads: int, head_dim: int, capacity: int, layout: str = "bshd"):
        if layout not in ("bshd", "bhsd"):
            raise ValueError(f"KV layout {layout!r}: expected bshd or bhsd")
        self.axis = 1 if layout == "bshd" else 2
        shape = (1, capacity, kv_heads, head_dim) if layout == "bshd" else (1, kv_heads, capacity, head_dim)
        # positions >= length are garbage
        self.keys = [np.zeros(shape, np.float32) for _ in range(num_layers)]
        self.values = [np.zeros(shape, np.float32) for _ in range(num_layers)]
        self.capacity = capacity
        self.length = 0

    def _rows(self, a: np.ndarray, sl) -> np.ndarray:
        return a[:, sl] if self.axis == 1 else a[:, :, sl]

    def past(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
        sl = slice(0, self.length)
        if self.axis == 1:  # a contiguous view
            return self.keys[layer][:, sl], self.values[layer][:, sl]
        return (np.ascontiguousarray(self._rows(self.keys[layer], sl)), np.ascontiguousarray(self._rows(self.values[layer], sl)))

    def append(self, new_keys: list[np.ndarray], new_values: list[np.ndarray], rows=None) -> None:
        """Append this call's entries (Q rows per layer, on the layout's position axis); ``rows`` picks a subset
        of the Q (accepted path)."""
        q = new_keys[0].shape[self.axis] if rows is None else len(rows)
        if self.length + q > self.capacity:
            raise ValueError(f"KV cache full: {self.length} + {q} > capacity {self.capacity}")
        sl = slice(self.length, self.length + q)
        for i, (k, v) in enumerate(zip(new_keys, new_values)):
            if rows is not None:
                k, v = np.take(k, rows, axis=self.axis), np.take(v, rows, axis=self.axis)
            if self.axis == 1:
                self.keys[i][:, sl] = k
                self.values[i][:, sl] = v
            else:
                self.keys[i][:, :, sl] = k
                self.values[i][:, :, sl] = v
        self.length += q

    def truncate(self, length: int) -> None:
        self.length = min(self.length, length)
