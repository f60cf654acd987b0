"""Tiny Gemma 3 models built offline from transformers' own classes (``Gemma3ForConditionalGeneration`` with a
SigLIP tower and a Gemma 3 text model, ``Gemma3Processor`` with Gemma 3's PIL image processor), for tests.

Dims follow transformers' own Gemma 3 tests (a 2-layer SigLIP tower, a small text model with interleaved
sliding-window and global layers); the window is short (a few dozen positions) so that prompts, answers and draft
trees all cross it. The tokenizer is smolvlm-tiny's, with Gemma 3's image and turn tokens added."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

# Gemma 3's chat template (google/gemma-3-*-it), reduced to what the tests use: <bos>, turns, images as
# <start_of_image>, the assistant role named "model"
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<start_of_turn>' + ('model' if message['role'] == 'assistant' else message['role']) + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] | trim }}{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}{{ '<start_of_image>' }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] | trim }}{% endif %}{% endfor %}{% endif %}"
    "{{ '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)


@dataclass(frozen=True)
class TinyGemma3Spec:
    text_layers: int = 4
    hidden: int = 64
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 16
    intermediate: int = 128
    max_positions: int = 512
    sliding_window: int = 24
    layer_types: tuple = ("sliding_attention", "sliding_attention", "full_attention", "sliding_attention")
    final_logit_softcapping: float | None = None
    vision_layers: int = 2
    vision_hidden: int = 32
    vision_heads: int = 4
    vision_intermediate: int = 64
    image_size: int = 56
    patch: int = 14
    tokens_per_image: int = 4      # the projector average-pools the (image_size / patch)^2 patches to this many
    init_std: float = 0.02        # transformers' initializer_range (wider makes Gemma's greedy answers one token)
    seed: int = 0


def build_tiny_gemma3(out_dir: str | Path, spec: TinyGemma3Spec = TinyGemma3Spec()) -> Path:
    import torch
    from transformers import (Gemma3Config, Gemma3ForConditionalGeneration, Gemma3ImageProcessorPil, Gemma3Processor,
                              GenerationConfig, PreTrainedTokenizerFast)

    from dream_export.presets.smolvlm_tiny.architecture import TOKENIZER_DIR

    tokenizer = PreTrainedTokenizerFast.from_pretrained(
        str(TOKENIZER_DIR),
        extra_special_tokens={"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                              "image_token": "<image_soft_token>"})
    tokenizer.add_tokens(["<start_of_turn>", "<end_of_turn>"], special_tokens=True)
    eot = tokenizer.convert_tokens_to_ids("<end_of_turn>")
    config = Gemma3Config(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=spec.hidden, intermediate_size=spec.intermediate,
                         num_hidden_layers=spec.text_layers, num_attention_heads=spec.heads,
                         num_key_value_heads=spec.kv_heads, head_dim=spec.head_dim,
                         max_position_embeddings=spec.max_positions, sliding_window=spec.sliding_window,
                         layer_types=list(spec.layer_types), query_pre_attn_scalar=spec.head_dim, rms_norm_eps=1e-6,
                         final_logit_softcapping=spec.final_logit_softcapping, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=eot, pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(model_type="siglip_vision_model", hidden_size=spec.vision_hidden,
                           intermediate_size=spec.vision_intermediate, num_hidden_layers=spec.vision_layers,
                           num_attention_heads=spec.vision_heads, image_size=spec.image_size, patch_size=spec.patch),
        mm_tokens_per_image=spec.tokens_per_image, boi_token_index=tokenizer.boi_token_id,
        eoi_token_index=tokenizer.eoi_token_id, image_token_index=tokenizer.image_token_id)
    torch.manual_seed(spec.seed)
    model = Gemma3ForConditionalGeneration(config).eval()
    with torch.no_grad():  # peaky random logits: varied greedy answers
        for p in model.model.language_model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, spec.init_std)
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(0.0, spec.init_std)
    model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=eot,
                                               pad_token_id=tokenizer.pad_token_id)
    image_processor = Gemma3ImageProcessorPil(size={"height": spec.image_size, "width": spec.image_size})
    processor = Gemma3Processor(image_processor=image_processor, tokenizer=tokenizer, chat_template=GEMMA3_CHAT_TEMPLATE,
                                image_seq_length=spec.tokens_per_image)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    (out_dir / "tiny_spec.json").write_text(json.dumps(asdict(spec), indent=1))
    return out_dir
