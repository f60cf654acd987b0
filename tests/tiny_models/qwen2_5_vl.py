"""Tiny Qwen2.5-VL models built offline from transformers' own classes (``Qwen2_5_VLForConditionalGeneration``,
``Qwen2_5_VLProcessor`` with Qwen2-VL's PIL image processor), for tests. The processor needs a video processor,
hence torchvision: build these in the export-tv environment.

Dims follow transformers' own Qwen2.5-VL tests (a 2-layer, 32-wide ViT with windowed and full-attention blocks,
a small Qwen2 text model with M-RoPE sections); layouts differ in patch size, window size, which block attends
fully, head size and M-RoPE sections. The pixel budget is small (tens of tokens per image) so that windows are
ragged and prompts hold two images. The tokenizer is smolvlm-tiny's with Qwen's vision and turn tokens added."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# Qwen2.5-VL's chat template, reduced to what the tests use: ChatML turns, each image as
# <|vision_start|><|image_pad|><|vision_end|> before the text
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}"
    "{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
QWEN_TOKENS = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]


@dataclass(frozen=True)
class TinyQwen25VLSpec:
    text_layers: int = 2
    hidden: int = 64
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 128
    max_positions: int = 512
    mrope_section: tuple = (2, 3, 3)   # sums to head_dim / 2
    vision_layers: int = 2
    vision_hidden: int = 32
    vision_heads: int = 4
    vision_intermediate: int = 64
    patch: int = 8
    merge: int = 2
    window_size: int = 32          # pixels: 2 x 2 merged tokens per window
    fullatt_blocks: tuple = (1,)
    max_tokens: int = 48           # pixel budget, in merged tokens
    init_std: float = 0.1
    seed: int = 0


def build_tiny_qwen2_5_vl(out_dir: str | Path, spec: TinyQwen25VLSpec = TinyQwen25VLSpec()) -> Path:
    from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor,
                              Qwen2VLImageProcessorPil, Qwen2VLVideoProcessor)

    from dream_export.presets.smolvlm_tiny.architecture import load_tokenizer
    from .llava import build_model, save_model

    tokenizer = load_tokenizer()
    tokenizer.add_tokens(QWEN_TOKENS, special_tokens=True)
    out_dir = Path(out_dir)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_TOKENS}
    eos_id = ids["<|im_end|>"]
    config = Qwen2_5_VLConfig(
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        vision_config=dict(depth=spec.vision_layers, hidden_size=spec.vision_hidden,
                           intermediate_size=spec.vision_intermediate, num_heads=spec.vision_heads, in_channels=3,
                           out_hidden_size=spec.hidden, patch_size=spec.patch, spatial_merge_size=spec.merge,
                           temporal_patch_size=2, window_size=spec.window_size,
                           fullatt_block_indexes=list(spec.fullatt_blocks), tokens_per_second=2,
                           initializer_range=spec.init_std),
        text_config=dict(vocab_size=len(tokenizer), hidden_size=spec.hidden, intermediate_size=spec.intermediate,
                         num_hidden_layers=spec.text_layers, num_attention_heads=spec.heads,
                         num_key_value_heads=spec.kv_heads, max_position_embeddings=spec.max_positions,
                         rms_norm_eps=1e-6, use_sliding_window=False,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                          "mrope_section": list(spec.mrope_section)},
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=eos_id,
                         pad_token_id=tokenizer.pad_token_id, initializer_range=spec.init_std),
    )
    model = build_model(Qwen2_5_VLForConditionalGeneration, config, spec, tokenizer, eos_id)
    factor = spec.patch * spec.merge
    pixels = {"shortest_edge": factor * factor, "longest_edge": factor * factor * spec.max_tokens}
    kw = dict(patch_size=spec.patch, merge_size=spec.merge, temporal_patch_size=2)
    processor = Qwen2_5_VLProcessor(image_processor=Qwen2VLImageProcessorPil(size=pixels, **kw), tokenizer=tokenizer,
                                    video_processor=Qwen2VLVideoProcessor(size=pixels, **kw),
                                    chat_template=QWEN_CHAT_TEMPLATE)
    return save_model(out_dir, model, processor, spec)
