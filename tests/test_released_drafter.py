"""Released DREAM checkpoints (LLaVA-style key names) load strictly through the key mapping."""

import json

import pytest
import torch
from safetensors.torch import save_file

from dream_export.drafter.model import DrafterConfig, DreamDrafter
from dream_export.drafter.released import load_any, to_theirs
from dream_export.errors import DreamExportError

H, V = 64, 40


def _save_released(folder, drafter, drop=None, extra=None):
    folder.mkdir(parents=True, exist_ok=True)
    state = {to_theirs(k): v.contiguous() for k, v in drafter.state_dict().items()}
    if drop:
        state.pop(drop)
    if extra:
        state[extra] = torch.zeros(1)
    save_file(state, folder / "model.safetensors")
    cfg = drafter.config
    (folder / "config.json").write_text(json.dumps({
        "hidden_size": cfg.hidden_size, "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
        "intermediate_size": cfg.intermediate_size, "vocab_size": cfg.vocab_size, "rms_norm_eps": cfg.rms_norm_eps,
        "max_position_embeddings": cfg.max_position_embeddings, "rope_theta": cfg.rope_theta, "hidden_act": "silu"}))


@pytest.fixture
def drafter():
    torch.manual_seed(0)
    cfg = DrafterConfig(hidden_size=H, num_heads=4, num_kv_heads=2, head_dim=16, intermediate_size=96, vocab_size=V)
    d = DreamDrafter(cfg, torch.randn(V, H))
    with torch.no_grad():
        for p in d.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # gates and norms non-trivial, so a wrong mapping shows
    return d


def test_released_names_roundtrip(tmp_path, drafter):
    names = {to_theirs(k) for k in drafter.state_dict()}
    assert "layers.1.cross_attn.q_norm.weight" in names and "layers.1.cross_attn_attn_gate" in names
    assert "layers.0.input_layernorm.weight" not in names and "layers.2.input_layernorm.weight" in names
    _save_released(tmp_path / "ck", drafter)
    loaded = load_any(tmp_path / "ck", drafter.lm_head_weight)
    for k, v in drafter.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


def test_missing_and_unexpected_keys_are_listed(tmp_path, drafter):
    _save_released(tmp_path / "a", drafter, drop="layers.1.cross_attn.k_norm.weight")
    with pytest.raises(DreamExportError, match=r"missing: \['layers.1.cross_attn.k_norm.weight'\]"):
        load_any(tmp_path / "a", drafter.lm_head_weight)
    _save_released(tmp_path / "b", drafter, extra="fc.weight")
    with pytest.raises(DreamExportError, match=r"unexpected: \['fc.weight'\]"):
        load_any(tmp_path / "b", drafter.lm_head_weight)


def test_pickle_weights_are_refused(tmp_path, drafter):
    _save_released(tmp_path / "c", drafter)
    (tmp_path / "c" / "model.safetensors").rename(tmp_path / "c" / "pytorch_model.bin")
    with pytest.raises(DreamExportError, match="pickled weights are not loaded"):
        load_any(tmp_path / "c", drafter.lm_head_weight)
