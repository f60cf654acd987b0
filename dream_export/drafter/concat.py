"""Ablation: an EAGLE-style drafter without cross-attention fusion.

The query at position i gets fc(concat(embedding(x_i), f_{i-1})): the single most recent feature it may
see (the target's, or its parent's predicted feature while drafting) instead of attending all earlier
features. Then two Llama layers, the final norm and the target's head, trained with the same losses.
It keeps the DREAM graph interface so the runtime drives both the same way: the "memory" cache holds
raw features (split into head_dim chunks), and the cross mask's last allowed entry is f_{i-1}.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import DrafterConfig, save_drafter
from .plain_kv import PlainKV


class ConcatDrafter(nn.Module):
    def __init__(self, cfg: DrafterConfig, lm_head_weight: torch.Tensor):
        super().__init__()
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRMSNorm, LlamaRotaryEmbedding

        self.config = cfg
        lcfg = cfg.llama_config()
        h = cfg.hidden_size
        self.fc = nn.Linear(2 * h, h, bias=False)
        self.block0 = LlamaDecoderLayer(lcfg, layer_idx=0)
        self.block0.input_layernorm = nn.Identity()
        self.block2 = LlamaDecoderLayer(lcfg, layer_idx=1)
        self.norm = LlamaRMSNorm(h, eps=cfg.rms_norm_eps)
        self.rotary = LlamaRotaryEmbedding(lcfg)
        head = lm_head_weight.detach().clone()
        if cfg.draft_vocab:
            head = head[torch.tensor(cfg.draft_vocab)]
        self.register_buffer("lm_head_weight", head, persistent=False)
        self.mem_heads = h // cfg.head_dim

    def past_shapes(self):
        c = self.config
        return [(c.num_kv_heads, c.head_dim)] * 4 + [(self.mem_heads, c.head_dim), (1, 1)]

    def empty_past(self, batch: int = 1, device=None):
        return tuple(torch.zeros(batch, h, 0, d, device=device) for h, d in self.past_shapes())

    def forward(self, embeds, position_ids, self_mask, memory, cross_mask, *past):
        b0_k, b0_v, b2_k, b2_v, mem_raw, mem_pad = past
        b, m, h = memory.shape
        hd = self.config.head_dim
        new_raw = memory.view(b, m, self.mem_heads, hd).transpose(1, 2)             # [B,h/hd,M,hd]
        feats = torch.cat([mem_raw, new_raw], dim=2).transpose(1, 2).reshape(b, -1, h)  # [B,T,H]
        allowed = (cross_mask[:, 0] > -1.0).to(feats.dtype)                         # [B,Q,T]
        t = allowed.shape[-1]
        score = allowed * torch.arange(1, t + 1, dtype=feats.dtype)
        idx = score.argmax(dim=-1)                                                  # last allowed entry
        has = (score.amax(dim=-1, keepdim=True) > 0).to(feats.dtype)
        prev = torch.gather(feats, 1, idx.unsqueeze(-1).expand(-1, -1, h)) * has    # [B,Q,H]
        x = self.fc(torch.cat([embeds, prev], dim=-1))
        cache = PlainKV([b0_k, b2_k], [b0_v, b2_v])
        cos_sin = self.rotary(x, position_ids)
        x = self.block0(x, attention_mask=self_mask, position_ids=position_ids, cache=cache, use_cache=True,
                        position_embeddings=cos_sin)
        x = x[0] if isinstance(x, tuple) else x
        block0_out = x
        x = self.block2(x, attention_mask=self_mask, position_ids=position_ids, cache=cache, use_cache=True,
                        position_embeddings=cos_sin)
        x = x[0] if isinstance(x, tuple) else x
        features = self.norm(x)
        logits = features @ self.lm_head_weight.T
        # the interface's mem_value cache is unused here; keep it a graph input (it is 1 float per row)
        new_pad = torch.zeros(b, 1, m, 1, dtype=memory.dtype) + 0.0 * mem_pad.sum()
        return (logits, features, block0_out, cache.new_keys[0], cache.new_values[0], cache.new_keys[1],
                cache.new_values[1], new_raw, new_pad)

    def save(self, folder) -> None:
        save_drafter(self, folder)
