"""Pixtral family (``LlavaForConditionalGeneration`` with a ``PixtralVisionModel`` tower, e.g. Pixtral-12B): images
keep their own aspect and size (the longest edge at most ``size["longest_edge"]``, each side rounded up to a whole
number of patches), the tower reads them with 2-D rotary positions, and the prompt spells the patch grid out:
each row of ``[IMG]`` tokens ends with ``[IMG_BREAK]``, the last with ``[IMG_END]``.

What Pixtral brings, as generic rules:
- a vision graph whose height, width and token count are dynamic, called once per image
  (``TargetAdapter.vision_sizes``; the manifest's ``preprocessing.vision_call = "per_image"``);
- the runtime's ``pixtral`` preprocessing kind (resize rule, row/break/end token layout), checked against
  transformers' ``PixtralProcessor`` (PIL backend) pixel for pixel and id for id.
Mistral-Small-3.1 (``Mistral3ForConditionalGeneration``: the same tower and prompt layout, plus a projector that
merges each 2x2 square of patches into one token) is ``Mistral3Adapter`` below: the same rules with a token
"patch" of patch x merge pixels."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import DreamExportError
from .base import TargetAdapter, pixel_rules, register_adapter, stacked_features
from .shared import LlavaVision


def _side(value) -> int:
    if isinstance(value, dict):
        h, w = value.get("height"), value.get("width")
        if h != w:
            raise DreamExportError(f"patch size {value}: expected square patches")
        return int(h)
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise DreamExportError(f"patch size {value}: expected square patches")
        return int(value[0])
    return int(value)


@register_adapter
class PixtralAdapter(TargetAdapter):
    model_types = ("llava",)
    family = "pixtral"

    @classmethod
    def accepts(cls, config) -> bool:
        return getattr(config.vision_config, "model_type", None) == "pixtral"

    def __init__(self, model, processor):
        super().__init__(model, processor)
        cfg = model.config
        if getattr(cfg.text_config, "model_type", "llama") not in ("llama", "mistral"):
            raise DreamExportError(f"Pixtral text model {cfg.text_config.model_type!r}: expected a Llama/Mistral text model")
        if getattr(cfg, "vision_feature_select_strategy", "full") != "full":
            raise DreamExportError(f"vision_feature_select_strategy {cfg.vision_feature_select_strategy!r}: expected "
                                   f"'full' (a Pixtral tower has no CLS token to drop)")
        merge = int(getattr(processor, "spatial_merge_size", 1) or 1)
        if merge != self.model_merge():
            raise DreamExportError(f"processor spatial_merge_size {merge} != the model's {self.model_merge()}")
        patch = _side(cfg.vision_config.patch_size)
        if _side(processor.patch_size) != patch:
            raise DreamExportError(f"processor patch size {processor.patch_size} != the tower's {patch}")
        size = dict(processor.image_processor.size)
        if not size.get("longest_edge"):
            raise DreamExportError(f"image processor size {size}: expected longest_edge")
        # one image token per patch x merge square: images are sized in whole token squares (as the processor does)
        self.patch, self.longest_edge = patch * merge, int(size["longest_edge"])

    def model_merge(self) -> int:
        """Patches merged per side into one image token: none here (LLaVA with a Pixtral tower)."""
        return 1

    @property
    def text_model(self):
        return self.model.model.language_model

    def vision_module(self):
        return LlavaVision(self.model)  # select strategy "full": every patch's features, through the projector

    def vision_input_shape(self) -> tuple[int, int, int]:
        side = -(-self.longest_edge // self.patch) * self.patch
        return (int(self.model.config.vision_config.num_channels), side, side)

    def vision_sizes(self) -> list[tuple[int, int]]:
        """A wide and a tall image, one patch row and column apart from square (height and width traced apart)."""
        p, most = self.patch, max(2, -(-self.longest_edge // self.patch))
        return [(p * min(3, most), p * min(5, most)), (p * min(4, most), p * 2), (p, p)]

    def image_seq_len(self) -> int:
        """The most [IMG] tokens one image can take (a square at the longest edge)."""
        n = -(-self.longest_edge // self.patch)
        return n * n

    def preprocessing(self) -> dict[str, Any]:
        proc, ip = self.processor, self.processor.image_processor
        tok = proc.tokenizer
        n = -(-self.longest_edge // self.patch)
        return {
            "kind": "pixtral",
            "vision_call": "per_image",            # one image of its own size per vision call
            # (min, opt, max) of the vision graph's dynamic dims (TensorRT's optimization profile)
            "vision_profile": {"tiles": [1, 1, 1], "height": [self.patch, max(1, n // 2) * self.patch, n * self.patch],
                               "width": [self.patch, max(1, n // 2) * self.patch, n * self.patch]},
            **pixel_rules(ip),
            "longest_edge": self.longest_edge,
            "patch_size": self.patch,
            "image_seq_len": self.image_seq_len(),
            "tokens_per_image": n * n + n,          # [IMG] tokens plus one break/end per row, at most
            "tiles_per_image": 1,
            "image_token": proc.image_token,
            "image_break_token": proc.image_break_token,
            "image_end_token": proc.image_end_token,
            "image_token_id": self.image_token_id,
            # the chat template writes <s> itself (Mistral templates do): tokenised as apply_chat_template does
            "add_special_tokens": "bos_token" not in self.chat_template(),
            "bos_token_id": tok.bos_token_id,
        }

    def hf_image_features(self, pixel_values, image_sizes=None, **_):
        cfg = self.model.config
        out = self.model.model.get_image_features(pixel_values=pixel_values, image_sizes=image_sizes,
                                                  vision_feature_layer=cfg.vision_feature_layer,
                                                  vision_feature_select_strategy=cfg.vision_feature_select_strategy)
        return stacked_features(out)


class _Mistral3Vision(nn.Module):
    """One image [1,3,H,W] -> image_embeds [1, (H/pm)*(W/pm), hidden], as ``Mistral3Model.get_image_features``: the
    Pixtral tower, then the projector (RMSNorm, each merge x merge square of patches concatenated and merged, MLP).
    The square gathering is written with reshapes (transformers uses ``unfold``, which opset 17 cannot export) in
    ``unfold``'s channel order; the export checks the result against transformers' own."""

    def __init__(self, model):
        super().__init__()
        cfg = model.config
        self.tower = model.model.vision_tower
        self.projector = model.model.multi_modal_projector
        self.layers = cfg.vision_feature_layer if isinstance(cfg.vision_feature_layer, (list, tuple)) else [cfg.vision_feature_layer]
        self.merge = int(cfg.spatial_merge_size)
        self.patch = int(cfg.vision_config.patch_size)

    def forward(self, pixel_values):
        out = self.tower(pixel_values, output_hidden_states=True, return_dict=True)
        feats = torch.cat([out.hidden_states[i] for i in self.layers], dim=-1)[0]      # [h*w, d]
        proj, m = self.projector, self.merge
        feats = proj.norm(feats)
        h, w = pixel_values.shape[2] // self.patch, pixel_values.shape[3] // self.patch
        d = feats.shape[-1]
        grid = feats.reshape(h // m, m, w // m, m, d).permute(0, 2, 4, 1, 3).reshape((h // m) * (w // m), d * m * m)
        x = proj.linear_2(proj.act(proj.linear_1(proj.patch_merger.merging_layer(grid))))
        return x[None]


@register_adapter
class Mistral3Adapter(PixtralAdapter):
    """Mistral-Small-3.1 (``Mistral3ForConditionalGeneration``): Pixtral's tower and prompt layout, with a projector
    that merges each ``spatial_merge_size`` square of patches into one image token (the processor sizes images in
    whole squares, and the prompt's grid counts squares)."""

    model_types = ("mistral3",)
    family = "mistral3"

    @classmethod
    def accepts(cls, config) -> bool:
        return True

    def model_merge(self) -> int:
        return int(self.model.config.spatial_merge_size)

    def vision_module(self):
        return _Mistral3Vision(self.model)

    def vision_graph(self, hidden: int, seed: int = 0):
        spec, examples = super().vision_graph(hidden, seed)
        # the reshape-based merge == transformers' unfold-based one; not on a one-token image, which transformers'
        # get_image_features squeezes away and fails on (its bug)
        self.check_vision_module([(case, (f["pixel_values"],), {"pixel_values": torch.from_numpy(f["pixel_values"]),
                                                                 "image_sizes": torch.tensor([f["pixel_values"].shape[2:]])})
                                  for case, f in examples if f["pixel_values"].shape[2:] != (self.patch, self.patch)])
        return spec, examples

    def hf_image_features(self, pixel_values, image_sizes=None, **_):
        out = self.model.model.get_image_features(pixel_values=pixel_values, image_sizes=image_sizes,
                                                  vision_feature_layer=self.model.config.vision_feature_layer)
        return stacked_features(out)
