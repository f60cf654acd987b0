"""Qwen2.5-VL family (``Qwen2_5_VLForConditionalGeneration``): images at their own resolution (``smart_resize`` to
multiples of patch x merge within a pixel budget), a ViT with 2-D rotary positions and windowed attention in all
but a few full-attention layers, a 2x2 patch merger, and a Qwen2 text model with multimodal rotary positions.

What Qwen2.5-VL brings, as generic rules:
- M-RoPE: position ids [3, 1, Q] (time, height, width) in the decoder graphs (``TargetAdapter.rope_axes``); the
  runtime computes them from the prompt's image grids and continues past the prompt at index + delta on all three
  axes, draft-tree nodes at the last position plus depth, as transformers' ``get_rope_index`` does
  (``runtime/rope.py``);
- a vision graph called once per image whose inputs, beside the patches, are what transformers computes in Python
  loops from the grid (each patch's row/column, the window order, each patch's window, the inverse order): the runtime's
  ``qwen2_vl`` preprocessing computes them in numpy, and the export checks the graph fed that way against
  transformers' own ``get_image_features``.
Videos (``<|video_pad|>``, temporal positions by ``second_per_grid_ts``) are not supported yet: images only."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import DreamExportError
from .base import TargetAdapter, pixel_rules, register_adapter, stacked_features

VISION_MASK_MIN = -1e9  # the window mask's "blocked" value (FP32; softmax gives it weight 0)


class _QwenVision(nn.Module):
    """One image's patches [N, C*T*P*P] (the processor's order) -> image_embeds [1, N/merge^2, H], as
    ``Qwen2_5_VisionTransformerPretrainedModel`` computes them, with the grid-derived indices as inputs."""

    def __init__(self, model):
        super().__init__()
        self.visual = model.model.visual

    def forward(self, pixel_values, vision_positions, window_index, window_ids, reverse_index):
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision, eager_attention_forward

        v = self.visual
        unit = v.spatial_merge_unit
        h = v.patch_embed(pixel_values)
        n = h.shape[0]

        def windowed(x):  # reorder merge-blocks into window order
            return x.reshape(n // unit, unit, x.shape[-1])[window_index].reshape(n, x.shape[-1])

        h = windowed(h)
        cos, sin = v.rotary_pos_emb(h, vision_positions)
        cos, sin = windowed(cos), windowed(sin)
        # window_ids: each patch's window (in window order); a patch attends within its window in windowed blocks
        same = window_ids[:, None] == window_ids[None, :]
        window_mask = torch.where(same, 0.0, VISION_MASK_MIN)[None, None].to(h.dtype)
        for i, blk in enumerate(v.blocks):
            attn = blk.attn
            x = blk.norm1(h)
            q, k, val = attn.qkv(x).reshape(n, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
            q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)
            q, k, val = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, val))
            mask = None if i in v.fullatt_block_indexes else window_mask  # one image: full attention is unmasked
            out, _ = eager_attention_forward(attn, q, k, val, attention_mask=mask, scaling=attn.scaling)
            h = h + attn.proj(out.reshape(n, -1))
            h = h + blk.mlp(blk.norm2(h))
        return v.merger(h)[reverse_index][None]


@register_adapter
class Qwen25VLAdapter(TargetAdapter):
    model_types = ("qwen2_5_vl",)
    family = "qwen2_5_vl"

    def __init__(self, model, processor):
        super().__init__(model, processor)
        if any(w is not None for w in self.attention_windows()):
            raise DreamExportError("Qwen2.5-VL text model with use_sliding_window: expected full attention (the "
                                   "released models do not use the window)")
        vcfg, ip = model.config.vision_config, processor.image_processor
        for name in ("patch_size", "merge_size", "temporal_patch_size"):
            mine = vcfg.spatial_merge_size if name == "merge_size" else getattr(vcfg, name)
            if int(getattr(ip, name)) != int(mine):
                raise DreamExportError(f"image processor {name} {getattr(ip, name)} != the vision tower's {mine}")
        size = dict(ip.size)
        if not size.get("shortest_edge") or not size.get("longest_edge"):
            raise DreamExportError(f"image processor size {size}: expected shortest_edge / longest_edge (min / max pixels)")
        self.patch, self.merge = int(vcfg.patch_size), int(vcfg.spatial_merge_size)
        self.min_pixels, self.max_pixels = int(size["shortest_edge"]), int(size["longest_edge"])
        self.window_tokens = int(vcfg.window_size) // self.merge // self.patch
        if self.window_tokens < 1:
            raise DreamExportError(f"vision window_size {vcfg.window_size}: expected at least patch x merge "
                                   f"({self.patch * self.merge}) pixels")

    @property
    def text_model(self):
        return self.model.model.language_model

    def rope_axes(self) -> int:
        return 3

    def vision_module(self):
        return _QwenVision(self.model)

    def vision_input_shape(self) -> tuple[int, int, int]:
        vcfg = self.model.config.vision_config
        return (int(vcfg.in_channels), self.patch, self.patch)

    def image_seq_len(self) -> int:
        """The most image tokens one image can take (the pixel budget in merged patches)."""
        return max(1, self.max_pixels // (self.patch * self.merge) ** 2)

    def _preprocessor(self):
        from runtime.preprocess import Qwen2VLPreprocessor

        return Qwen2VLPreprocessor(self.preprocessing())

    def vision_graph(self, hidden: int, seed: int = 0):
        from ..export.specs import GraphSpec, TensorSpec

        vcfg = self.model.config.vision_config
        dim = int(vcfg.in_channels) * int(vcfg.temporal_patch_size) * self.patch * self.patch
        spec = GraphSpec(
            name="vision", file="vision.onnx",
            inputs=(TensorSpec("pixel_values", "float32", ("patches", dim)),
                    TensorSpec("vision_positions", "int64", ("patches", 2)),
                    TensorSpec("window_index", "int64", ("tokens",)),
                    TensorSpec("window_ids", "int64", ("patches",)),
                    TensorSpec("reverse_index", "int64", ("tokens",))),
            outputs=(TensorSpec("image_embeds", "float32", (1, "tokens", hidden)),),
            atol=1e-3)
        pre, rng = self._preprocessor(), np.random.default_rng(seed + 1)
        w, m = self.window_tokens, self.merge
        # grids in patches: several windows with a ragged edge, a tall one, and a single merged token
        grids = [((2 * w + 1) * m, (w + 1) * m), ((w + 2) * m, m), (m, m)]
        examples = []
        for gh, gw in grids:
            feeds = {"pixel_values": rng.uniform(-1, 1, (gh * gw, dim)).astype(np.float32), **pre.vision_feeds(gh, gw)}
            examples.append((f"{gh}x{gw}patches", feeds))
        names = ("pixel_values", "vision_positions", "window_index", "window_ids", "reverse_index")
        self.check_vision_module([(f"{gh}x{gw}-patch", tuple(f[k] for k in names),  # the runtime's window order
                                   {"pixel_values": torch.from_numpy(f["pixel_values"]),
                                    "image_grid_thw": torch.tensor([[1, gh, gw]])})
                                  for (gh, gw), (_, f) in zip(grids, examples)])
        return spec, examples

    def preprocessing(self) -> dict[str, Any]:
        proc, ip = self.processor, self.processor.image_processor
        tok = proc.tokenizer
        unit = self.merge * self.merge
        max_patches = self.image_seq_len() * unit
        return {
            "kind": "qwen2_vl",
            "vision_call": "per_image",
            "vision_profile": {"patches": [unit, max(unit, max_patches // 4), max_patches],
                               "tokens": [1, max(1, max_patches // 4 // unit), max_patches // unit]},
            **pixel_rules(ip),
            "min_pixels": self.min_pixels,
            "max_pixels": self.max_pixels,
            "patch_size": self.patch,
            "merge_size": self.merge,
            "temporal_patch_size": int(ip.temporal_patch_size),
            "window_tokens": self.window_tokens,
            "image_seq_len": self.image_seq_len(),
            "tiles_per_image": 1,
            "image_token": proc.image_token,
            "image_token_id": self.image_token_id,
            "add_special_tokens": "bos_token" not in self.chat_template(),
            "bos_token_id": tok.bos_token_id,
        }

    def hf_image_features(self, pixel_values, image_grid_thw=None, **_):
        out = self.model.model.get_image_features(pixel_values=pixel_values, image_grid_thw=image_grid_thw)
        return stacked_features(out)
