"""LLaVA-1.5 family (``LlavaForConditionalGeneration``): a CLIP vision tower read at ``vision_feature_layer``
(-2 in LLaVA-1.5), the CLS token dropped (``vision_feature_select_strategy == "default"``), an MLP projector,
and a Llama text model. One image = one resized, centre-cropped square = ``image_seq_len`` image tokens.

LLaVA-NeXT (anyres tiling, image_newline) is ``LlavaNextAdapter`` below."""

from __future__ import annotations

from typing import Any

from ..errors import DreamExportError
from .base import TargetAdapter, register_adapter, stacked_features
from .shared import LlavaVision, clip_preprocessing


@register_adapter
class LlavaAdapter(TargetAdapter):
    model_types = ("llava",)
    family = "llava"

    @classmethod
    def accepts(cls, config) -> bool:
        """LLaVA with a CLIP/SigLIP tower (a Pixtral tower is ``targets/pixtral.py``)."""
        return getattr(config.vision_config, "model_type", None) != "pixtral"

    def __init__(self, model, processor):
        super().__init__(model, processor)
        text_cfg = model.config.text_config
        if getattr(text_cfg, "model_type", "llama") not in ("llama", "mistral", "qwen2"):
            raise DreamExportError(f"LLaVA text model {text_cfg.model_type!r}: expected a Llama-style text model")
        vcfg = model.config.vision_config
        if getattr(vcfg, "model_type", "clip_vision_model") not in ("clip_vision_model", "siglip_vision_model"):
            raise DreamExportError(f"LLaVA vision tower {vcfg.model_type!r}: expected CLIP or SigLIP")
        ip = processor.image_processor
        crop = getattr(ip, "crop_size", None) or {}
        side = crop.get("height") if getattr(ip, "do_center_crop", False) else (ip.size.get("height") or ip.size.get("shortest_edge"))
        if side != vcfg.image_size:
            raise DreamExportError(f"image processor output {side} px != vision_config.image_size {vcfg.image_size}; "
                                   f"expected the processor to produce the tower's square")
        if model.config.vision_feature_select_strategy not in ("default", "full"):
            raise DreamExportError(f"vision_feature_select_strategy {model.config.vision_feature_select_strategy!r}: "
                                   f"expected default or full")

    @property
    def text_model(self):
        return self.model.model.language_model

    def vision_module(self):
        return LlavaVision(self.model)

    def image_seq_len(self) -> int:
        cfg = self.model.config
        side = cfg.vision_config.image_size // cfg.vision_config.patch_size
        return side * side + (0 if cfg.vision_feature_select_strategy == "default" else 1)

    def preprocessing(self) -> dict[str, Any]:
        tok = self.processor.tokenizer
        return {
            **clip_preprocessing(self.processor.image_processor),
            "image_seq_len": self.image_seq_len(),
            "tiles_per_image": 1,
            "image_token": self.processor.image_token,
            "image_token_id": self.image_token_id,
            "add_special_tokens": True,
            "bos_token_id": tok.bos_token_id,
        }

    def hf_image_features(self, pixel_values, **_):
        """The image embeddings transformers' own forward puts at the image tokens ([n_image_tokens, H])."""
        cfg = self.model.config
        out = self.model.model.get_image_features(pixel_values=pixel_values, vision_feature_layer=cfg.vision_feature_layer,
                                                  vision_feature_select_strategy=cfg.vision_feature_select_strategy)
        return stacked_features(out)


@register_adapter
class LlavaNextAdapter(LlavaAdapter):
    """LLaVA-NeXT / LLaVA-1.6 (``LlavaNextForConditionalGeneration``): "anyres" images (the best grid pinpoint,
    resized, padded and cut into tower-size patches, plus a base patch of the whole image), packed by the model
    into base tokens + the unpadded patch grid with a learned ``image_newline`` closing each row. The tower and
    projector run per patch in the exported vision graph; the packing is the runtime's ``llava_next``
    preprocessing kind (with ``image_newline`` stored in the bundle)."""

    model_types = ("llava_next",)
    family = "llava_next"

    def __init__(self, model, processor):
        super().__init__(model, processor)
        if model.config.vision_feature_select_strategy != "default":
            raise DreamExportError("LLaVA-NeXT with vision_feature_select_strategy 'full': expected 'default' "
                                   "(the patch grid packing assumes square token grids)")

    def preprocessing(self):
        pre = super().preprocessing()
        cfg = self.model.config
        side = cfg.vision_config.image_size
        pinpoints = [[int(h), int(w)] for h, w in cfg.image_grid_pinpoints]
        ip_pinpoints = [[int(h), int(w)] for h, w in self.processor.image_processor.image_grid_pinpoints]
        if ip_pinpoints != pinpoints:
            raise DreamExportError(f"image processor grid pinpoints {ip_pinpoints} != the model's {pinpoints}")
        pre.update(kind="llava_next", image_grid_pinpoints=pinpoints,
                   patch_tokens=(side // cfg.vision_config.patch_size) ** 2,
                   tiles_per_image=1 + max(h * w for h, w in pinpoints) // (side * side))
        return pre

    def extra_arrays(self) -> dict:
        return {"image_newline": self.model.model.image_newline.detach().float().numpy()}

    def hf_image_features(self, pixel_values, image_sizes=None, **_):
        cfg = self.model.config
        out = self.model.model.get_image_features(pixel_values=pixel_values, image_sizes=image_sizes,
                                                  vision_feature_layer=cfg.vision_feature_layer,
                                                  vision_feature_select_strategy=cfg.vision_feature_select_strategy)
        return stacked_features(out)
