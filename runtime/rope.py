"""Multimodal rotary positions (Qwen2.5-VL's M-RoPE): three position axes (time, height, width) per token.

Text tokens have the same position on all three axes and count up by one. An image's tokens (its merged patch
grid, ``rows`` x ``cols``) all start at the position where the image begins: time stays there, height adds the
token's row, width its column; the text after the image continues at start + max(rows, cols). Past the prompt,
every position (generated tokens, draft-tree nodes at context + depth) is its sequence index plus the prompt's
``delta`` on all three axes, as transformers' ``get_rope_index`` and its ``rope_deltas`` compute them.
"""

from __future__ import annotations

import numpy as np

from .errors import InputError


def mrope_table(ids: np.ndarray, image_token_id: int, grids: list[tuple[int, int]] | None) -> tuple[np.ndarray, int]:
    """(positions [3, len(ids)] int64, delta): ``grids`` are the (rows, cols) token grids of the prompt's images,
    in order; each run of image tokens is one image."""
    ids = np.asarray(ids)
    is_image = ids == image_token_id
    out = np.zeros((3, len(ids)), np.int64)
    grids = list(grids or [])
    pos, i, k = 0, 0, 0
    n = len(ids)
    while i < n:
        j = i
        while j < n and is_image[j] == is_image[i]:
            j += 1
        if not is_image[i]:
            out[:, i:j] = pos + np.arange(j - i)
            pos += j - i
        else:
            if k >= len(grids):
                raise InputError(f"image token run {k + 1} in the prompt has no image grid (M-RoPE positions need each "
                                 f"image's rows and columns; give the images, not only their embeddings)")
            rows, cols = grids[k]
            if rows * cols != j - i:
                raise InputError(f"image {k + 1}: {j - i} image tokens in the prompt, its grid is {rows} x {cols}")
            r, c = np.divmod(np.arange(j - i), cols)
            out[0, i:j] = pos
            out[1, i:j] = pos + r
            out[2, i:j] = pos + c
            pos += max(rows, cols)
            k += 1
        i = j
    delta = int(out.max()) + 1 - n if n else 0
    return out, delta


def position_ids(positions: np.ndarray, table: np.ndarray | None, delta: int) -> np.ndarray:
    """[3, 1, Q] for sequence positions ``positions``: the prompt's table where it has them, index + delta past it."""
    positions = np.asarray(positions, np.int64)
    out = np.repeat((positions + delta)[None], 3, axis=0)
    if table is not None:
        inside = positions < table.shape[1]
        out[:, inside] = table[:, positions[inside]]
    return out[:, None, :]
