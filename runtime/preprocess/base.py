"""The preprocessing every family shares: reading images as transformers does, resizing through PIL, what one
processed image is (``ProcessedImage``) and the base every family's preprocessor builds on (``ImagePreprocessor``).

Image files are read like transformers' ``load_image``-then-processor path: EXIF orientation applied,
transparency composited onto white, everything else converted to RGB; each family then resizes (through PIL on
uint8, as the HF PIL backend does), cuts, rescales and normalises in its own module.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import InputError

MAX_IMAGE_SIZE = 4096  # the HF processor's absolute cap on a resized side
Image.MAX_IMAGE_PIXELS = None  # large photos are resized, not rejected (HF's load_image does the same)


def load_image(path) -> Image.Image:
    """Open an image file fully (so truncation is caught here) and apply its EXIF orientation."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: image file not found")
    if not path.is_file():
        raise InputError(f"{path}: not a file; expected an image file (PNG, JPEG, ...)")
    if path.stat().st_size == 0:
        raise InputError(f"{path}: empty file; expected an image (PNG, JPEG, ...)")
    try:
        with Image.open(path) as im:
            im.load()
            im = ImageOps.exif_transpose(im)
            im.load()
    except UnidentifiedImageError as exc:
        raise InputError(f"{path}: not an image file Pillow can read; expected PNG, JPEG, WebP, BMP, ...") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise InputError(f"{path}: image data is damaged or truncated ({exc})") from exc
    return im


def as_image(item, index: int = 0, bgr: bool = False) -> Image.Image:
    """One image as the caller has it: a file path, a PIL image, or a numpy array as cameras deliver frames:
    H x W x 3 uint8 (RGB; BGR with ``bgr=True``, as OpenCV and ROS ``bgr8`` images arrive), H x W x 4 (RGBA /
    BGRA) or H x W (grayscale). The array becomes the same PIL image a file with those pixels would, so the
    preprocessing is identical."""
    if isinstance(item, (str, Path)):
        return load_image(item)
    if isinstance(item, Image.Image):
        return item
    if isinstance(item, np.ndarray):
        shape = tuple(item.shape)
        ok_shape = item.ndim == 2 or (item.ndim == 3 and shape[2] in (3, 4))
        if item.dtype != np.uint8 or not ok_shape or 0 in shape:
            raise InputError(f"image {index}: a numpy array of shape {shape} and dtype {item.dtype}; expected "
                             f"H x W x 3 uint8 (RGB, or BGR with bgr=True), H x W x 4 uint8 or H x W uint8")
        arr = item
        if bgr and arr.ndim == 3:
            arr = arr[:, :, [2, 1, 0] + ([3] if shape[2] == 4 else [])]
        return Image.fromarray(np.ascontiguousarray(arr))  # L, RGB or RGBA from the shape
    raise InputError(f"image {index}: a {type(item).__name__}; expected a file path, a PIL image or a numpy array "
                     f"(H x W x 3 uint8)")


def to_rgb_array(im: Image.Image) -> np.ndarray:
    """HWC uint8 RGB: transparency is composited onto white (transformers' convert_to_rgb)."""
    if "A" in im.getbands() or im.info.get("transparency") is not None:
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        rgb = Image.alpha_composite(background, rgba).convert("RGB")
    else:
        rgb = im.convert("RGB")
    return np.array(rgb)


def resize(img: np.ndarray, h: int, w: int, resample: int) -> np.ndarray:
    """HWC uint8 -> HWC uint8 through PIL, as transformers' PIL backend resizes."""
    return np.array(Image.fromarray(img).resize((w, h), resample=resample))


@dataclass
class ProcessedImage:
    tiles: np.ndarray   # [T,3,S,S] float32, row-major tiles then the global image (a video: one tile per frame)
    rows: int
    cols: int
    size: tuple | None = None  # (height, width) of the image as read, for families whose packing needs it
    text: str | None = None    # the prompt text that stands for it, when not the family's image text (a video)
    feeds: dict | None = None  # further vision-graph inputs for this image (a per-image call: Qwen2.5-VL's windows)


class ImagePreprocessor:
    """One family's images and prompt text, from the manifest's ``preprocessing`` (``cfg``). A family gives
    ``options`` (the call's overrides, checked), ``frames`` (an HWC array -> the frames the vision graph gets, and
    the grid they form) and ``image_text`` (the prompt text standing for one image); ``image`` and
    ``expand_prompt`` are the same for all."""

    def __init__(self, cfg: dict):
        self.cfg = cfg

    def options(self, image_splitting: bool | None = None, longest_edge: int | None = None) -> dict:
        """The preprocessing config of one call: the bundle's, with these per-call overrides (each family says
        which it takes)."""
        raise NotImplementedError

    def frames(self, arr: np.ndarray, resample: int, c: dict | None = None) -> tuple[list[np.ndarray], int, int]:
        """(frames, rows, cols) of an HWC uint8 array under config ``c`` (default: the bundle's)."""
        raise NotImplementedError

    def image_text(self, img: ProcessedImage) -> str:
        raise NotImplementedError

    def image(self, im: Image.Image, image_splitting: bool | None = None, longest_edge: int | None = None) -> ProcessedImage:
        """``image_splitting`` / ``longest_edge`` override the bundle's ``do_image_splitting`` and
        ``size["longest_edge"]`` for this image, as the HF processor's call options of those names do: fewer
        tiles cost less vision and prefill time."""
        c = self.options(image_splitting, longest_edge)
        arr = to_rgb_array(im) if c["do_convert_rgb"] else np.array(im)
        frames, rows, cols = self.frames(arr, int(c["resample"]), c)
        return ProcessedImage(np.stack([self.normalize(f) for f in frames]), rows, cols)

    def normalize(self, frame: np.ndarray, c: dict | None = None) -> np.ndarray:
        """An HWC uint8 frame -> CHW float32, rescaled and normalised under config ``c`` (default: the bundle's)."""
        c = c or self.cfg
        x = frame.transpose(2, 0, 1)  # CHW
        if c["do_rescale"]:
            x = (x.astype(np.float64) * c["rescale_factor"]).astype(np.float32)
        else:
            x = x.astype(np.float32)
        if c["do_normalize"]:
            mean = np.array(c["image_mean"], dtype=np.float32)
            std = np.array(c["image_std"], dtype=np.float32)
            x = ((x.T - mean) / std).T
        return np.ascontiguousarray(x, dtype=np.float32)

    def expand_prompt(self, prompt_text: str, images: list[ProcessedImage]) -> str:
        """Replace each placeholder the chat template wrote (one per image; ``<video>`` per video) by the text
        that stands for that image or video, in order."""
        token = self.cfg.get("image_placeholder") or self.cfg["image_token"]  # what the chat template writes per image
        video_token = (self.cfg.get("video") or {}).get("video_token")
        marks = [token] + ([video_token] if video_token else [])
        found = re.findall("|".join(re.escape(m) for m in marks), prompt_text)
        want = ["video" if img.text is not None else "image" for img in images]
        have = ["video" if m == video_token else "image" for m in found]
        if have != want:
            raise InputError(f"the prompt holds placeholders for {have.count('image')} image(s) and {have.count('video')} "
                             f"video(s) in the order {have}, but {want} were given")
        pieces = re.split("|".join(re.escape(m) for m in marks), prompt_text)
        out = pieces[0]
        for img, rest in zip(images, pieces[1:]):
            out += (img.text if img.text is not None else self.image_text(img)) + rest
        return out
