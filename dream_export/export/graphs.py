"""Exportable torch wrappers around a target's own HF modules.

The decoder wrapper runs the family's HF decoder layers unchanged; only the cache is replaced by
plain tensors (``PlainKV``), and the mask and position ids are explicit inputs (DESIGN §2.5).
"""

from __future__ import annotations

import torch
from torch import nn

from ..drafter.plain_kv import PlainKV


class DecoderGraph(nn.Module):
    """inputs_embeds [1,Q,H], attention_mask [1,1,Q,P+Q] (additive), position_ids [1,Q], past K/V [1,P,kvh,hd]
    -> logits [1,Q,V], hidden_states [1,Q,H] (final-normed), attention_received [1,P+Q] (last layer, mean over
    heads and queries: visual token compression scores), new K/V [1,Q,kvh,hd] per layer.

    K/V cross the graph boundary as [1, positions, kv_heads, head_dim] (``kv.layout == "bshd"``) and are
    transposed inside to the [1, kv_heads, positions, head_dim] HF attention uses: a runtime cache preallocated
    to the capacity then binds its first P positions as the past without a copy (``runtime/backends/device.py``)."""

    def __init__(self, adapter, mask_min: float = -1e4):
        super().__init__()
        self.adapter = adapter  # a plain object (not a module): the family's rotary, window and logits rules
        self.layers = nn.ModuleList(adapter.decoder_layers())
        self.norm = adapter.final_norm()
        self.rotary = adapter.rotary_emb()
        self.lm_head = adapter.lm_head()
        self.windows = adapter.attention_windows()
        self.mask_min = float(mask_min)

    def forward(self, inputs_embeds, attention_mask, position_ids, *past):
        n = len(self.layers)
        cache = PlainKV([k.transpose(1, 2) for k in past[0::2][:n]], [v.transpose(1, 2) for v in past[1::2][:n]])
        hidden = inputs_embeds
        position_embeddings = self.adapter.layer_position_embeddings(hidden, position_ids)
        masks = self.layer_masks(attention_mask, position_ids, past[0].shape[1])
        seen = {}
        hook = self.layers[-1].self_attn.register_forward_hook(lambda m, a, out: seen.__setitem__("w", out[1]) or None)
        try:
            hidden = self._layers(hidden, masks, position_ids, cache, position_embeddings)
        finally:
            hook.remove()
        hidden = self.norm(hidden)
        logits = self.adapter.final_logits(head_logits(self.lm_head, hidden))
        received = seen["w"].mean(dim=(1, 2))  # [1,P+Q]: last-layer attention each position receives
        presents = []
        for k, v in zip(cache.new_keys, cache.new_values):
            presents += [k.transpose(1, 2), v.transpose(1, 2)]
        return (logits, hidden, received, *presents)

    def layer_masks(self, attention_mask, position_ids, past_len):
        """Per layer: the given mask, or for a sliding-window layer the given mask with every key at or beyond
        ``window`` positions behind the query masked too. Positions, not cache rows, measure the distance: the
        committed past holds positions 0..P-1 (padding rows of a bucketed past are masked by the runtime already)
        and the new rows hold ``position_ids``, so a tree node's window is the one its path would have."""
        if all(w is None for w in self.windows):
            return [attention_mask] * len(self.layers)
        q_pos = position_ids[0]
        kv_pos = torch.cat([torch.arange(past_len, dtype=q_pos.dtype), q_pos])
        distance = q_pos[:, None] - kv_pos[None, :]                        # [Q, P+Q]
        by_window = {}
        for w in set(self.windows) - {None}:
            far = (distance >= w)[None, None]
            by_window[w] = torch.where(far, torch.full_like(attention_mask, self.mask_min), attention_mask)
        return [attention_mask if w is None else by_window[w] for w in self.windows]

    def _layers(self, hidden, masks, position_ids, cache, position_embeddings):
        for layer, mask, pe in zip(self.layers, masks, position_embeddings):
            hidden = layer(
                hidden,
                attention_mask=mask,
                position_ids=position_ids,
                cache=cache,
                use_cache=True,
                position_embeddings=pe,
            )
            hidden = hidden[0] if isinstance(hidden, tuple) else hidden
        return hidden


def head_logits(lm_head: nn.Linear, hidden: torch.Tensor) -> torch.Tensor:
    """[1,Q,H] -> [1,Q,V] as one Gemm(transB=1), which keeps the head's weight as stored, [V,H]: for a tied head
    the same bytes as the embedding matrix, so the bundle stores them once (``export/weights.py``). A plain
    ``lm_head(hidden)`` exports as MatMul with a transposed [H,V] copy."""
    w = lm_head.weight
    bias = lm_head.bias if lm_head.bias is not None else torch.zeros(w.shape[0], dtype=w.dtype)
    return torch.nn.functional.linear(hidden.reshape(-1, w.shape[1]), w, bias).reshape(*hidden.shape[:-1], w.shape[0])


def set_eager_attention(model) -> None:
    """Export with the eager attention path (plain MatMul/Softmax, an additive float mask)."""
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation("eager")
        return
    for cfg in (model.config, getattr(model.config, "text_config", None), getattr(model.config, "vision_config", None)):
        if cfg is not None:
            cfg._attn_implementation = "eager"
