"""Export the DREAM drafter into a bundle: one graph with explicit masks and plain-tensor caches,
checked against PyTorch like the target graphs (prefill-like catch-up, a 1-token step, a tree level)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from runtime.tree import random_tree, ancestor_matrix

from .validate import Check, compare_graph_outputs, cpu_session


class DrafterGraph(nn.Module):
    def __init__(self, drafter):
        super().__init__()
        self.drafter = drafter

    def forward(self, inputs_embeds, position_ids, attention_mask, memory, cross_mask, *past):
        out = self.drafter(inputs_embeds, position_ids, attention_mask, memory, cross_mask, *past)
        return (out[0], out[1], *out[3:])  # drop block 0's output (a training-only target)


def drafter_dummy(cfg, past_shapes, q_len=3, past_len=4, m_len=2, mem_past=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = cfg.hidden_size
    args = [
        torch.randn(1, q_len, h, generator=g),
        torch.arange(past_len, past_len + q_len)[None],
        torch.zeros(1, 1, q_len, past_len + q_len),
        torch.randn(1, m_len, h, generator=g),
        torch.zeros(1, 1, q_len, mem_past + m_len),
    ]
    for i, (heads, hd) in enumerate(past_shapes):
        args.append(torch.randn(1, heads, mem_past if i >= 4 else past_len, hd, generator=g))
    return tuple(args)


def drafter_cases(cfg, spec, seed: int):
    """(name, feeds): a catch-up call (several tokens, as many new memory rows), a 1-token step, a tree level
    whose queries see only their ancestors in both attentions."""
    rng = np.random.default_rng(seed)
    h = cfg.hidden_size
    cases = []
    for name, past_len, q_len, mem_past, m_len in (("catchup", 0, 7, 0, 6), ("step", 11, 1, 10, 1), ("tree", 15, 4, 14, 4)):
        self_allowed = np.tril(np.ones((q_len, past_len + q_len), bool), k=past_len)
        cross_allowed = np.tril(np.ones((q_len, mem_past + m_len), bool), k=past_len - 1)  # memory lags by one
        if name == "tree":
            parents = random_tree(q_len, rng)
            anc = ancestor_matrix(parents)
            self_allowed[:, past_len:] = anc
            cross_allowed[:, mem_past:] = anc
        cases.append((name, drafter_feeds(spec, rng, h, past_len, mem_past, self_allowed, cross_allowed)))
    return cases


def drafter_feeds(spec, rng, hidden: int, past_len: int, mem_past: int, self_allowed, cross_allowed) -> dict:
    """Random feeds for one call of a drafter-interface graph: Q queries at positions past_len.., M new memory
    rows, the given allowed-masks ([Q, past_len+Q] and [Q, mem_past+M]) and random caches."""
    q_len, m_len = self_allowed.shape[0], cross_allowed.shape[1] - mem_past
    mask_min = spec.extra["mask_min"]
    feeds = {
        "inputs_embeds": rng.standard_normal((1, q_len, hidden)).astype(np.float32),
        "position_ids": (past_len + np.arange(q_len))[None].astype(np.int64),
        "attention_mask": np.where(self_allowed, 0, mask_min).astype(np.float32)[None, None],
        "memory": rng.standard_normal((1, m_len, hidden)).astype(np.float32),
        "cross_mask": np.where(cross_allowed, 0, mask_min).astype(np.float32)[None, None],
    }
    for t in spec.inputs:
        if t.name in spec.extra["past"]:
            rows = mem_past if "mem" in t.name else past_len
            feeds[t.name] = rng.standard_normal((1, t.dims[1], rows, t.dims[3])).astype(np.float32)
    return feeds


def check_cases(graph: str, module, spec, path, cases) -> list[Check]:
    """Run each (case, feeds) through the ONNX file and the PyTorch module; compare every output."""
    sess = cpu_session(path)
    names = [t.name for t in spec.inputs]
    checks = []
    for case, feeds in cases:
        with torch.no_grad():
            ref = module(*[torch.from_numpy(feeds[n]) for n in names])
        got = sess.run([t.name for t in spec.outputs], feeds)
        checks += compare_graph_outputs(graph, case, spec, ref, got)
    return checks


def validate_drafter(module, cfg, spec, path, seed: int = 0) -> list[Check]:
    return check_cases("drafter", module, spec, path, drafter_cases(cfg, spec, seed))
