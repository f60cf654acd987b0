"""Tiny SmolVLM2 models built offline from transformers' own classes (``SmolVLMForConditionalGeneration``,
``SmolVLMProcessor`` with SmolVLM's PIL image processor and its video processor), for tests.

SmolVLM2 is SmolVLM's architecture (SigLIP tower, pixel-shuffle connector, Llama text model) with video: frames
sampled at ``fps`` (at most ``max_frames``), each resized to one tile, announced with a frame count and
timestamps in the prompt. Its processor needs torchvision (the video processor) and num2words, so these models
are built only where those exist (the ``export-tv`` extra; tests marked ``torchvision``)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

# SmolVLM2's chat template (HuggingFaceTB/SmolVLM2-*-Instruct), images and videos inline
SMOLVLM2_CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'] is string %}{{': ' + message['content']}}{% else %}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% elif line['type'] == 'video' %}{{ '<video>' }}{% endif %}"
    "{% endfor %}{% endif %}<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


@dataclass(frozen=True)
class TinySmolVLM2Spec:
    text_layers: int = 2
    hidden: int = 64
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 128
    max_positions: int = 2048
    vision_layers: int = 2
    vision_hidden: int = 32
    vision_heads: int = 4
    vision_intermediate: int = 64
    tile: int = 32
    patch: int = 8
    scale_factor: int = 2
    longest_edge: int = 64          # images: resize target before splitting into tiles
    image_splitting: bool = True
    video_fps: float = 1.0
    video_max_frames: int = 6
    video_longest_edge: int = 64    # frames: aspect-kept resize, then one tile each
    init_std: float = 0.1
    seed: int = 0


def build_tiny_smolvlm2(out_dir: str | Path, spec: TinySmolVLM2Spec = TinySmolVLM2Spec()) -> Path:
    import torch
    from transformers import (GenerationConfig, PreTrainedTokenizerFast, SmolVLMConfig, SmolVLMForConditionalGeneration,
                              SmolVLMImageProcessorPil, SmolVLMProcessor, SmolVLMVideoProcessor)

    from dream_export.presets.smolvlm_tiny.architecture import TOKENIZER_DIR

    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(TOKENIZER_DIR))
    tokenizer.add_tokens(["<video>"], special_tokens=True)
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    eos_id = tokenizer.convert_tokens_to_ids("<end_of_utterance>")
    config = SmolVLMConfig(
        image_token_id=image_token_id, scale_factor=spec.scale_factor,
        vision_config=dict(hidden_size=spec.vision_hidden, intermediate_size=spec.vision_intermediate,
                           num_hidden_layers=spec.vision_layers, num_attention_heads=spec.vision_heads,
                           image_size=spec.tile, patch_size=spec.patch, initializer_range=spec.init_std),
        text_config=dict(model_type="llama", vocab_size=len(tokenizer), hidden_size=spec.hidden,
                         intermediate_size=spec.intermediate, num_hidden_layers=spec.text_layers,
                         num_attention_heads=spec.heads, num_key_value_heads=spec.kv_heads,
                         head_dim=spec.hidden // spec.heads, max_position_embeddings=spec.max_positions,
                         rms_norm_eps=1e-5, rope_theta=10000.0, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=eos_id, pad_token_id=tokenizer.pad_token_id, initializer_range=spec.init_std))
    torch.manual_seed(spec.seed)
    model = SmolVLMForConditionalGeneration(config).eval()
    model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=eos_id,
                                               pad_token_id=tokenizer.pad_token_id)
    image_processor = SmolVLMImageProcessorPil(do_image_splitting=spec.image_splitting,
                                               size={"longest_edge": spec.longest_edge},
                                               max_image_size={"longest_edge": spec.tile},
                                               image_mean=[0.5] * 3, image_std=[0.5] * 3)
    video_processor = SmolVLMVideoProcessor(
        video_sampling={"fps": spec.video_fps, "max_frames": spec.video_max_frames,
                        "video_size": {"longest_edge": spec.video_longest_edge}},
        size={"longest_edge": spec.video_longest_edge}, max_image_size={"longest_edge": spec.tile},
        image_mean=[0.5] * 3, image_std=[0.5] * 3, do_sample_frames=True)
    seq = (spec.tile // spec.patch) ** 2 // spec.scale_factor ** 2
    processor = SmolVLMProcessor(image_processor=image_processor, tokenizer=tokenizer, video_processor=video_processor,
                                 image_seq_len=seq, chat_template=SMOLVLM2_CHAT_TEMPLATE)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    (out_dir / "tiny_spec.json").write_text(json.dumps(asdict(spec), indent=1))
    return out_dir
