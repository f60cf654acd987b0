"""The DREAM drafter (arXiv 2505.19201): self-attention block, gated cross-attention block over the
target's last-layer features, self-attention block, final norm; the target's frozen embeddings and head.

Alignment (EAGLE's one-step shift): the query at position i carries token x_i and may attend memory
entries f_j with j < i; its output predicts the target's feature f_i (whose LM head gives x_{i+1}).
While drafting, the drafter's own predicted features are appended to the memory, and the tree mask
applies to the cross-attention as well as to the self-attention (the reference code forgets the
former). Masks, positions and caches are explicit arguments; nothing is stored on the module.

Also here: ``build_drafter``, the factory that picks the architecture a config names (this one or the
EAGLE-style ablation in ``concat.py``), which ``DreamDrafter.load`` uses. The configuration and the
on-disk folder are ``config.py``.

Deliberately not here: the target (features come in as tensors), training losses (train/), the tree
search (runtime/speculative.py).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..errors import DreamExportError
from .concat import ConcatDrafter
from .config import WEIGHTS_NAME, DrafterConfig, load_strict, save_drafter
from .plain_kv import PlainKV


class GatedCrossAttention(nn.Module):
    """Queries from the draft stream; keys/values from memory features; per-head RMSNorm on q and k; no RoPE;
    both residual branches scaled by tanh(gate), gates starting at 0."""

    def __init__(self, cfg: DrafterConfig):
        super().__init__()
        from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm

        h, hd = cfg.hidden_size, cfg.head_dim
        self.heads, self.kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, hd
        self.norm = LlamaRMSNorm(h, eps=cfg.rms_norm_eps)
        self.q_proj = nn.Linear(h, cfg.num_heads * hd, bias=False)
        self.k_proj = nn.Linear(h, cfg.num_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(h, cfg.num_kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(cfg.num_heads * hd, h, bias=False)
        self.q_norm = LlamaRMSNorm(hd, eps=cfg.rms_norm_eps)
        self.k_norm = LlamaRMSNorm(hd, eps=cfg.rms_norm_eps)
        self.attn_gate = nn.Parameter(torch.zeros(1))
        self.mlp_norm = LlamaRMSNorm(h, eps=cfg.rms_norm_eps)
        self.mlp = LlamaMLP(cfg.llama_config())
        self.mlp_gate = nn.Parameter(torch.zeros(1))

    def memory_kv(self, memory):  # [B,M,H] -> k, v [B,kvh,M,hd]
        b, m, _ = memory.shape
        k = self.k_norm(self.k_proj(memory).view(b, m, self.kv_heads, self.head_dim)).transpose(1, 2)
        v = self.v_proj(memory).view(b, m, self.kv_heads, self.head_dim).transpose(1, 2)
        return k, v

    def forward(self, x, mem_k, mem_v, cross_mask):
        # x [B,Q,H]; mem_k/v [B,kvh,T,hd]; cross_mask [B,1,Q,T] additive (0 allowed)
        b, q_len, _ = x.shape
        q = self.q_norm(self.q_proj(self.norm(x)).view(b, q_len, self.heads, self.head_dim)).transpose(1, 2)
        g = self.heads // self.kv_heads
        k = mem_k.repeat_interleave(g, dim=1)
        v = mem_v.repeat_interleave(g, dim=1)
        scores = q @ k.transpose(-1, -2) * self.head_dim ** -0.5 + cross_mask
        out = torch.softmax(scores, dim=-1) @ v  # [B,H,Q,hd]
        # a query with no memory to attend (the first position) gets a zero update, not a uniform average
        has_memory = (cross_mask.amax(dim=-1, keepdim=True) > -1.0).to(out.dtype)  # [B,1,Q,1]
        out = (out * has_memory).transpose(1, 2).reshape(b, q_len, -1)
        x = x + torch.tanh(self.attn_gate) * self.o_proj(out)
        return x + torch.tanh(self.mlp_gate) * self.mlp(self.mlp_norm(x))


class DreamDrafter(nn.Module):
    def __init__(self, cfg: DrafterConfig, lm_head_weight: torch.Tensor):
        super().__init__()
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRMSNorm, LlamaRotaryEmbedding

        self.config = cfg
        lcfg = cfg.llama_config()
        self.block0 = LlamaDecoderLayer(lcfg, layer_idx=0)
        self.block0.input_layernorm = nn.Identity()  # DREAM/EAGLE: no input norm on the first block
        self.cross = GatedCrossAttention(cfg)
        self.block2 = LlamaDecoderLayer(lcfg, layer_idx=1)
        self.norm = LlamaRMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.rotary = LlamaRotaryEmbedding(lcfg)
        head = lm_head_weight.detach().clone()
        if cfg.draft_vocab:
            head = head[torch.tensor(cfg.draft_vocab)]
        self.register_buffer("lm_head_weight", head, persistent=False)  # the target's head: frozen, not saved

    def forward(self, embeds, position_ids, self_mask, memory, cross_mask, *past):
        """embeds [B,Q,H] (the target's token/image embeddings), position_ids [B,Q], self_mask [B,1,Q,Ps+Q],
        memory [B,M,H] (new memory features), cross_mask [B,1,Q,Pm+M], past = (b0_k, b0_v, b2_k, b2_v, mem_k, mem_v)
        with self K/V [B,kvh,Ps,hd] and memory K/V [B,kvh,Pm,hd].
        Returns logits [B,Q,Vd], features [B,Q,H], block0 output [B,Q,H], then the new K/V:
        b0_k, b0_v, b2_k, b2_v [B,kvh,Q,hd] and mem_k, mem_v [B,kvh,M,hd]."""
        b0_k, b0_v, b2_k, b2_v, mem_k, mem_v = past
        cache = PlainKV([b0_k, b2_k], [b0_v, b2_v])
        cos_sin = self.rotary(embeds, position_ids)
        x = self.block0(embeds, attention_mask=self_mask, position_ids=position_ids, cache=cache,
                        use_cache=True, position_embeddings=cos_sin)
        x = x[0] if isinstance(x, tuple) else x
        block0_out = x
        new_mk, new_mv = self.cross.memory_kv(memory)
        x = self.cross(x, torch.cat([mem_k, new_mk], dim=2), torch.cat([mem_v, new_mv], dim=2), cross_mask)
        x = self.block2(x, attention_mask=self_mask, position_ids=position_ids, cache=cache,
                        use_cache=True, position_embeddings=cos_sin)
        x = x[0] if isinstance(x, tuple) else x
        features = self.norm(x)
        logits = features @ self.lm_head_weight.T
        return (logits, features, block0_out, cache.new_keys[0], cache.new_values[0],
                cache.new_keys[1], cache.new_values[1], new_mk, new_mv)

    def past_shapes(self) -> list[tuple[int, int]]:
        """(heads, head_dim) of each past tensor: b0_k, b0_v, b2_k, b2_v, mem_k, mem_v."""
        c = self.config
        return [(c.num_kv_heads, c.head_dim)] * 6

    def empty_past(self, batch: int = 1, device=None):
        return tuple(torch.zeros(batch, h, 0, d, device=device) for h, d in self.past_shapes())

    # --- weights ----------------------------------------------------------------------------------
    def save(self, folder) -> None:
        save_drafter(self, folder)

    @classmethod
    def load(cls, folder, lm_head_weight: torch.Tensor) -> "DreamDrafter":
        from safetensors.torch import load_file

        folder = Path(folder)
        model = build_drafter(DrafterConfig.load(folder), lm_head_weight)
        load_strict(model, load_file(folder / WEIGHTS_NAME), source=str(folder / WEIGHTS_NAME))
        return model.eval()


def build_drafter(cfg: DrafterConfig, lm_head_weight: torch.Tensor) -> nn.Module:
    if cfg.arch == "dream":
        return DreamDrafter(cfg, lm_head_weight)
    if cfg.arch == "concat":
        return ConcatDrafter(cfg, lm_head_weight)
    raise DreamExportError(f"drafter arch {cfg.arch!r}: expected 'dream' or 'concat'")


def full_sequence_masks(n: int, keep: torch.Tensor | None = None, mask_min: float = -1e4):
    """Training masks for one sequence of n positions: causal self-attention; query i attends memory j < i.
    ``keep`` [n] bool drops positions (visual token compression) from both streams' keys."""
    i = torch.arange(n)
    allowed_self = i[None, :] <= i[:, None]
    allowed_cross = i[None, :] < i[:, None]
    if keep is not None:
        allowed_self = allowed_self & keep[None, :]
        allowed_cross = allowed_cross & keep[None, :]
        allowed_self = allowed_self | torch.eye(n, dtype=torch.bool)  # a query always sees itself
    to_mask = lambda a: torch.where(a, 0.0, mask_min)[None, None]  # noqa: E731
    return to_mask(allowed_self), to_mask(allowed_cross)
