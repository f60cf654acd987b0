"""smolvlm-tiny's architecture: small SmolVLM-architecture models built offline from transformers' own config classes.

Everything here goes through the same classes and ``save_pretrained`` / ``from_pretrained`` path as a
real SmolVLM checkpoint: an ``Idefics3ForConditionalGeneration`` (SigLIP-style vision tower, pixel-shuffle
connector, Llama text model) plus an ``Idefics3Processor`` (image splitting, chat template) around a
byte-level BPE tokenizer trained locally with ``tokenizers``.

The built-in model is ``TinyVLMSpec`` as its ``recipe`` sets it; tests and benchmarks build other shapes with
``build_tiny_vlm``. Deliberately not handled here: training (``recipe``) and anything downloaded.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

# SmolVLM's own chat template (HuggingFaceTB/SmolVLM-*-Instruct): one line per turn, images inline.
SMOLVLM_CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

# SmolVLM's special tokens, in the order its vocabulary has them (ids differ: our vocab is small).
SPECIAL_TOKENS = (
    ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>"]
    + [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]
)

TOKENIZER_DIR = Path(__file__).with_name("tokenizer")  # written by tokenizer_recipe


@dataclass(frozen=True)
class TinyVLMSpec:
    """Shape of a tiny SmolVLM; defaults are the built-in ``smolvlm-tiny``."""

    # text model: many thin layers, like SmolVLM-256M (30 layers of 576) scaled down
    text_layers: int = 12
    hidden: int = 128
    heads: int = 4
    kv_heads: int = 2                 # grouped-query attention, like SmolVLM (9 heads / 3 KV heads)
    intermediate: int = 384
    max_positions: int = 2048
    tie_embeddings: bool = False
    # vision tower: 64 px tiles, 8 px patches -> 64 patches -> pixel shuffle x2 -> 16 tokens per tile
    vision_layers: int = 4
    vision_hidden: int = 128
    vision_heads: int = 4
    vision_intermediate: int = 256
    tile: int = 64
    patch: int = 8
    scale_factor: int = 2
    image_splitting: bool = True
    longest_edge: int = 128          # resize target before splitting: up to 2x2 tiles + the global image
    image_mean: tuple = (0.5, 0.5, 0.5)
    image_std: tuple = (0.5, 0.5, 0.5)
    seed: int = 0
    vocab_size: int | None = None    # default: the tokenizer's size (larger = extra unused rows, for benchmarks)
    init_std: float = 0.02           # random-weight test models use larger values for peakier, varied logits

    @property
    def image_seq_len(self) -> int:
        return (self.tile // self.patch) ** 2 // (self.scale_factor ** 2)


def load_tokenizer():
    """The shipped byte-level BPE tokenizer as a transformers fast tokenizer."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(str(TOKENIZER_DIR))


def build_tokenizer(corpus: list[str], vocab_size: int = 1024):
    """Train the byte-level BPE tokenizer (deterministic for a fixed corpus) and wrap it for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<end_of_utterance>",
        unk_token="<|endoftext|>",
        pad_token="<|im_end|>",
        additional_special_tokens=["<fake_token_around_image>", "<image>", "<end_of_utterance>"],
        clean_up_tokenization_spaces=False,
    )


def build_tiny_vlm(out_dir: str | Path, spec: TinyVLMSpec = TinyVLMSpec(), tokenizer=None) -> Path:
    """Create a randomly initialised tiny SmolVLM (model + processor) and save it with ``save_pretrained``."""
    import torch
    from transformers import (
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3ImageProcessorPil,
        Idefics3Processor,
    )
    from transformers import GenerationConfig

    tokenizer = tokenizer or load_tokenizer()
    out_dir = Path(out_dir)
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    eos_id = tokenizer.convert_tokens_to_ids("<end_of_utterance>")
    config = Idefics3Config(
        image_token_id=image_token_id,
        scale_factor=spec.scale_factor,
        tie_word_embeddings=spec.tie_embeddings,
        vision_config=dict(
            hidden_size=spec.vision_hidden,
            intermediate_size=spec.vision_intermediate,
            num_hidden_layers=spec.vision_layers,
            num_attention_heads=spec.vision_heads,
            image_size=spec.tile,
            patch_size=spec.patch,
            initializer_range=spec.init_std,
        ),
        text_config=dict(
            model_type="llama",
            vocab_size=spec.vocab_size or len(tokenizer),
            hidden_size=spec.hidden,
            intermediate_size=spec.intermediate,
            num_hidden_layers=spec.text_layers,
            num_attention_heads=spec.heads,
            num_key_value_heads=spec.kv_heads,
            head_dim=spec.hidden // spec.heads,
            max_position_embeddings=spec.max_positions,
            rms_norm_eps=1e-5,
            rope_theta=10000.0,
            tie_word_embeddings=spec.tie_embeddings,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=eos_id,
            pad_token_id=tokenizer.pad_token_id,
            initializer_range=spec.init_std,
        ),
    )
    torch.manual_seed(spec.seed)
    model = Idefics3ForConditionalGeneration(config).eval()
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=eos_id, pad_token_id=tokenizer.pad_token_id
    )
    image_processor = Idefics3ImageProcessorPil(
        do_image_splitting=spec.image_splitting,
        size={"longest_edge": spec.longest_edge},
        max_image_size={"longest_edge": spec.tile},
        image_mean=list(spec.image_mean),
        image_std=list(spec.image_std),
    )
    processor = Idefics3Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        image_seq_len=spec.image_seq_len,
        chat_template=SMOLVLM_CHAT_TEMPLATE,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    (out_dir / "tiny_spec.json").write_text(json.dumps(asdict(spec), indent=1))
    return out_dir
