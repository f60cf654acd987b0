"""LLaVA-1.5 and Gemma 3: CLIP-style images (HF CLIPImageProcessor / the family's image processor, PIL backend)."""

from __future__ import annotations

import math

import numpy as np

from ..errors import InputError
from .base import ImagePreprocessor, ProcessedImage, resize


class ClipPreprocessor(ImagePreprocessor):
    """CLIP-style images (LLaVA-1.5): the shortest edge resized (or a fixed size), a centre crop, rescale and
    normalise: one square per image, standing for ``image_seq_len`` image tokens (HF LlavaProcessor). The sizes
    follow transformers' PIL backend integer for integer (``get_resize_output_image_size``, ``center_crop``)."""

    def __init__(self, cfg: dict):
        super().__init__(cfg)
        self.tile = int(cfg["crop_height"] or cfg["resize_height"])

    def options(self, image_splitting: bool | None = None, longest_edge: int | None = None) -> dict:
        if image_splitting:
            raise InputError("image_splitting: this model takes one square per image (no splitting)")
        if longest_edge is not None:
            raise InputError("longest_edge: this model resizes to a fixed size; expected None")
        return dict(self.cfg)

    def frames(self, arr: np.ndarray, resample: int, c: dict | None = None) -> tuple[list[np.ndarray], int, int]:
        c = c or self.cfg
        if c["do_resize"]:
            h, w = arr.shape[:2]
            if c.get("shortest_edge"):
                short, long = (w, h) if w <= h else (h, w)
                new_short, new_long = int(c["shortest_edge"]), int(int(c["shortest_edge"]) * long / short)
                h, w = (new_long, new_short) if w <= h else (new_short, new_long)
            else:
                h, w = int(c["resize_height"]), int(c["resize_width"])
            arr = resize(arr, h, w, resample)
        if c.get("do_center_crop"):
            arr = _center_crop(arr, int(c["crop_height"]), int(c["crop_width"]))
        return [arr], 0, 0

    def image_text(self, img: ProcessedImage) -> str:
        """``image_seq_len`` image tokens, between the family's ``image_prefix`` / ``image_suffix`` text (Gemma 3:
        "\\n\\n<start_of_image>" ... "<end_of_image>\\n\\n"; none for LLaVA)."""
        c = self.cfg
        return c.get("image_prefix", "") + c["image_token"] * int(c["image_seq_len"]) + c.get("image_suffix", "")


def _center_crop(arr: np.ndarray, ch: int, cw: int) -> np.ndarray:
    """transformers' ``center_crop``: the centre (ch, cw) window, zero-padded where the image is smaller."""
    h, w = arr.shape[:2]
    top, left = (h - ch) // 2, (w - cw) // 2
    bottom, right = top + ch, left + cw
    if top >= 0 and bottom <= h and left >= 0 and right <= w:
        return arr[top:bottom, left:right]
    nh, nw = max(ch, h), max(cw, w)
    padded = np.zeros((nh, nw, *arr.shape[2:]), arr.dtype)
    top_pad, left_pad = math.ceil((nh - h) / 2), math.ceil((nw - w) / 2)
    padded[top_pad:top_pad + h, left_pad:left_pad + w] = arr
    top, bottom, left, right = top + top_pad, bottom + top_pad, left + left_pad, right + left_pad
    return padded[max(0, top):min(nh, bottom), max(0, left):min(nw, right)]
