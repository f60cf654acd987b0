"""Gemma 3 family (``Gemma3ForConditionalGeneration``): a SigLIP tower whose output is average-pooled to
``mm_tokens_per_image`` tokens and projected (``Gemma3MultiModalProjector``), and a Gemma 3 text model.

What Gemma 3 brings, each as a generic rule the exporter core and the runtime read from this adapter:
- sliding-window layers interleaved with global ones (``layer_types``), each with its own rotary base: the decoder
  graph masks keys at or beyond the window per layer, measured in positions, so a draft tree's window is the one
  its path has (``TargetAdapter.attention_windows`` / ``layer_position_embeddings``);
- image tokens of one image attend to each other in the prompt (``image_attention = "bidirectional"``; the runtime
  opens each image block of the prefill mask, as transformers does from ``token_type_ids``);
- token embeddings scaled by sqrt(hidden) (``embed_scale``: the bundle keeps the raw matrix, shared with the tied
  head), the final logit soft-cap when the config has one, and the prompt's image text
  "\\n\\n<start_of_image>" + image tokens + "<end_of_image>\\n\\n" in place of each ``<start_of_image>``.
Pan-and-scan (extra crops) is off by default in transformers and refused here; one image = one square."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import DreamExportError
from .base import TargetAdapter, register_adapter, stacked_features
from .shared import clip_preprocessing


class _Gemma3Vision(nn.Module):
    """pixel_values [T,3,S,S] -> image_embeds [T, mm_tokens_per_image, H], as Gemma3Model.get_image_features."""

    def __init__(self, model):
        super().__init__()
        self.tower = model.model.vision_tower
        self.projector = model.model.multi_modal_projector

    def forward(self, pixel_values):
        return self.projector(self.tower(pixel_values=pixel_values).last_hidden_state)


@register_adapter
class Gemma3Adapter(TargetAdapter):
    model_types = ("gemma3",)
    family = "gemma3"

    def __init__(self, model, processor):
        super().__init__(model, processor)
        tcfg = model.config.text_config
        if getattr(tcfg, "use_bidirectional_attention", False):
            raise DreamExportError("Gemma 3 with use_bidirectional_attention (an embedding model): expected a causal "
                                   "text model")
        ip = processor.image_processor
        if getattr(ip, "do_pan_and_scan", False):
            raise DreamExportError("the image processor has do_pan_and_scan=True: expected False (one square per "
                                   "image; pan-and-scan crops are not supported)")
        side = (ip.size.get("height"), ip.size.get("width"))
        vside = model.config.vision_config.image_size
        if side != (vside, vside):
            raise DreamExportError(f"image processor size {ip.size} != vision_config.image_size {vside}: expected the "
                                   f"processor to produce the tower's square")
        if processor.image_seq_length != model.config.mm_tokens_per_image:
            raise DreamExportError(f"processor image_seq_length {processor.image_seq_length} != mm_tokens_per_image "
                                   f"{model.config.mm_tokens_per_image}")

    @property
    def text_model(self):
        return self.model.model.language_model

    def layer_position_embeddings(self, hidden, position_ids) -> list:
        """Sliding and global layers have rotary bases of their own (10k / 1M in the released models)."""
        rot = self.rotary_emb()
        types = list(self.text_config.layer_types[: len(self.decoder_layers())])
        per_type = {t: rot(hidden, position_ids, t) for t in dict.fromkeys(types)}
        return [per_type[t] for t in types]

    def final_logits(self, logits):
        cap = self.text_config.final_logit_softcapping
        if cap is None:
            return logits
        return torch.tanh(logits / cap) * cap

    def image_attention(self) -> str:
        return "bidirectional"

    def fused_cpu_graph(self) -> bool:
        """No fused ORT-CPU graph: com.microsoft.GroupQueryAttention is always causal over the new tokens, so it
        cannot let a prompt's image tokens see the later tokens of their image (measured: a two-image prompt answers
        differently through it). The CPU runs ``decoder.onnx``."""
        return False

    def vision_module(self):
        return _Gemma3Vision(self.model)

    def preprocessing(self) -> dict[str, Any]:
        proc = self.processor
        tok = proc.tokenizer
        n = int(self.model.config.mm_tokens_per_image)
        tokens = tok.image_token * n
        if proc.full_image_sequence.count(tokens) != 1:
            raise DreamExportError(f"the processor's image text {proc.full_image_sequence[:60]!r}...: expected one run "
                                   f"of {n} {tok.image_token} tokens")
        prefix, suffix = proc.full_image_sequence.split(tokens)
        pre = clip_preprocessing(proc.image_processor)
        pre.update(
            image_seq_len=n,
            tiles_per_image=1,
            image_token=tok.image_token,               # repeated image_seq_len times: where the image embeddings go
            image_token_id=self.image_token_id,
            image_placeholder=proc.boi_token,          # what the chat template writes per image
            image_prefix=prefix,
            image_suffix=suffix,
            # the chat template writes <bos> itself: tokenised as apply_chat_template(tokenize=True) does
            add_special_tokens="bos_token" not in self.chat_template(),
            bos_token_id=tok.bos_token_id,
        )
        return pre

    def hf_image_features(self, pixel_values, **_):
        out = self.model.model.get_image_features(pixel_values=pixel_values)
        return stacked_features(out)
