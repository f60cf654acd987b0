"""The drafter's math written for export: the same weights and the same function as DreamDrafter /
ConcatDrafter (whose HF modules stay the reference for training and validation), with far fewer graph
nodes.

Why: on CPUs and small devices one drafter call is dominated by per-node dispatch, not arithmetic.
Traced through the HF modules, every ``view(b, q_len, ...)`` becomes a Shape/Gather/Unsqueeze/Concat
chain, rotate_half is Slice/Neg/Concat, and repeat_kv is Expand/Reshape; an unrolled draft tree
multiplies all of it by the depth. Here reshapes use constants (-1 for the one free axis), rotate_half
is one MatMul with a constant signed permutation (exact: each output is one input times +-1), GQA groups
the query heads instead of repeating K/V, and cos/sin are computed once per call from the module's own
inv_freq and attention scaling. The export checks compare this graph against the HF-module drafter.
"""

from __future__ import annotations

import torch
from torch import nn


def _rms(x, norm):
    """LlamaRMSNorm (float32 math, as HF)."""
    if isinstance(norm, nn.Identity):
        return x
    var = x.pow(2).mean(-1, keepdim=True)
    return norm.weight * (x * torch.rsqrt(var + norm.variance_epsilon))


def _linear(x, lin):
    return nn.functional.linear(x, lin.weight, lin.bias)


def _rotation(hd: int) -> torch.Tensor:
    """R with x @ R == rotate_half(x) == cat(-x[hd/2:], x[:hd/2])."""
    half = hd // 2
    r = torch.zeros(hd, hd)
    r[torch.arange(half) + half, torch.arange(half)] = -1.0
    r[torch.arange(half), torch.arange(half) + half] = 1.0
    return r


class _Attention:
    """Grouped scaled-dot-product attention over cached + new K/V with an additive mask [1,1,Q,T]."""

    @staticmethod
    def run(q, k, v, mask, heads: int, kv_heads: int, hd: int, scale: float):
        # q [1,H,Q,hd] -> [1,kvh,g,Q,hd]; k/v [1,kvh,T,hd]
        g = heads // kv_heads
        qg = q.reshape(1, kv_heads, g, -1, hd)
        scores = torch.matmul(qg, k.unsqueeze(2).transpose(-1, -2)) * scale + mask.unsqueeze(2)
        out = torch.matmul(torch.softmax(scores, dim=-1), v.unsqueeze(2))  # [1,kvh,g,Q,hd]
        return out.reshape(1, heads, -1, hd)


class ExportedDrafter(nn.Module):
    """Same forward signature and outputs as the wrapped drafter (batch 1)."""

    def __init__(self, drafter: nn.Module):
        super().__init__()
        self.inner = drafter
        self.config = drafter.config
        self.concat = drafter.config.arch == "concat"
        c = drafter.config
        self.heads, self.kv_heads, self.hd = c.num_heads, c.num_kv_heads, c.head_dim
        self.register_buffer("rot", _rotation(c.head_dim), persistent=False)

    def past_shapes(self):
        return self.inner.past_shapes()

    def _cos_sin(self, position_ids):
        rotary = self.inner.rotary
        freqs = position_ids[0].to(torch.float32)[:, None] * rotary.inv_freq[None, :]   # [Q, hd/2]
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos() * rotary.attention_scaling, emb.sin() * rotary.attention_scaling  # [Q, hd]

    def _layer(self, layer, x, cos, sin, mask, past_k, past_v):
        attn = layer.self_attn
        hd = self.hd
        h = _rms(x, layer.input_layernorm)
        q = _linear(h, attn.q_proj).reshape(1, -1, self.heads, hd).transpose(1, 2)
        k = _linear(h, attn.k_proj).reshape(1, -1, self.kv_heads, hd).transpose(1, 2)
        v = _linear(h, attn.v_proj).reshape(1, -1, self.kv_heads, hd).transpose(1, 2)
        q = q * cos + torch.matmul(q, self.rot) * sin
        k = k * cos + torch.matmul(k, self.rot) * sin
        keys = torch.cat([past_k, k], dim=2)
        values = torch.cat([past_v, v], dim=2)
        out = _Attention.run(q, keys, values, mask, self.heads, self.kv_heads, hd, float(attn.scaling))
        x = x + _linear(out.transpose(1, 2).reshape(1, -1, self.heads * hd), attn.o_proj)
        mlp = layer.mlp
        h = _rms(x, layer.post_attention_layernorm)
        x = x + _linear(mlp.act_fn(_linear(h, mlp.gate_proj)) * _linear(h, mlp.up_proj), mlp.down_proj)
        return x, k, v

    def _cross(self, x, memory, cross_mask, past_k, past_v):
        cross = self.inner.cross
        hd = self.hd
        new_k = _rms(_linear(memory, cross.k_proj).reshape(1, -1, self.kv_heads, hd), cross.k_norm).transpose(1, 2)
        new_v = _linear(memory, cross.v_proj).reshape(1, -1, self.kv_heads, hd).transpose(1, 2)
        q = _rms(_linear(_rms(x, cross.norm), cross.q_proj).reshape(1, -1, self.heads, hd), cross.q_norm).transpose(1, 2)
        keys = torch.cat([past_k, new_k], dim=2)
        values = torch.cat([past_v, new_v], dim=2)
        out = _Attention.run(q, keys, values, cross_mask, self.heads, self.kv_heads, hd, hd ** -0.5)
        has_memory = (cross_mask.amax(dim=-1, keepdim=True) > -1.0).to(out.dtype)       # [1,1,Q,1]
        out = (out * has_memory).transpose(1, 2).reshape(1, -1, self.heads * hd)
        x = x + torch.tanh(cross.attn_gate) * _linear(out, cross.o_proj)
        x = x + torch.tanh(cross.mlp_gate) * cross.mlp(_rms(x, cross.mlp_norm))
        return x, new_k, new_v

    def _concat_input(self, embeds, memory, cross_mask, mem_raw, mem_pad):
        inner = self.inner
        h = self.config.hidden_size
        new_raw = memory.reshape(1, -1, inner.mem_heads, self.hd).transpose(1, 2)
        feats = torch.cat([mem_raw, new_raw], dim=2).transpose(1, 2).reshape(1, -1, h)    # [1,T,H]
        allowed = (cross_mask[:, 0] > -1.0).to(feats.dtype)                                 # [1,Q,T]
        score = allowed * torch.arange(1, allowed.shape[-1] + 1, dtype=feats.dtype)
        idx = score.argmax(dim=-1)
        has = (score.amax(dim=-1, keepdim=True) > 0).to(feats.dtype)
        prev = torch.gather(feats, 1, idx.unsqueeze(-1).expand(-1, -1, h)) * has
        new_pad = torch.zeros(1, 1, memory.shape[1], 1, dtype=memory.dtype) + 0.0 * mem_pad.sum()
        return _linear(torch.cat([embeds, prev], dim=-1), inner.fc), new_raw, new_pad

    def forward(self, embeds, position_ids, self_mask, memory, cross_mask, *past):
        b0_k, b0_v, b2_k, b2_v, mem_k, mem_v = past
        inner = self.inner
        cos, sin = self._cos_sin(position_ids)
        if self.concat:
            x, new_mk, new_mv = self._concat_input(embeds, memory, cross_mask, mem_k, mem_v)
        else:
            x = embeds
        x, k0, v0 = self._layer(inner.block0, x, cos, sin, self_mask, b0_k, b0_v)
        block0_out = x
        if not self.concat:
            x, new_mk, new_mv = self._cross(x, memory, cross_mask, mem_k, mem_v)
        x, k2, v2 = self._layer(inner.block2, x, cos, sin, self_mask, b2_k, b2_v)
        features = _rms(x, inner.norm)
        logits = torch.matmul(features, inner.lm_head_weight.T)
        return logits, features, block0_out, k0, v0, k2, v2, new_mk, new_mv
