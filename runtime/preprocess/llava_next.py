"""LLaVA-NeXT's "anyres" images: a grid of CLIP patches plus a base patch, packed with row ends and unpadding."""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from ..errors import InputError
from .base import ProcessedImage, resize
from .clip import ClipPreprocessor


def select_best_resolution(size: tuple[int, int], resolutions: list) -> tuple[int, int]:
    """transformers' ``select_best_resolution``: the (height, width) that keeps the most of the image at the least
    waste."""
    h, w = size
    best, best_eff, best_waste = None, 0, float("inf")
    for rh, rw in resolutions:
        scale = min(rw / w, rh / h)
        dw, dh = int(w * scale), int(h * scale)
        eff = min(dw * dh, w * h)
        waste = rw * rh - eff
        if eff > best_eff or (eff == best_eff and waste < best_waste):
            best, best_eff, best_waste = (int(rh), int(rw)), eff, waste
    return best


def _patch_output_size(h: int, w: int, th: int, tw: int) -> tuple[int, int]:
    """transformers' ``get_patch_output_size``: the aspect-kept size that fits (th, tw)."""
    sw, sh = tw / w, th / h
    if sw < sh:
        return min(math.ceil(h * sw), th), tw
    return th, min(math.ceil(w * sh), tw)


class LlavaNextPreprocessor(ClipPreprocessor):
    """LLaVA-NeXT's "anyres" images: the grid pinpoint that fits the image best, the image resized into it (aspect
    kept) and zero-padded to it, cut into crop-size patches (row-major) after a square resize of the whole image
    (the base patch); each patch then goes through CLIP's resize/crop/normalise. ``pack`` reproduces the model's
    ``pack_image_features``: the base patch's tokens, then the patch grid's tokens with the padding removed and the
    learned ``image_newline`` embedding closing every row."""

    def __init__(self, cfg: dict, arrays: dict | None = None):
        super().__init__(cfg)
        self.pinpoints = [tuple(p) for p in cfg["image_grid_pinpoints"]]
        self.newline = (arrays or {}).get("image_newline")
        if self.newline is None:
            raise InputError("manifest preprocessing.kind llava_next needs the image_newline array; re-export the bundle")

    def image(self, im: Image.Image, image_splitting: bool | None = None, longest_edge: int | None = None) -> ProcessedImage:
        processed = super().image(im, image_splitting, longest_edge)
        processed.size = (int(im.height), int(im.width))  # the packing unpads to the image's own aspect
        return processed

    def frames(self, arr: np.ndarray, resample: int, c: dict | None = None) -> tuple[list[np.ndarray], int, int]:
        c = c or self.cfg
        h, w = arr.shape[:2]
        bh, bw = select_best_resolution((h, w), self.pinpoints)
        nh, nw = _patch_output_size(h, w, bh, bw)
        resized = resize(arr, nh, nw, resample)
        py, ry = divmod(bh - nh, 2)
        px, rx = divmod(bw - nw, 2)
        padded = np.zeros((bh, bw, *arr.shape[2:]), arr.dtype)
        padded[py:py + nh, px:px + nw] = resized
        side = self.tile
        base_side = int(c["shortest_edge"] or c["resize_height"])
        patches = [resize(arr, base_side, base_side, resample)]
        patches += [padded[i:i + side, j:j + side] for i in range(0, bh, side) for j in range(0, bw, side)]
        frames = []
        for patch in patches:
            frames += super().frames(patch, resample, c)[0]
        return frames, bh // side, bw // side

    def _grid(self, img: ProcessedImage) -> tuple[int, int, int, int, int]:
        """(rows, cols of patch tokens before unpadding, top/bottom cut, left/right cut, tokens per patch side)."""
        n = int(round(math.sqrt(int(self.cfg["patch_tokens"]))))
        rows, cols = img.rows * n, img.cols * n
        oh, ow = img.size
        if ow / oh > cols / rows:
            new_h = int(round(oh * (cols / ow), 7))
            pad = (rows - new_h) // 2
            return rows, cols, pad, 0, n
        new_w = int(round(ow * (rows / oh), 7))
        pad = (cols - new_w) // 2
        return rows, cols, 0, pad, n

    def count(self, img: ProcessedImage) -> int:
        rows, cols, pad_r, pad_c, n = self._grid(img)
        r, c = rows - 2 * pad_r, cols - 2 * pad_c
        return n * n + r * c + r  # base patch, unpadded grid, one newline per row

    def image_text(self, img: ProcessedImage) -> str:
        return self.cfg["image_token"] * self.count(img)

    def pack(self, embeds: np.ndarray, img: ProcessedImage) -> np.ndarray:
        """[patches, n*n, H] tile outputs -> [count, H] image-token embeddings, as the model packs them."""
        rows, cols, pad_r, pad_c, n = self._grid(img)
        base, grid = embeds[0], embeds[1:]
        H = embeds.shape[-1]
        grid = grid.reshape(img.rows, img.cols, n, n, H).transpose(0, 2, 1, 3, 4).reshape(rows, cols, H)
        grid = grid[pad_r:rows - pad_r, pad_c:cols - pad_c]
        newline = np.broadcast_to(np.asarray(self.newline, grid.dtype), (grid.shape[0], 1, H))
        grid = np.concatenate([grid, newline], axis=1).reshape(-1, H)
        return np.concatenate([base, grid], axis=0)
