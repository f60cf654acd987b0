"""What several family adapters share, kept here so that the adapters stay independent of each other (the
import-linter contract in pyproject.toml): LLaVA's vision path (a tower read at chosen layers, then a projector), which
Pixtral's LLaVA layout uses too, and the runtime's ``clip`` preprocessing, which Gemma 3's processor also fits."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import DreamExportError
from .base import pixel_rules


class LlavaVision(nn.Module):
    """pixel_values [T,3,S,S] -> image_embeds [T, image_seq_len, H], as LlavaModel.get_image_features computes them."""

    def __init__(self, model):
        super().__init__()
        self.tower = model.model.vision_tower
        self.projector = model.model.multi_modal_projector
        cfg = model.config
        self.layers = cfg.vision_feature_layer if isinstance(cfg.vision_feature_layer, (list, tuple)) else [cfg.vision_feature_layer]
        self.drop_cls = cfg.vision_feature_select_strategy == "default"

    def forward(self, pixel_values):
        out = self.tower(pixel_values, output_hidden_states=True, return_dict=True)
        feats = [out.hidden_states[i] for i in self.layers]
        if self.drop_cls:
            feats = [f[:, 1:] for f in feats]
        return self.projector(torch.cat(feats, dim=-1))


def clip_preprocessing(ip) -> dict[str, Any]:
    """The runtime's ``clip`` preprocessing kind for a CLIP-style image processor (resize by the shortest edge or to
    a fixed size, optional centre crop, rescale, normalise)."""
    crop = dict(getattr(ip, "crop_size", None) or {})
    size = dict(ip.size)
    if not size.get("shortest_edge") and not (size.get("height") and size.get("width")):
        raise DreamExportError(f"image processor size {size}: expected shortest_edge or height/width")
    return {
        "kind": "clip",
        **pixel_rules(ip),
        "shortest_edge": int(size["shortest_edge"]) if size.get("shortest_edge") else None,
        "resize_height": int(size["height"]) if size.get("height") else None,
        "resize_width": int(size["width"]) if size.get("width") else None,
        "do_center_crop": bool(getattr(ip, "do_center_crop", False)),
        "crop_height": int(crop["height"]) if crop else None,
        "crop_width": int(crop["width"]) if crop else None,
    }
