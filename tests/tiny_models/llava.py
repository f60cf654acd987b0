"""Tiny LLaVA-1.5 models built offline from transformers' own classes (``LlavaForConditionalGeneration`` with a
CLIP vision tower and a Llama text model, ``LlavaProcessor`` with CLIP's PIL image processor), for tests.

Dims follow transformers' own LLaVA tests (a 2-layer CLIP tower and text model, 32/64 wide); layouts differ in
patch size, crop size and feature selection. The tokenizer is smolvlm-tiny's (it has an ``<image>`` token)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

# LLaVA-1.5's conversation format (llava-hf/llava-1.5-*-hf): "USER: <image>\n... ASSISTANT:"
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] if message['content'] is string else "
    "message['content'][0]['text'] }}{{ ' ' }}"
    "{% else %}{{ message['role'].upper() + ': ' }}"
    "{% if message['content'] is string %}{{ message['content'] + ' ' }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}{{ '<image>\n' }}{% endif %}{% endfor %}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] + ' ' }}{% endif %}{% endfor %}"
    "{% endif %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


@dataclass(frozen=True)
class TinyLlavaSpec:
    text_layers: int = 2
    hidden: int = 64
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 128
    max_positions: int = 512
    vision_layers: int = 2
    vision_hidden: int = 32
    vision_heads: int = 4
    vision_intermediate: int = 64
    image_size: int = 56        # the tower's square (crop size)
    patch: int = 14
    shortest_edge: int = 64     # resize, then centre-crop to image_size
    feature_layer: int = -2
    select_strategy: str = "default"
    init_std: float = 0.1       # peaky random logits: varied greedy answers
    seed: int = 0


def build_tiny_llava(out_dir: str | Path, spec: TinyLlavaSpec = TinyLlavaSpec()) -> Path:
    from transformers import CLIPImageProcessorPil, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    from dream_export.presets.smolvlm_tiny.architecture import load_tokenizer

    tokenizer = load_tokenizer()
    out_dir = Path(out_dir)
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    eos_id = tokenizer.convert_tokens_to_ids("<end_of_utterance>")
    config = LlavaConfig(
        image_token_id=image_token_id,
        vision_feature_layer=spec.feature_layer,
        vision_feature_select_strategy=spec.select_strategy,
        projector_hidden_act="gelu",
        **_towers(spec, tokenizer, eos_id),
    )
    model = build_model(LlavaForConditionalGeneration, config, spec, tokenizer, eos_id)
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": spec.shortest_edge},
                                            crop_size={"height": spec.image_size, "width": spec.image_size})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=spec.patch,
                               vision_feature_select_strategy=spec.select_strategy, chat_template=LLAVA_CHAT_TEMPLATE,
                               image_token="<image>", num_additional_image_tokens=1)
    return save_model(out_dir, model, processor, spec)


@dataclass(frozen=True)
class TinyLlavaNextSpec(TinyLlavaSpec):
    # grid pinpoints in units of the tower's square (image_size): 1x2, 2x1, 2x2 and a 1x3 strip
    pinpoints: tuple = ((1, 2), (2, 1), (2, 2), (1, 3))


def build_tiny_llava_next(out_dir: str | Path, spec: TinyLlavaNextSpec = TinyLlavaNextSpec()) -> Path:
    import torch
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextImageProcessorPil, LlavaNextProcessor

    from dream_export.presets.smolvlm_tiny.architecture import load_tokenizer

    tokenizer = load_tokenizer()
    out_dir = Path(out_dir)
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    eos_id = tokenizer.convert_tokens_to_ids("<end_of_utterance>")
    pinpoints = [[h * spec.image_size, w * spec.image_size] for h, w in spec.pinpoints]
    config = LlavaNextConfig(
        image_token_id=image_token_id, image_grid_pinpoints=pinpoints,
        vision_feature_layer=spec.feature_layer, vision_feature_select_strategy=spec.select_strategy,
        **_towers(spec, tokenizer, eos_id),
    )
    model = build_model(LlavaNextForConditionalGeneration, config, spec, tokenizer, eos_id)
    with torch.no_grad():
        model.model.image_newline.normal_(0.0, 1.0)
    image_processor = LlavaNextImageProcessorPil(size={"shortest_edge": spec.image_size},
                                                 crop_size={"height": spec.image_size, "width": spec.image_size},
                                                 image_grid_pinpoints=pinpoints)
    processor = LlavaNextProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=spec.patch,
                                   vision_feature_select_strategy=spec.select_strategy,
                                   chat_template=LLAVA_CHAT_TEMPLATE, image_token="<image>", num_additional_image_tokens=1)
    return save_model(out_dir, model, processor, spec)


def _towers(spec, tokenizer, eos_id) -> dict:
    """The CLIP tower and Llama text model configs both LLaVA layouts use."""
    return dict(
        vision_config=dict(model_type="clip_vision_model", hidden_size=spec.vision_hidden,
                           intermediate_size=spec.vision_intermediate, num_hidden_layers=spec.vision_layers,
                           num_attention_heads=spec.vision_heads, image_size=spec.image_size, patch_size=spec.patch,
                           projection_dim=spec.vision_hidden, initializer_range=spec.init_std),
        text_config=dict(model_type="llama", vocab_size=len(tokenizer), hidden_size=spec.hidden,
                         intermediate_size=spec.intermediate, num_hidden_layers=spec.text_layers,
                         num_attention_heads=spec.heads, num_key_value_heads=spec.kv_heads,
                         head_dim=spec.hidden // spec.heads, max_position_embeddings=spec.max_positions,
                         rms_norm_eps=1e-5, rope_theta=10000.0, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=eos_id, pad_token_id=tokenizer.pad_token_id, initializer_range=spec.init_std))


def build_model(cls, config, spec, tokenizer, eos_id):
    import torch
    from transformers import GenerationConfig

    torch.manual_seed(spec.seed)
    model = cls(config).eval()
    with torch.no_grad():  # HF initialises with std initializer_range; make the text model's logits peaky
        for p in model.model.language_model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, spec.init_std)
    model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=eos_id,
                                               pad_token_id=tokenizer.pad_token_id)
    return model


def save_model(out_dir: Path, model, processor, spec) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    (out_dir / "tiny_spec.json").write_text(json.dumps(asdict(spec), indent=1))
    return out_dir
