"""The ONNX Runtime CPU decoder: the HF layers' own modules, attention fused into com.microsoft.GroupQueryAttention.

TensorRT parses no com.microsoft ops, so this graph is an extra one for ORT on CPUs, derived from the
same HF modules as the standard graph and checked against it. Its KV inputs are whole preallocated
buffers [1,kvh,max_len,hd]; bound through IOBinding as both past_key_i and present_key_i, ORT writes
the new rows in place at [P, P+Q) (P = total_len - Q, total_len = the mask's width), so nothing is
copied per step. Rotary is applied by the HF attention module (do_rotary=0), so tree positions are
whatever position_ids say (DESIGN §3, measured exact on trees).
"""

from __future__ import annotations

import torch

from .graphs import DecoderGraph, head_logits



class _GQA(torch.autograd.Function):
    """Reference math in forward (used for tracing and validation); one contrib op in the ONNX graph."""

    @staticmethod
    def forward(ctx, q, k, v, past_k, past_v, seqlens_k, total_len, bias, num_heads, kv_heads, scale):
        # q [1,S,H*hd], k/v [1,S,kvh*hd], past_k/v [1,kvh,C,hd], bias [1,1,S,T] with T = P+S
        s = q.shape[1]
        t = int(total_len)
        p = t - s
        hd = past_k.shape[-1]
        kh = k.view(1, s, kv_heads, hd).transpose(1, 2)
        vh = v.view(1, s, kv_heads, hd).transpose(1, 2)
        present_k = past_k.clone()
        present_v = past_v.clone()
        present_k[:, :, p:t] = kh
        present_v[:, :, p:t] = vh
        g = num_heads // kv_heads
        keys = present_k[:, :, :t].repeat_interleave(g, dim=1)
        values = present_v[:, :, :t].repeat_interleave(g, dim=1)
        qh = q.view(1, s, num_heads, hd).transpose(1, 2)
        scores = qh @ keys.transpose(-1, -2) * scale + bias
        causal = torch.ones(s, t, dtype=torch.bool).tril(diagonal=p)  # GQA is causal over the new tokens
        scores = scores.masked_fill(~causal, float("-inf"))
        out = torch.softmax(scores, dim=-1) @ values  # [1,H,S,hd]
        return out.transpose(1, 2).reshape(1, s, num_heads * hd), present_k, present_v

    @staticmethod
    def symbolic(g, q, k, v, past_k, past_v, seqlens_k, total_len, bias, num_heads, kv_heads, scale):
        from torch.onnx._internal.torchscript_exporter.symbolic_helper import _optional_input_placeholder_tensor

        none = _optional_input_placeholder_tensor(g)
        return g.op(
            "com.microsoft::GroupQueryAttention",
            q, k, v, past_k, past_v, seqlens_k, total_len, none, none, none, bias,
            num_heads_i=num_heads, kv_num_heads_i=kv_heads, scale_f=scale, do_rotary_i=0, outputs=3,
        )


class FusedDecoderGraph(DecoderGraph):
    """Same I/O names as DecoderGraph; past/present are the shared max-length buffers.

    Each layer runs through ``adapter.fused_layer`` (the family's own submodules in HF's order, attention handed to
    GroupQueryAttention with the layer's mask as its bias: a sliding-window layer gets its windowed mask); the result
    is checked against the standard graph at every export.
    """

    def forward(self, inputs_embeds, attention_mask, position_ids, *past):
        total_len = torch._shape_as_tensor(attention_mask)[3].to(torch.int32)  # P+Q, traced as a Shape op
        seqlens_k = (total_len - 1).reshape(1)
        hidden = inputs_embeds
        s = hidden.shape[1]
        position_embeddings = self.adapter.layer_position_embeddings(hidden, position_ids)
        masks = self.layer_masks(attention_mask, position_ids, attention_mask.shape[-1] - s)
        presents = []
        last = {}
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            heads, kv_heads = int(attn.config.num_attention_heads), int(attn.config.num_key_value_heads)

            def attend(q, k, v, scale, i=i, heads=heads, kv_heads=kv_heads):
                """q [1,H,s,hd], k [1,kvh,s,hd] (rotated), v [1,s,kvh*hd] -> [1,s,H*hd]; K/V written in place."""
                hd = q.shape[-1]
                out, pk, pv = _GQA.apply(
                    q.transpose(1, 2).reshape(1, s, heads * hd), k.transpose(1, 2).reshape(1, s, kv_heads * hd), v,
                    past[2 * i], past[2 * i + 1], seqlens_k, total_len, masks[i], heads, kv_heads, float(scale))
                presents.extend([pk, pv])
                last.update(q=q, pk=pk, groups=heads // kv_heads, scale=float(scale), mask=masks[i])
                return out

            hidden = self.adapter.fused_layer(layer, hidden, position_embeddings[i], attend)
        received = _attention_received(last["q"], last["pk"], last["mask"], last["groups"], last["scale"])
        hidden = self.norm(hidden)
        logits = self.adapter.final_logits(head_logits(self.lm_head, hidden))
        return (logits, hidden, received, *presents)


def _attention_received(q, present_k, bias, groups: int, scale: float):
    """Last layer: mean over heads and queries of the attention each of the P+Q positions receives."""
    t = bias.shape[-1]
    keys = present_k[:, :, :t].repeat_interleave(groups, dim=1)
    probs = torch.softmax(q @ keys.transpose(-1, -2) * scale + bias, dim=-1)
    return probs.mean(dim=(1, 2))


