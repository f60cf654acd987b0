"""SmolVLM / SmolVLM2 (HF Idefics3 processor and SmolVLM video processor), integer for integer."""

from __future__ import annotations

import math
from datetime import timedelta

import numpy as np

from ..errors import InputError
from ..video import number_words, read_video
from .base import MAX_IMAGE_SIZE, ImagePreprocessor, ProcessedImage, resize

# --- geometry (the HF processor's size rules, integer for integer) ------------------------------------------

def _rescale_to_max_len(h: int, w: int, max_len: int) -> tuple[int, int]:
    aspect = w / h
    if w >= h:
        w = max_len
        h = int(w / aspect)
        if h % 2 != 0:
            h += 1
    else:
        h = max_len
        w = int(h * aspect)
        if w % 2 != 0:
            w += 1
    return max(h, 1), max(w, 1)


def _scale_below(h: int, w: int, max_len: int) -> tuple[int, int]:
    aspect = w / h
    if w >= h and w > max_len:
        w = max_len
        h = int(w / aspect)
    elif h > w and h > max_len:
        h = max_len
        w = int(h * aspect)
    return max(h, 1), max(w, 1)


def _multiple_of_tile(h: int, w: int, tile: int) -> tuple[int, int]:
    aspect = w / h
    if w >= h:
        w = math.ceil(w / tile) * tile
        h = int(w / aspect)
        h = math.ceil(h / tile) * tile
    else:
        h = math.ceil(h / tile) * tile
        w = int(h * aspect)
        w = math.ceil(w / tile) * tile
    return h, w


def _video_frame_size(h: int, w: int, longest: int) -> tuple[int, int]:
    """A frame's size after the aspect-kept resize of its longest edge (transformers' SmolVLM video rule: the
    other edge truncated, then rounded up to even)."""
    longest = min(MAX_IMAGE_SIZE, longest)
    if w >= h:
        nw, nh = longest, int(longest / (w / h))
        nh += nh % 2
    else:
        nh, nw = longest, int(longest * (w / h))
        nw += nw % 2
    return max(nh, 1), max(nw, 1)


class Idefics3Preprocessor(ImagePreprocessor):
    """SmolVLM's images (HF Idefics3Processor): the longest edge resized, then (with image splitting) a grid of
    square tiles plus the whole image as a global tile; in the prompt, each tile's tokens behind its
    ``<row_r_col_c>`` tag. SmolVLM2's videos too: one tile per sampled frame, behind its timestamp."""

    def __init__(self, cfg: dict):
        super().__init__(cfg)
        self.tile = int(cfg["max_image_size"])

    def options(self, image_splitting: bool | None = None, longest_edge: int | None = None) -> dict:
        c = dict(self.cfg)
        if image_splitting is not None:
            if not isinstance(image_splitting, bool):
                raise InputError(f"image_splitting {image_splitting!r}: expected True, False or None (the bundle's default)")
            c["do_image_splitting"] = image_splitting
        if longest_edge is not None:
            if isinstance(longest_edge, bool) or not isinstance(longest_edge, int) or not 1 <= longest_edge <= MAX_IMAGE_SIZE:
                raise InputError(f"longest_edge {longest_edge!r}: expected an integer number of pixels from 1 to {MAX_IMAGE_SIZE}")
            c["size_longest_edge"] = longest_edge
        return c

    def frames(self, arr: np.ndarray, resample: int, c: dict | None = None) -> tuple[list[np.ndarray], int, int]:
        """Resize and split an HWC array the way the HF processor does: (tiles row-major + global, rows, cols)."""
        c = c or self.cfg
        if c["do_resize"]:
            h, w = _rescale_to_max_len(*arr.shape[:2], c["size_longest_edge"])
            h, w = _scale_below(h, w, MAX_IMAGE_SIZE)
            arr = resize(arr, h, w, resample)
        tile = self.tile
        frames, rows, cols = [], 0, 0
        if c["do_image_splitting"]:
            h, w = _multiple_of_tile(*arr.shape[:2], tile)
            arr = resize(arr, h, w, resample)
            if h > tile or w > tile:
                rows = (h - tile) // tile + 1
                cols = (w - tile) // tile + 1
                for r in range(rows):
                    for col in range(cols):
                        frames.append(arr[r * tile:(r + 1) * tile, col * tile:(col + 1) * tile])
                frames.append(resize(arr, tile, tile, resample))
            else:
                frames.append(arr)
        else:
            frames.append(resize(arr, tile, tile, resample))
        return frames, rows, cols

    def image_text(self, img: ProcessedImage) -> str:
        """The token string that stands for one image (HF Idefics3Processor.replace_image_token)."""
        c = self.cfg
        fake, tok, glob = c["fake_image_token"], c["image_token"], c["global_image_token"]
        seq = tok * int(c["image_seq_len"])
        if img.rows == 0 and img.cols == 0:
            return f"{fake}{glob}{seq}{fake}"
        text = ""
        for r in range(img.rows):
            for col in range(img.cols):
                text += f"{fake}<row_{r + 1}_col_{col + 1}>{seq}"
            text += "\n"
        return text + f"\n{fake}{glob}{seq}{fake}"

    def video(self, path) -> ProcessedImage:
        """A video file -> one tile per sampled frame, and the prompt text announcing the frames (SmolVLM2: frame
        count in words, duration, each frame's timestamp before its image tokens), as transformers' SmolVLM video
        processor and processor make them. Frames are resized with PIL (the runtime is torch-free); transformers
        resizes them with torchvision, whose resampling rounds differently: pixels differ by at most a few levels
        of 255 (benchmarks/processor_backends.py measures it on still images: answers unchanged)."""
        v = self.cfg.get("video")
        if not v:
            raise InputError(f"{path}: this model takes images, not videos")
        sampled = read_video(path, float(v["fps"]), int(v["max_frames"]), float(v.get("skip_secs", 1.0)))
        tiles = []
        tile = int(v["max_image_size"])
        for frame in sampled.frames:
            h, w = _video_frame_size(*frame.shape[:2], int(v["longest_edge"]))
            arr = resize(frame, h, w, int(v["resample"]))
            tiles.append(self.normalize(resize(arr, tile, tile, int(v["resample"])), v))
        text = v["intro"].format(frame_count=number_words(len(tiles)),
                                 video_duration=str(timedelta(seconds=int(sampled.duration))))
        single = self.image_text(ProcessedImage(np.zeros(0), 0, 0))
        for t in sampled.timestamps:
            text += v["frame_message"].format(timestamp=f"{int(t // 60):02d}:{int(t % 60):02d}") + single
        return ProcessedImage(np.stack(tiles), 0, 0, size=tuple(sampled.frames.shape[1:3]), text=text + v["outro"])
