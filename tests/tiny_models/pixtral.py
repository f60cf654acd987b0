"""Tiny Pixtral models built offline from transformers' own classes (``LlavaForConditionalGeneration`` with a
``PixtralVisionModel`` tower and a Mistral text model, or with ``merge > 1`` Mistral-Small-3.1's
``Mistral3ForConditionalGeneration``; ``PixtralProcessor`` with Pixtral's PIL image processor), for tests. The processor needs torchvision (transformers declares it so): build these in the export-tv environment.

Dims follow transformers' own Pixtral tests (a 2-layer, 32-wide tower with axial 2-D rotary, a small text model);
layouts differ in patch size, longest edge and the feature layer. The tokenizer is smolvlm-tiny's with Pixtral's
``[IMG]``, ``[IMG_BREAK]``, ``[IMG_END]`` and instruction tokens added."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# Pixtral's chat template (mistral-community/pixtral-12b), reduced to what the tests use: <s>, [INST] turns, an
# [IMG] per image before the text
PIXTRAL_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '[INST]' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}{{ '[IMG]' }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}{{ '[/INST]' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ message['content'] if message['content'] is string else message['content'][0]['text'] }}{{ eos_token }}"
    "{% else %}{{ message['content'] if message['content'] is string else message['content'][0]['text'] }}"
    "{% endif %}{% endfor %}"
)
PIXTRAL_TOKENS = ["[IMG]", "[IMG_BREAK]", "[IMG_END]", "[INST]", "[/INST]"]


@dataclass(frozen=True)
class TinyPixtralSpec:
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
    patch: int = 8
    longest_edge: int = 64      # at most 8 x 8 patches per image
    feature_layer: int = -1     # Pixtral-12B reads the tower's last layer
    merge: int = 1              # > 1: Mistral-Small-3.1's layout (Mistral3ForConditionalGeneration, a patch merger)
    init_std: float = 0.1       # peaky random logits: varied greedy answers
    seed: int = 0


def build_tiny_pixtral(out_dir: str | Path, spec: TinyPixtralSpec = TinyPixtralSpec()) -> Path:
    from transformers import (LlavaConfig, LlavaForConditionalGeneration, Mistral3Config,
                              Mistral3ForConditionalGeneration, PixtralImageProcessorPil, PixtralProcessor)

    from dream_export.presets.smolvlm_tiny.architecture import load_tokenizer
    from .llava import build_model, save_model

    tokenizer = load_tokenizer()
    tokenizer.add_tokens(PIXTRAL_TOKENS, special_tokens=True)
    out_dir = Path(out_dir)
    eos_id = tokenizer.convert_tokens_to_ids("<end_of_utterance>")
    if spec.merge > 1:
        cls, config_cls = Mistral3ForConditionalGeneration, Mistral3Config
        layout = dict(spatial_merge_size=spec.merge)
    else:
        cls, config_cls = LlavaForConditionalGeneration, LlavaConfig
        layout = dict(vision_feature_select_strategy="full")
    config = config_cls(
        image_token_id=tokenizer.convert_tokens_to_ids("[IMG]"),
        vision_feature_layer=spec.feature_layer,
        projector_hidden_act="gelu",
        **layout,
        vision_config=dict(model_type="pixtral", hidden_size=spec.vision_hidden, intermediate_size=spec.vision_intermediate,
                           num_hidden_layers=spec.vision_layers, num_attention_heads=spec.vision_heads,
                           head_dim=spec.vision_hidden // spec.vision_heads, image_size=spec.longest_edge,
                           patch_size=spec.patch, initializer_range=spec.init_std),
        text_config=dict(model_type="mistral", vocab_size=len(tokenizer), hidden_size=spec.hidden,
                         intermediate_size=spec.intermediate, num_hidden_layers=spec.text_layers,
                         num_attention_heads=spec.heads, num_key_value_heads=spec.kv_heads,
                         head_dim=spec.hidden // spec.heads, max_position_embeddings=spec.max_positions,
                         rms_norm_eps=1e-5, rope_theta=1e6, sliding_window=None, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=eos_id, pad_token_id=tokenizer.pad_token_id, initializer_range=spec.init_std),
    )
    model = build_model(cls, config, spec, tokenizer, eos_id)
    image_processor = PixtralImageProcessorPil(size={"longest_edge": spec.longest_edge},
                                               patch_size={"height": spec.patch, "width": spec.patch})
    processor = PixtralProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=spec.patch,
                                 spatial_merge_size=spec.merge, chat_template=PIXTRAL_CHAT_TEMPLATE)
    return save_model(out_dir, model, processor, spec)
