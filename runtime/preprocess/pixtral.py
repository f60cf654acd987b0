"""Pixtral and Mistral-Small-3.1 (HF PixtralProcessor, PIL backend): each image whole, at its own size."""

from __future__ import annotations

import math

import numpy as np

from ..errors import InputError
from .base import ImagePreprocessor, ProcessedImage, resize


def _pixtral_size(h: int, w: int, longest: int, patch: int) -> tuple[int, int]:
    """transformers' Pixtral ``get_resize_output_image_size``: scaled down (floored) to fit a longest x longest box,
    then each side rounded up to a whole number of patches (small images grow to one patch)."""
    ratio = max(h / longest, w / longest)
    if ratio > 1:
        h, w = int(math.floor(h / ratio)), int(math.floor(w / ratio))
    return ((h - 1) // patch + 1) * patch, ((w - 1) // patch + 1) * patch


class PixtralPreprocessor(ImagePreprocessor):
    """Pixtral's images (HF PixtralProcessor, PIL backend): each image keeps its aspect, resized so its longest edge
    fits ``longest_edge`` and each side is a whole number of patches, rescaled and normalised; one vision call per
    image (its own size). In the prompt, each row of patches is ``[IMG]`` x cols + ``[IMG_BREAK]``, the last row
    ending in ``[IMG_END]``. ``longest_edge`` can be lowered per call (fewer image tokens), as the processor's
    ``size`` option does."""

    def __init__(self, cfg: dict):
        super().__init__(cfg)
        self.patch = int(cfg["patch_size"])

    def options(self, image_splitting: bool | None = None, longest_edge: int | None = None) -> dict:
        if image_splitting:
            raise InputError("image_splitting: this model reads each image whole at its own size (no splitting)")
        c = dict(self.cfg)
        if longest_edge is not None:
            if isinstance(longest_edge, bool) or not isinstance(longest_edge, int) or not 1 <= longest_edge <= int(self.cfg["longest_edge"]):
                raise InputError(f"longest_edge {longest_edge!r}: expected an integer number of pixels from 1 to "
                                 f"{self.cfg['longest_edge']} (the model's own)")
            c["longest_edge"] = longest_edge
        return c

    def frames(self, arr: np.ndarray, resample: int, c: dict | None = None) -> tuple[list[np.ndarray], int, int]:
        c = c or self.cfg
        if c["do_resize"]:
            h, w = _pixtral_size(*arr.shape[:2], int(c["longest_edge"]), self.patch)
            if not h or not w:  # transformers' processor fails on it too
                raise InputError(f"image of {arr.shape[1]}x{arr.shape[0]} px: fitted into {c['longest_edge']} px its "
                                 f"short side is 0 px; expected an aspect ratio of at most {c['longest_edge']}:1")
            arr = resize(arr, h, w, resample)
        h, w = arr.shape[:2]
        if h % self.patch or w % self.patch:
            raise InputError(f"image of {w}x{h} px: expected whole {self.patch}-px patches (do_resize is off)")
        return [arr], h // self.patch, w // self.patch

    def image_text(self, img: ProcessedImage) -> str:
        c = self.cfg
        row = c["image_token"] * img.cols
        return (row + c["image_break_token"]) * (img.rows - 1) + row + c["image_end_token"]
