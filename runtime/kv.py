"""Runtime-owned caches on the host: preallocated once, appended in place, rolled back by length.

``AppendBuffer`` is the one such buffer: the target's K/V (``KVCache``, one per layer for keys and one for values)
and the drafter's caches and their positions (``drafter.DrafterState``) are all made of it. Buffers bound to a
session as both past and present (``decoder.FusedOrtDecoder``, ``chains.ChainDecoder``) and device memory
(``backends/device.py``) keep their own layouts: ONNX Runtime or a device copy writes their rows, not ``append``.
"""

from __future__ import annotations

import numpy as np


class AppendBuffer:
    """An array preallocated along ``axis`` (the positions), appended along it and rolled back by ``length``; rows
    from ``length`` on are garbage. ``grow=True`` doubles a full buffer (the drafter's caches, whose length the
    tree search decides); otherwise an append past the capacity raises (the target's K/V, sized to the context)."""

    def __init__(self, shape: tuple, axis: int, dtype=np.float32, grow: bool = False):
        self.data = np.zeros(shape, dtype)
        self.axis = axis
        self.grow = grow
        self.length = 0

    @property
    def capacity(self) -> int:
        return self.data.shape[self.axis]

    def _rows(self, stop: int, start: int = 0) -> tuple:
        return (slice(None),) * self.axis + (slice(start, stop),)

    def view(self) -> np.ndarray:
        """The first ``length`` rows, contiguous: a view when they already are (position axis leading after size-1
        axes), else a copy."""
        return np.ascontiguousarray(self.data[self._rows(self.length)])

    def append(self, new: np.ndarray, index=None) -> None:
        """Append ``new``'s rows along the axis; ``index`` keeps only those rows of it, in that order."""
        if index is not None:
            new = np.take(new, index, axis=self.axis)
        n = new.shape[self.axis]
        if self.length + n > self.capacity:
            if not self.grow:
                raise ValueError(f"buffer full: {self.length} + {n} > capacity {self.capacity}")
            shape = list(self.data.shape)
            shape[self.axis] = max(2 * self.capacity, self.length + n)
            grown = np.zeros(shape, self.data.dtype)
            grown[self._rows(self.length)] = self.data[self._rows(self.length)]
            self.data = grown
        self.data[self._rows(self.length + n, self.length)] = new
        self.length += n


class KVCache:
    """Per layer one key and one value ``AppendBuffer`` preallocated to ``capacity`` positions.

    ``layout="bshd"`` (bundles of this version): [1, capacity, kv_heads, head_dim], so the past handed to the
    graph is a view of the first ``length`` positions, no copy. ``"bhsd"``: [1, kv_heads, capacity, head_dim]
    (bundles exported before the device path), where the past is copied out."""

    def __init__(self, num_layers: int, kv_heads: int, head_dim: int, capacity: int, layout: str = "bshd"):
        if layout not in ("bshd", "bhsd"):
            raise ValueError(f"KV layout {layout!r}: expected bshd or bhsd")
        axis = 1 if layout == "bshd" else 2
        shape = (1, capacity, kv_heads, head_dim) if layout == "bshd" else (1, kv_heads, capacity, head_dim)
        self.keys = [AppendBuffer(shape, axis) for _ in range(num_layers)]
        self.values = [AppendBuffer(shape, axis) for _ in range(num_layers)]
        self.capacity = capacity

    @property
    def length(self) -> int:
        return self.keys[0].length if self.keys else 0

    def past(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
        return self.keys[layer].view(), self.values[layer].view()

    def append(self, new_keys: list[np.ndarray], new_values: list[np.ndarray], rows=None) -> None:
        """Append this call's entries (Q rows per layer, on the layout's position axis); ``rows`` picks a subset
        of the Q (accepted path)."""
        q = new_keys[0].shape[self.keys[0].axis] if rows is None else len(rows)
        if self.length + q > self.capacity:
            raise ValueError(f"KV cache full: {self.length} + {q} > capacity {self.capacity}")
        for buf, new in zip(self.keys + self.values, list(new_keys) + list(new_values)):
            buf.append(new, rows)

    def truncate(self, length: int) -> None:
        for buf in self.keys + self.values:
            buf.length = min(buf.length, length)
