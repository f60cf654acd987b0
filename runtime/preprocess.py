"""Images and prompts -> (input_ids, pixel tiles), reproducing the HF Idefics3 processor with numpy/pillow.

Image files are read like transformers' ``load_image``-then-processor path: EXIF orientation applied,
transparency composited onto white, everything else converted to RGB; then resized (LANCZOS on
uint8, as the HF PIL backend does), split into tiles plus a global image, rescaled and normalised.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import InputError

MAX_IMAGE_SIZE = 4096  # the HF processor's absolute cap on a resized side
Image.MAX_IMAGE_PIXELS = None  # large photos are resized, not rejected (HF's load_image does the same)


# --- reading ---------------------------------------------------------------------------------------

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


# --- Idefics3 geometry (the HF processor's size rules, integer for integer) ---------------------------

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


def _resize(img: np.ndarray, h: int, w: int, resample: int) -> np.ndarray:
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


class Idefics3Preprocessor:
    def __init__(self, cfg: dict):
        self.cfg = cfg
        self.tile = int(cfg["max_image_size"])

    def image(self, im: Image.Image, image_splitting: bool | None = None, longest_edge: int | None = None) -> ProcessedImage:
        """``image_splitting`` / ``longest_edge`` override the bundle's ``do_image_splitting`` and
        ``size["longest_edge"]`` for this image, as the HF processor's call options of those names do: fewer
        tiles cost less vision and prefill time."""
        c = self.options(image_splitting, longest_edge)
        arr = to_rgb_array(im) if c["do_convert_rgb"] else np.array(im)
        frames, rows, cols = self.frames(arr, int(c["resample"]), c)
        return ProcessedImage(np.stack([self._normalize(f) for f in frames]), rows, cols)

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
            arr = _resize(arr, h, w, resample)
        tile = self.tile
        frames, rows, cols = [], 0, 0
        if c["do_image_splitting"]:
            h, w = _multiple_of_tile(*arr.shape[:2], tile)
            arr = _resize(arr, h, w, resample)
            if h > tile or w > tile:
                rows = (h - tile) // tile + 1
                cols = (w - tile) // tile + 1
                for r in range(rows):
                    for col in range(cols):
                        frames.append(arr[r * tile:(r + 1) * tile, col * tile:(col + 1) * tile])
                frames.append(_resize(arr, tile, tile, resample))
            else:
                frames.append(arr)
        else:
            frames.append(_resize(arr, tile, tile, resample))
        return frames, rows, cols

    def _normalize(self, frame: np.ndarray, c: dict | None = None) -> np.ndarray:
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

    def expand_prompt(self, prompt_text: str, images: list[ProcessedImage]) -> str:
        """Replace each placeholder the chat template wrote (one per image; ``<video>`` per video) by the text
        that stands for that image or video, in order."""
        import re

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

    def video(self, path) -> ProcessedImage:
        """A video file -> one tile per sampled frame, and the prompt text announcing the frames (SmolVLM2: frame
        count in words, duration, each frame's timestamp before its image tokens), as transformers' SmolVLM video
        processor and processor make them. Frames are resized with PIL (the runtime is torch-free); transformers
        resizes them with torchvision, whose resampling rounds differently: pixels differ by at most a few levels
        of 255 (benchmarks/processor_backends.py measures it on still images: answers unchanged)."""
        from datetime import timedelta

        from .video import number_words, read_video

        v = self.cfg.get("video")
        if not v:
            raise InputError(f"{path}: this model takes images, not videos")
        sampled = read_video(path, float(v["fps"]), int(v["max_frames"]), float(v.get("skip_secs", 1.0)))
        tiles = []
        tile = int(v["max_image_size"])
        for frame in sampled.frames:
            h, w = _video_frame_size(*frame.shape[:2], int(v["longest_edge"]))
            arr = _resize(frame, h, w, int(v["resample"]))
            tiles.append(self._normalize(_resize(arr, tile, tile, int(v["resample"])), v))
        text = v["intro"].format(frame_count=number_words(len(tiles)),
                                 video_duration=str(timedelta(seconds=int(sampled.duration))))
        single = self.image_text(ProcessedImage(np.zeros(0), 0, 0))
        for t in sampled.timestamps:
            text += v["frame_message"].format(timestamp=f"{int(t // 60):02d}:{int(t % 60):02d}") + single
        return ProcessedImage(np.stack(tiles), 0, 0, size=tuple(sampled.frames.shape[1:3]), text=text + v["outro"])


class ClipPreprocessor(Idefics3Preprocessor):
    """CLIP-style images (LLaVA-1.5): the shortest edge resized (or a fixed size), a centre crop, rescale and
    normalise: one square per image, standing for ``image_seq_len`` image tokens (HF LlavaProcessor). The sizes
    follow transformers' PIL backend integer for integer (``get_resize_output_image_size``, ``center_crop``)."""

    def __init__(self, cfg: dict):
        self.cfg = cfg
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
            arr = _resize(arr, h, w, resample)
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
        resized = _resize(arr, nh, nw, resample)
        py, ry = divmod(bh - nh, 2)
        px, rx = divmod(bw - nw, 2)
        padded = np.zeros((bh, bw, *arr.shape[2:]), arr.dtype)
        padded[py:py + nh, px:px + nw] = resized
        side = self.tile
        base_side = int(c["shortest_edge"] or c["resize_height"])
        patches = [_resize(arr, base_side, base_side, resample)]
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


def _pixtral_size(h: int, w: int, longest: int, patch: int) -> tuple[int, int]:
    """transformers' Pixtral ``get_resize_output_image_size``: scaled down (floored) to fit a longest x longest box,
    then each side rounded up to a whole number of patches (small images grow to one patch)."""
    ratio = max(h / longest, w / longest)
    if ratio > 1:
        h, w = int(math.floor(h / ratio)), int(math.floor(w / ratio))
    return ((h - 1) // patch + 1) * patch, ((w - 1) // patch + 1) * patch


class PixtralPreprocessor(Idefics3Preprocessor):
    """Pixtral's images (HF PixtralProcessor, PIL backend): each image keeps its aspect, resized so its longest edge
    fits ``longest_edge`` and each side is a whole number of patches, rescaled and normalised; one vision call per
    image (its own size). In the prompt, each row of patches is ``[IMG]`` x cols + ``[IMG_BREAK]``, the last row
    ending in ``[IMG_END]``. ``longest_edge`` can be lowered per call (fewer image tokens), as the processor's
    ``size`` option does."""

    def __init__(self, cfg: dict):
        self.cfg = cfg
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
            arr = _resize(arr, h, w, resample)
        h, w = arr.shape[:2]
        if h % self.patch or w % self.patch:
            raise InputError(f"image of {w}x{h} px: expected whole {self.patch}-px patches (do_resize is off)")
        return [arr], h // self.patch, w // self.patch

    def image_text(self, img: ProcessedImage) -> str:
        c = self.cfg
        row = c["image_token"] * img.cols
        return (row + c["image_break_token"]) * (img.rows - 1) + row + c["image_end_token"]


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


class Qwen2VLPreprocessor(Idefics3Preprocessor):
    """Qwen2.5-VL's images (HF Qwen2VLImageProcessor, PIL backend): ``smart_resize`` to multiples of patch x merge
    within a pixel budget, rescale, normalise, then patches flattened in merge-block order (each patch repeated
    over the temporal patch), one vision call per image. The prompt's ``<|image_pad|>`` becomes one token per
    merged patch; the vision graph also gets each patch's (row, col), the window order its windowed layers use,
    each patch's window and the inverse order (``feeds``); ``token_grid`` gives the M-RoPE positions their rows and columns."""

    def __init__(self, cfg: dict):
        self.cfg = cfg
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
            arr = _resize(arr, h, w, resample)
        return [arr], arr.shape[0] // self.patch, arr.shape[1] // self.patch

    def image(self, im: Image.Image, image_splitting: bool | None = None, longest_edge: int | None = None) -> ProcessedImage:
        c = self.options(image_splitting, longest_edge)
        arr = to_rgb_array(im) if c["do_convert_rgb"] else np.array(im)
        frames, gh, gw = self.frames(arr, int(c["resample"]), c)
        x = self._normalize(frames[0])                                   # [C, H, W]
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


PREPROCESSORS = {"idefics3": Idefics3Preprocessor, "clip": ClipPreprocessor, "llava_next": LlavaNextPreprocessor,
                 "pixtral": PixtralPreprocessor, "qwen2_vl": Qwen2VLPreprocessor}


def make_preprocessor(cfg: dict, arrays: dict | None = None):
    kind = cfg.get("kind")
    if kind == "llava_next":
        return LlavaNextPreprocessor(cfg, arrays)
    if kind in PREPROCESSORS:
        return PREPROCESSORS[kind](cfg)
    raise InputError(f"manifest preprocessing.kind {kind!r} is not supported; expected one of: {', '.join(PREPROCESSORS)}")
