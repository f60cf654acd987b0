"""Load drafters released with the DREAM reference code (SAI-Lab-NYU/DREAM), strictly.

Their checkpoint is ``config.json`` plus ``model.safetensors`` with keys ``layers.0.*`` (Llama layer
without input norm), ``layers.1.*`` (gated cross-attention layer), ``layers.2.*`` (Llama layer) and
``norm.weight``; no embeddings or head (those are the target's). Every key must map onto our drafter
and every parameter of ours must be provided: anything else is an error that lists the keys.
Pickled ``pytorch_model.bin`` files are refused (convert them to safetensors where you trust them).
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import DreamExportError
from .config import CONFIG_NAME, DrafterConfig
from .model import DreamDrafter

# theirs -> ours, for the cross-attention layer (layers.0 / layers.2 / norm map by prefix)
_CROSS = {
    "layers.1.input_layernorm.weight": "cross.norm.weight",
    "layers.1.cross_attn.q_proj.weight": "cross.q_proj.weight",
    "layers.1.cross_attn.k_proj.weight": "cross.k_proj.weight",
    "layers.1.cross_attn.v_proj.weight": "cross.v_proj.weight",
    "layers.1.cross_attn.o_proj.weight": "cross.o_proj.weight",
    "layers.1.cross_attn.q_norm.weight": "cross.q_norm.weight",
    "layers.1.cross_attn.k_norm.weight": "cross.k_norm.weight",
    "layers.1.cross_attn_attn_gate": "cross.attn_gate",
    "layers.1.post_attention_layernorm.weight": "cross.mlp_norm.weight",
    "layers.1.mlp.gate_proj.weight": "cross.mlp.gate_proj.weight",
    "layers.1.mlp.up_proj.weight": "cross.mlp.up_proj.weight",
    "layers.1.mlp.down_proj.weight": "cross.mlp.down_proj.weight",
    "layers.1.cross_attn_mlp_gate": "cross.mlp_gate",
}


def to_ours(key: str) -> str | None:
    if key in _CROSS:
        return _CROSS[key]
    if key.startswith("layers.0."):
        return "block0." + key[len("layers.0."):]
    if key.startswith("layers.2."):
        return "block2." + key[len("layers.2."):]
    if key == "norm.weight":
        return key
    return None


def to_theirs(key: str) -> str:
    inverse = {v: k for k, v in _CROSS.items()}
    if key in inverse:
        return inverse[key]
    for ours, theirs in (("block0.", "layers.0."), ("block2.", "layers.2.")):
        if key.startswith(ours):
            return theirs + key[len(ours):]
    return key


def is_released_format(folder: Path) -> bool:
    folder = Path(folder)
    return (folder / "config.json").is_file() and not (folder / CONFIG_NAME).is_file()


def load_released(folder, lm_head_weight, target_text_config=None) -> DreamDrafter:
    from safetensors.torch import load_file

    folder = Path(folder)
    weights = folder / "model.safetensors"
    if not weights.is_file():
        if (folder / "pytorch_model.bin").is_file():
            raise DreamExportError(
                f"{folder / 'pytorch_model.bin'}: pickled weights are not loaded; convert them where you trust the file: "
                "python -c \"import torch, safetensors.torch as s; s.save_file(torch.load('pytorch_model.bin', "
                "weights_only=True), 'model.safetensors')\""
            )
        raise DreamExportError(f"{folder}: no model.safetensors; expected a DREAM drafter checkpoint")
    raw = json.loads((folder / "config.json").read_text())
    try:
        heads = raw["num_attention_heads"]
        cfg = DrafterConfig(
            hidden_size=raw["hidden_size"], num_heads=heads, num_kv_heads=raw.get("num_key_value_heads", heads),
            head_dim=raw.get("head_dim") or raw["hidden_size"] // heads, intermediate_size=raw["intermediate_size"],
            vocab_size=raw["vocab_size"], rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
            rope_theta=raw.get("rope_theta", 10000.0), max_position_embeddings=raw["max_position_embeddings"],
        )
    except KeyError as exc:
        raise DreamExportError(f"{folder / 'config.json'}: missing field {exc}; expected a Llama-style drafter config") from exc
    if lm_head_weight.shape != (cfg.vocab_size, cfg.hidden_size):
        raise DreamExportError(
            f"{folder}: drafter vocab/hidden {cfg.vocab_size}/{cfg.hidden_size} do not match the target head {tuple(lm_head_weight.shape)}"
        )
    state = load_file(weights)
    mapped, unexpected = {}, []
    for key, value in state.items():
        ours = to_ours(key)
        (unexpected.append(key) if ours is None else mapped.__setitem__(ours, value))
    model = DreamDrafter(cfg, lm_head_weight)
    expected = set(model.state_dict())
    unexpected += [to_theirs(k) for k in mapped if k not in expected]
    missing = [to_theirs(k) for k in expected if k not in mapped]
    if missing or unexpected:
        raise DreamExportError(f"{weights}: keys do not match a DREAM drafter; missing: {sorted(missing)}; unexpected: {sorted(unexpected)}")
    model.load_state_dict({k: v for k, v in mapped.items()}, strict=True)
    return model.eval()


def load_any(folder, lm_head_weight) -> DreamDrafter:
    """Our own drafter folder (drafter_config.json) or a released DREAM checkpoint (config.json)."""
    folder = Path(folder)
    if is_released_format(folder):
        return load_released(folder, lm_head_weight)
    if not (folder / CONFIG_NAME).is_file():
        raise DreamExportError(f"{folder}: no {CONFIG_NAME} or config.json; expected a dream-train output or a DREAM checkpoint")
    return DreamDrafter.load(folder, lm_head_weight)
