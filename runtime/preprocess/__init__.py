"""Images and prompts -> (input_ids, pixel tiles), reproducing each family's HF processor with numpy and pillow.

``base`` holds what every family shares (reading images, resizing, ``ProcessedImage``, ``ImagePreprocessor``); each
family has its own module. ``make_preprocessor`` picks the one a bundle's manifest names.
"""

from ..errors import InputError
from .base import ImagePreprocessor, ProcessedImage, as_image, load_image, to_rgb_array
from .clip import ClipPreprocessor
from .idefics3 import Idefics3Preprocessor
from .llava_next import LlavaNextPreprocessor
from .pixtral import PixtralPreprocessor
from .qwen2_vl import Qwen2VLPreprocessor

__all__ = ["ClipPreprocessor", "Idefics3Preprocessor", "ImagePreprocessor", "LlavaNextPreprocessor",
           "PixtralPreprocessor", "ProcessedImage", "Qwen2VLPreprocessor", "as_image", "load_image",
           "make_preprocessor", "to_rgb_array"]

# manifest preprocessing.kind -> the family's preprocessor
PREPROCESSORS = {"idefics3": Idefics3Preprocessor, "clip": ClipPreprocessor, "llava_next": LlavaNextPreprocessor,
                 "pixtral": PixtralPreprocessor, "qwen2_vl": Qwen2VLPreprocessor}


def make_preprocessor(cfg: dict, arrays: dict | None = None) -> ImagePreprocessor:
    """The preprocessor of the manifest's ``preprocessing`` section; ``arrays``: the bundle's named arrays (LLaVA-NeXT
    needs its ``image_newline``)."""
    kind = cfg.get("kind")
    if kind == "llava_next":
        return LlavaNextPreprocessor(cfg, arrays)
    if kind in PREPROCESSORS:
        return PREPROCESSORS[kind](cfg)
    raise InputError(f"manifest preprocessing.kind {kind!r} is not supported; expected one of: {', '.join(PREPROCESSORS)}")
