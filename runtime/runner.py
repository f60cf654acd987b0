"""The contract every target-decoder runner keeps (``decoder.py``, ``chains.py``, ``backends/device.py``)."""

from __future__ import annotations

import numpy as np

from .rope import position_ids


class DecoderRunner:
    length: int
    capacity: int
    rope_axes = 1   # 3: the graph takes M-RoPE position ids [3, 1, Q] (Qwen2.5-VL; manifest text.rope_axes)
    rope = None     # (table [3, n], delta) of the sequence's prompt, set by its Context's prefill (runtime/rope.py)

    def position_feed(self, positions) -> np.ndarray:
        """The graph's position_ids for sequence positions ``positions``: [1, Q], or [3, 1, Q] for M-RoPE."""
        if self.rope_axes == 1:
            return np.asarray(positions, np.int64)[None]
        table, delta = self.rope if self.rope is not None else (None, 0)
        return position_ids(positions, table, delta)

    tree_native = False  # True: verify calls pass the tree's parents (``run_tree``) instead of a mask
    reads_mask = True    # False: a causal-only graph; causal calls pass no mask
    chains = None        # tree-native runners: the most root-to-leaf chains one verify call holds

    def run(self, embeds: np.ndarray, mask: np.ndarray, positions: np.ndarray, logits: str = "all") -> dict[str, np.ndarray]:
        """``logits="last"``: only the last position's logits are needed (runners may compute only those)."""
        raise NotImplementedError

    def commit(self, rows=None) -> None:
        raise NotImplementedError

    def truncate(self, length: int) -> None:
        raise NotImplementedError
