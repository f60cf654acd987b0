"""Qwen2.5-VL's images (HF Qwen2VLImageProcessor, PIL backend): a pixel budget, merged patches, vision windows."""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from ..errors import InputError
from .base import ImagePreprocessor, ProcessedImage, resize, to_rgb_array


def smart_resize(h: int, w: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """transformers' Qwen2-VL ``smart_resize``: both sides multiples of ``factor`` (rounded), the area brought
    inside [min_pixels, max_pixels] with the aspect kept."""
    if max(h, w) / min(h, w) > 200:
        raise InputError(f"image of {w}x{h} px: expected an aspect ratio of at most 200:1")
    hb, wb = round(h / factor) * factor, round(w / factor) * factor
    if hb * wb > max_pixels:
        beta = math.sqrt((h * w) / max_pixels)
        hb = max(factor, math.floor(h / beta / factor) * factor)
        wb = max(factor, math.floor(w / beta / factor) * factor)
    elif hb * wb < min_pixels:
        beta = math.sqrt(min_pixels / (h * w))
        hb = math.ceil(h * beta / factor) * factor
        wb = math.ceil(w * beta / factor) * factor
    return hb, wb


def vision_windows(gh: int, gw: int, merge: int, window: int) -> tuple[np.ndarray, np.ndarray]:
    """transformers' ``get_vision_window_index`` for one image of gh x gw patches: (window_index over the merged
    tokens, cumulative window lengths in patches); ``window`` is the window side in merged tokens."""
    lh, lw = gh // merge, gw // merge
    index = np.arange(lh * lw).reshape(lh, lw)
    ph, pw = window - lh % window, window - lw % window
    nh, nw = (lh + ph) // window, (lw + pw) // window
    padded = np.full((lh + ph, lw + pw), -100)
    padded[:lh, :lw] = index
    padded = padded.reshape(nh, window, nw, window).transpose(0, 2, 1, 3).reshape(nh * nw, window * window)
    lengths = (padded != -100).sum(1)
    flat = padded.reshape(-1)
    cu = np.concatenate([[0], np.cumsum(lengths) * merge * merge])
    return flat[flat != -100], cu[np.concatenate([[True], np.diff(cu) != 0])]


class Qwen2VLPreprocessor(ImagePreprocessor):
    """Qwen2.5-VL's images (HF Qwen2VLImageProcessor, PIL backend): ``smart_resize`` to multiples of patch x merge
    within a pixel budget, rescale, normalise, then patches flattened in merge-block order (each patch repeated
    over the temporal patch), one vision call per image. The prompt's ``<|image_pad|>`` becomes one token per
    merged patch; the vision graph also gets each patch's (row, col), the window order its windowed layers use,
    each patch's window and the inverse order (``feeds``); ``token_grid`` gives the M-RoPE positions their rows and columns."""

    def __init__(self, cfg: dict):
        super().__init__(cfg)
        self.patch, self.merge = int(cfg["patch_size"]), int(cfg["merge_size"])

    def options(self, image_splitting: bool | None = None, longest_edge: int | None = None) -> dict:
        if image_splitting:
            raise InputError("image_splitting: this model reads each image whole at its own size (no splitting)")
        if longest_edge is not None:
            raise InputError("longest_edge: this model sizes images by a pixel budget (min/max pixels), not an edge; "
                             "expected None")
        return dict(self.cfg)

    def frames(self, arr: np.ndarray, resample: int, c: dict | None = None) -> tuple[list[np.ndarray], int, int]:
        c = c or self.cfg
        if c["do_resize"]:
            h, w = smart_resize(*arr.shape[:2], self.patch * self.merge, int(c["min_pixels"]), int(c["max_pixels"]))
            arr = resize(arr, h, w, resample)
        return [arr], arr.shape[0] // self.patch, arr.shape[1] // self.patch

    def image(self, im: Image.Image, image_splitting: bool | None = None, longest_edge: int | None = None) -> ProcessedImage:
        c = self.options(image_splitting, longest_edge)
        arr = to_rgb_array(im) if c["do_convert_rgb"] else np.array(im)
        frames, gh, gw = self.frames(arr, int(c["resample"]), c)
        x = self.normalize(frames[0])                                   # [C, H, W]
        p, m, t = self.patch, self.merge, int(c["temporal_patch_size"])
        ch = x.shape[0]
        patches = x.reshape(ch, gh // m, m, p, gw // m, m, p).transpose(1, 4, 2, 5, 0, 3, 6)
        patches = np.broadcast_to(patches[:, :, :, :, :, None], (*patches.shape[:5], t, p, p))
        tiles = np.ascontiguousarray(patches.reshape(gh * gw, ch * t * p * p), dtype=np.float32)
        return ProcessedImage(tiles, gh, gw, feeds=self.vision_feeds(gh, gw))

    def vision_feeds(self, gh: int, gw: int) -> dict:
        m = self.merge
        rows, cols = np.meshgrid(np.arange(gh), np.arange(gw), indexing="ij")
        block = (gh // m, m, gw // m, m)
        positions = np.stack([rows.reshape(block).transpose(0, 2, 1, 3).reshape(-1),
                              cols.reshape(block).transpose(0, 2, 1, 3).reshape(-1)], axis=-1)
        order, cu = vision_windows(gh, gw, m, int(self.cfg["window_tokens"]))
        window_ids = np.repeat(np.arange(len(cu) - 1), np.diff(cu))  # each patch's window, in window order
        return {"vision_positions": positions.astype(np.int64), "window_index": order.astype(np.int64),
                "window_ids": window_ids.astype(np.int64), "reverse_index": np.argsort(order, kind="stable").astype(np.int64)}

    def token_grid(self, img: ProcessedImage) -> tuple[int, int]:
        return img.rows // self.merge, img.cols // self.merge

    def image_text(self, img: ProcessedImage) -> str:
        rows, cols = self.token_grid(img)
        return self.cfg["image_token"] * (rows * cols)
