"""The cache object the exportable graphs hand to HF attention layers: the target's decoder graph
(``export/graphs.py``) and both drafter architectures pass their past K/V as plain tensors through it."""

from __future__ import annotations

import torch


class PlainKV:
    """The smallest object HF attention layers accept as a cache.

    ``update`` appends this call's keys/values to the given past and remembers them, so the graph can
    return only the new entries: the runtime owns the cache.
    """

    def __init__(self, past_keys, past_values):
        self.past_keys = list(past_keys)
        self.past_values = list(past_values)
        self.new_keys = [None] * len(self.past_keys)
        self.new_values = [None] * len(self.past_keys)

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        self.new_keys[layer_idx] = key_states
        self.new_values[layer_idx] = value_states
        keys = torch.cat([self.past_keys[layer_idx], key_states], dim=2)
        values = torch.cat([self.past_values[layer_idx], value_states], dim=2)
        return keys, values

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.past_keys[layer_idx].shape[2]
