"""A drafter's configuration and its folder on disk: ``drafter_config.json`` beside ``model.safetensors``.

Both architectures (``model.DreamDrafter``, ``concat.ConcatDrafter``) save and check their weights here, so
neither needs the other; picking the architecture a folder names is the factory's job (``model.build_drafter``).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from torch import nn

from ..errors import DreamExportError

CONFIG_NAME = "drafter_config.json"
WEIGHTS_NAME = "model.safetensors"


@dataclass
class DrafterConfig:
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int                        # the target's vocabulary (its LM head)
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048
    draft_vocab: list[int] | None = None   # EAGLE-3 style reduced head: draft id -> target id (d2t)
    mid_layer_candidates: list[int] = field(default_factory=list)  # entropy-selected target layers (training)
    keep_visual: float = 0.75              # visual token compression: fraction of image tokens the drafter keeps
    arch: str = "dream"                    # "dream" (cross-attention fusion) or "concat" (EAGLE-style ablation)

    @classmethod
    def for_target(cls, text_config, **overrides) -> "DrafterConfig":
        heads = text_config.num_attention_heads
        layers = text_config.num_hidden_layers
        cfg = dict(
            hidden_size=text_config.hidden_size,
            num_heads=heads,
            num_kv_heads=getattr(text_config, "num_key_value_heads", None) or heads,
            head_dim=getattr(text_config, "head_dim", None) or text_config.hidden_size // heads,
            intermediate_size=text_config.intermediate_size,
            vocab_size=text_config.vocab_size,
            rms_norm_eps=text_config.rms_norm_eps,
            rope_theta=_rope_theta(text_config),
            max_position_embeddings=text_config.max_position_embeddings,
            # reference code: layers 1 .. int(0.4 L) - 2 (at least layer 1)
            mid_layer_candidates=list(range(1, max(2, int(0.4 * layers) - 1))),
        )
        cfg.update(overrides)
        return cls(**cfg)

    @property
    def draft_vocab_size(self) -> int:
        return len(self.draft_vocab) if self.draft_vocab else self.vocab_size

    def llama_config(self):
        from transformers import LlamaConfig

        return LlamaConfig(
            hidden_size=self.hidden_size, num_attention_heads=self.num_heads, num_key_value_heads=self.num_kv_heads,
            head_dim=self.head_dim, intermediate_size=self.intermediate_size, rms_norm_eps=self.rms_norm_eps,
            rope_theta=self.rope_theta, max_position_embeddings=self.max_position_embeddings,
            vocab_size=self.vocab_size, num_hidden_layers=2, attn_implementation="eager",
        )

    def save(self, folder: Path) -> None:
        (Path(folder) / CONFIG_NAME).write_text(json.dumps(asdict(self), indent=1))

    @classmethod
    def load(cls, folder: Path) -> "DrafterConfig":
        return cls(**json.loads((Path(folder) / CONFIG_NAME).read_text()))


def _rope_theta(text_config) -> float:
    rp = getattr(text_config, "rope_parameters", None) or {}
    if isinstance(rp.get("full_attention"), dict):  # one set per layer type (Gemma 3): the global layers' base
        rp = rp["full_attention"]
    return float(rp.get("rope_theta", getattr(text_config, "rope_theta", 10000.0)))


def drafter_folder(path: Path | None) -> Path | None:
    """A drafter argument (``--drafter``, ``--init``) names the drafter folder itself or the folder given to
    ``dream-train --out`` (which holds it as ``drafter/``)."""
    if path is not None and not (path / CONFIG_NAME).is_file() and (path / "drafter" / CONFIG_NAME).is_file():
        return path / "drafter"
    return path


def save_drafter(model: nn.Module, folder) -> None:
    """``model.config`` and the weights (the target's head, a non-persistent buffer, is not saved)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.config.save(folder)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / WEIGHTS_NAME)


def load_strict(model: nn.Module, state: dict, source: str) -> None:
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise DreamExportError(
            f"{source}: weights do not match the drafter; missing keys: {sorted(result.missing_keys)}; "
            f"unexpected keys: {sorted(result.unexpected_keys)}"
        )
