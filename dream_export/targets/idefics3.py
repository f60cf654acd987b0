"""SmolVLM / Idefics3 family: SigLIP-style vision tower + pixel-shuffle connector + Llama text model; SmolVLM2
(``SmolVLMForConditionalGeneration``) is the same model with video input (``SmolVLM2Adapter``)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import DreamExportError
from .base import TargetAdapter, register_adapter, stacked_features


class _Idefics3Vision(nn.Module):
    """Vision tower + connector for full (unpadded) square tiles, with the position ids fixed.

    Idefics3 tiles are always full ``image_size`` squares (the processor resizes to multiples of the
    tile), so the patch mask is all ones and HF's bucketize position ids reduce to a constant, which
    we compute here with HF's own embedding code once and store (no bucketize in the graph).
    """

    def __init__(self, model):
        super().__init__()
        self.vision = model.model.vision_model
        self.connector = model.model.connector
        cfg = self.vision.config
        side = cfg.image_size // cfg.patch_size
        emb = self.vision.embeddings
        with torch.no_grad():
            pos = self._hf_position_ids(emb, side)
        self.register_buffer("position_ids", pos, persistent=False)

    @staticmethod
    def _hf_position_ids(emb, side: int) -> torch.Tensor:
        """Run HF's own position-id logic for one full tile, by capturing what it feeds position_embedding."""
        seen = {}

        def capture(module, args, output):
            seen["ids"] = args[0]

        hook = emb.position_embedding.register_forward_hook(capture)
        try:
            size = side * emb.patch_size
            pixel_values = torch.zeros(1, emb.patch_embedding.in_channels, size, size)
            mask = torch.ones(1, side, side, dtype=torch.bool)
            emb(pixel_values=pixel_values, patch_attention_mask=mask)
        finally:
            hook.remove()
        return seen["ids"][0].clone()  # [side*side]

    def forward(self, pixel_values):  # [T,3,S,S]
        emb = self.vision.embeddings
        x = emb.patch_embedding(pixel_values.to(emb.patch_embedding.weight.dtype))  # [T,C,s,s]
        x = x.flatten(2).transpose(1, 2)  # [T,s*s,C]
        x = x + emb.position_embedding(self.position_ids)[None]
        x = self.vision.encoder(inputs_embeds=x, attention_mask=None).last_hidden_state
        x = self.vision.post_layernorm(x)
        return self.connector(x)  # [T, image_seq_len, H]


@register_adapter
class Idefics3Adapter(TargetAdapter):
    model_types = ("idefics3",)
    family = "idefics3"

    def __init__(self, model, processor):
        super().__init__(model, processor)
        text_cfg = model.config.text_config
        if getattr(text_cfg, "model_type", "llama") not in ("llama",):
            raise DreamExportError(f"Idefics3 text model {text_cfg.model_type!r}: expected a Llama text model")
        ip = processor.image_processor
        tile = ip.max_image_size["longest_edge"]
        if tile != model.config.vision_config.image_size:
            raise DreamExportError(
                f"image processor max_image_size {tile} != vision_config.image_size "
                f"{model.config.vision_config.image_size}; expected equal tiles"
            )

    @property
    def text_model(self):
        return self.model.model.text_model

    def vision_module(self):
        return _Idefics3Vision(self.model)

    def preprocessing(self) -> dict[str, Any]:
        ip = self.processor.image_processor
        tok = self.processor.tokenizer
        resample = ip.resample
        return {
            "kind": "idefics3",
            "do_convert_rgb": bool(ip.do_convert_rgb),
            "do_resize": bool(ip.do_resize),
            "size_longest_edge": int(ip.size["longest_edge"]),
            "resample": int(resample),
            "do_image_splitting": bool(ip.do_image_splitting),
            "max_image_size": int(ip.max_image_size["longest_edge"]),
            "do_rescale": bool(ip.do_rescale),
            "rescale_factor": float(ip.rescale_factor),
            "do_normalize": bool(ip.do_normalize),
            "image_mean": [float(v) for v in ip.image_mean],
            "image_std": [float(v) for v in ip.image_std],
            "image_seq_len": int(self.processor.image_seq_len),
            "image_token": self.processor.image_token,
            "fake_image_token": self.processor.fake_image_token,
            "global_image_token": getattr(self.processor, "global_image_tag", None) or self.processor.global_image_token,
            "image_token_id": self.image_token_id,
            "add_special_tokens": True,
            "bos_token_id": tok.bos_token_id,
        }

    def hf_image_features(self, pixel_values, pixel_attention_mask=None, **_):
        """The image embeddings transformers' own forward puts at the image tokens ([n_image_tokens, H])."""
        out = self.model.model.get_image_features(pixel_values=pixel_values, pixel_attention_mask=pixel_attention_mask)
        return stacked_features(out)


@register_adapter
class SmolVLM2Adapter(Idefics3Adapter):
    """SmolVLM2: SmolVLM's images, plus videos. Each sampled frame is one tile (no splitting) standing for
    ``image_seq_len`` image tokens, announced by a frame count in words, the duration and per-frame timestamps.
    Everything the runtime needs for that is the manifest's ``preprocessing.video`` (sampling, frame sizes, the
    prompt strings of transformers' SmolVLM processor, and the chat template it uses for videos); the runtime
    reads videos with PyAV (``runtime/video.py``)."""

    model_types = ("smolvlm",)
    family = "smolvlm2"

    def preprocessing(self) -> dict[str, Any]:
        from transformers.models.smolvlm import processing_smolvlm as hf

        pre = super().preprocessing()
        vp = getattr(self.processor, "video_processor", None)
        if vp is None:
            return pre
        size = dict(vp.size)
        if not size.get("longest_edge"):
            raise DreamExportError(f"video processor size {size}: expected a longest_edge")
        tile = int(vp.max_image_size["longest_edge"])
        if tile != self.model.config.vision_config.image_size:
            raise DreamExportError(f"video processor max_image_size {tile} != vision_config.image_size "
                                   f"{self.model.config.vision_config.image_size}; expected one tile per frame")
        pre["video"] = {
            "video_token": self.processor.video_token,
            "fps": float(vp.fps),
            "max_frames": int(vp.num_frames),
            "skip_secs": 1.0,                  # SmolVLMVideoProcessor.sample_frames' default
            "longest_edge": int(size["longest_edge"]),
            "max_image_size": tile,
            "resample": int(vp.resample),
            "do_rescale": bool(vp.do_rescale),
            "rescale_factor": float(vp.rescale_factor),
            "do_normalize": bool(vp.do_normalize),
            "image_mean": [float(v) for v in vp.image_mean],
            "image_std": [float(v) for v in vp.image_std],
            "intro": hf.DEFAULT_VIDEO_INTRO,
            "frame_message": hf.FRAME_TIMESTAMP_MESSAGE,
            "outro": hf.DEFAULT_MEDIA_OUTTRO,
            "chat_template": hf.DEFAULT_CHAT_TEMPLATE,  # what SmolVLMProcessor.apply_chat_template uses for videos
        }
        return pre
