"""The whole draft step as one graph: the drafter's catch-up on the last accepted tokens, then the
EAGLE-2 dynamic-tree expansion unrolled to a fixed depth D and top-k K (``draft_tree.onnx``).

Why one graph: on small devices and CPUs the per-call cost (launch, binding, Python) of D separate
drafter calls is larger than their arithmetic, so a speculative step is one drafter call + one target
verify call. The tree search is the same as the depth-by-depth search in ``runtime/speculative.py``
(that path stays for trees of other D, K and is the reference in the tests):

  root      = the last catch-up query (the bonus token of the previous step); its logits give the
              K level-1 candidates (top-K of the log-softmax), which are all expanded.
  level d   = the K frontier nodes of level d-1 are queried together (positions root+d-1); each gives
              its top-K children, scored by cumulative log-prob; the best K of the K*K become the next
              frontier. Each query attends the whole committed past, its own ancestors' drafter rows and
              itself (self-attention), and the committed memory plus its ancestors' drafted features
              (cross-attention; the tree mask applies there too).
Outputs: every candidate (K + (D-1)*K*K of them) as target token id, cumulative log-prob and parent
(an index into the same list, -1 = the root), and the catch-up's new cache rows, which the runtime
appends to its drafter caches. Tree rows are never returned: they are scratch by construction.
All shapes are fixed except the catch-up length and the cache lengths (TensorRT: min/opt/max bounds).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .specs import DRAFTER_PAST, GraphSpec, TensorSpec
from .drafter_export import check_cases, drafter_feeds
from .validate import Check


def num_candidates(depth: int, top_k: int) -> int:
    return top_k + (depth - 1) * top_k * top_k


class DraftTreeGraph(nn.Module):
    def __init__(self, drafter: nn.Module, embed_weight: torch.Tensor, depth: int, top_k: int, mask_min: float,
                 embed_scale: float = 1.0):
        super().__init__()
        if depth < 1 or top_k < 1:
            raise ValueError(f"draft tree needs depth >= 1 and top_k >= 1, got {depth}, {top_k}")
        self.drafter = drafter
        self.depth, self.k = depth, top_k
        self.mask_min = float(mask_min)
        self.embed_scale = float(embed_scale)  # the target's embedding factor (Gemma: sqrt(hidden)); 1 for most
        d2t = drafter.config.draft_vocab
        self.register_buffer("d2t", torch.tensor(d2t, dtype=torch.int64) if d2t else torch.zeros(0, dtype=torch.int64),
                             persistent=False)
        # the embedding rows of the tokens the drafter can propose (its draft vocabulary), indexed by draft id
        rows = embed_weight.detach().float()
        self.register_buffer("embed", (rows[self.d2t] if d2t else rows).clone(), persistent=False)

    def _to_target(self, idx):
        return self.d2t[idx] if self.d2t.numel() else idx

    def _mask(self, allowed):  # bool [Q,T] -> additive [1,1,Q,T]
        return torch.where(allowed, 0.0, self.mask_min)[None, None]

    def forward(self, inputs_embeds, position_ids, attention_mask, memory, cross_mask, *past):
        k, depth = self.k, self.depth
        out = self.drafter(inputs_embeds, position_ids, attention_mask, memory, cross_mask, *past)
        logits, feats, new = out[0], out[1], out[3:]
        # caches every tree query sees in full: the committed past plus the catch-up rows
        self_kv = [torch.cat([p, n], dim=2) for p, n in zip(past[:4], new[:4])]
        mem_kv = [torch.cat([p, n], dim=2) for p, n in zip(past[4:], new[4:])]
        s0 = self_kv[0].shape[2]
        m0 = mem_kv[0].shape[2]
        root_pos = position_ids[:, -1:]                                   # [1,1]

        vals, idx = torch.topk(torch.log_softmax(logits[0, -1], dim=-1), k)   # level 1: the root's top-K
        tokens, scores = [self._to_target(idx)], [vals]
        parents = [torch.full((k,), -1, dtype=torch.int64)]
        f_idx, f_score, f_cand = idx, vals, torch.arange(k)                # frontier: draft ids, scores, candidates
        anc = torch.eye(k, dtype=torch.bool)                                # frontier x tree self rows (own + ancestors)
        pending = feats[:, -1:]                                             # root's drafted feature, next memory row
        ones = torch.ones(k, 1, dtype=torch.bool)
        for d in range(2, depth + 1):
            emb = self.embed[f_idx][None]                                   # [1,K,H]
            if self.embed_scale != 1.0:
                emb = emb * torch.tensor(self.embed_scale, dtype=emb.dtype)
            pos = (root_pos + (d - 1)).expand(1, k)
            self_allowed = torch.cat([ones.expand(k, s0), anc], dim=1)
            # memory: committed rows, the root's feature (row m0), then levels 1..d-2 frontier features
            cross_allowed = torch.cat([ones.expand(k, m0 + 1), anc[:, : (d - 2) * k]], dim=1)
            o = self.drafter(emb, pos, self._mask(self_allowed), pending, self._mask(cross_allowed), *self_kv, *mem_kv)
            self_kv = [torch.cat([c, n], dim=2) for c, n in zip(self_kv, o[3:7])]
            mem_kv = [torch.cat([c, n], dim=2) for c, n in zip(mem_kv, o[7:9])]
            pending = o[1]
            v, i = torch.topk(torch.log_softmax(o[0][0], dim=-1), k)          # [K,K] children of each frontier node
            cand_score = (f_score[:, None] + v).reshape(-1)
            cand_tok = self._to_target(i).reshape(-1)
            tokens.append(cand_tok)
            scores.append(cand_score)
            parents.append(f_cand[:, None].expand(k, k).reshape(-1))
            if d < depth:
                base = k + (d - 2) * k * k
                f_score, best = torch.topk(cand_score, k)
                f_idx = i.reshape(-1)[best]
                f_cand = base + best
                slot_of = torch.arange(k).repeat_interleave(k)              # candidate -> its parent's slot (a constant)
                anc = torch.cat([anc[slot_of[best]], torch.eye(k, dtype=torch.bool)], dim=1)
        return (torch.cat(tokens), torch.cat(scores), torch.cat(parents), *new)


def draft_tree_spec(base: GraphSpec, depth: int, top_k: int) -> GraphSpec:
    """Inputs as the drafter graph's (one catch-up call); outputs the candidates and the catch-up's cache rows."""
    c = num_candidates(depth, top_k)
    presents = tuple(t for t in base.outputs if t.name.startswith("present_"))
    return GraphSpec(
        name="draft_tree",
        file=f"draft_tree_d{depth}k{top_k}.onnx",
        inputs=base.inputs,
        outputs=(
            TensorSpec("tree_tokens", "int64", (c,)),
            TensorSpec("tree_scores", "float32", (c,)),
            TensorSpec("tree_parents", "int64", (c,)),
            *presents,
        ),
        atol=base.atol,
        extra={
            "past": [f"past_{n}" for n in DRAFTER_PAST],
            "present": [f"present_{n}" for n in DRAFTER_PAST],
            "mask_min": base.extra["mask_min"],
            "depth": depth,
            "top_k": top_k,
            "candidates": c,
            "bounds": {"q_len": [1, depth + 1, "context"], "m_len": [1, depth + 1, "context"]},
        },
    )


def tree_cases(cfg, spec, seed: int):
    """(name, feeds): a prompt-like catch-up with no past, and a mid-sequence catch-up of 3 accepted tokens
    (causal self-attention; memory strictly earlier)."""
    rng = np.random.default_rng(seed)
    cases = []
    for name, past_len, q_len, mem_past, m_len in (("prefill", 0, 9, 0, 8), ("step", 12, 3, 11, 3)):
        pos = past_len + np.arange(q_len)
        self_allowed = np.arange(past_len + q_len)[None] <= pos[:, None]
        cross_allowed = np.arange(mem_past + m_len)[None] < pos[:, None]
        cases.append((name, drafter_feeds(spec, rng, cfg.hidden_size, past_len, mem_past, self_allowed, cross_allowed)))
    return cases


def validate_draft_tree(module, cfg, spec, path, seed: int = 0, graph: str = "draft_tree") -> list[Check]:
    """Scores and cache rows within tolerance; candidate tokens and parents must be identical."""
    return check_cases(graph, module, spec, path, tree_cases(cfg, spec, seed))


def quantized_tree_spec(t_spec: GraphSpec, precision: str) -> GraphSpec:
    """The ORT-CPU twin of a draft-tree graph: same I/O, weight-only quantized MatMuls."""
    from dataclasses import replace

    stem = t_spec.file[: -len(".onnx")]
    return replace(t_spec, name="draft_tree_ort_cpu", file=f"{stem}_{precision}.onnx",
                   extra={**t_spec.extra, "precision": precision})


def validate_quantized_tree(cfg, t_spec, float_path, q_spec, q_path, seed: int = 0) -> list[Check]:
    """Same feeds through the float and the quantized graph: every output finite, the catch-up K/V rows'
    relative L2 error within RELATIVE_TOLERANCE. The tree itself may differ (it is a proposal the
    target verifies); how much it differs shows up in acceptance, which ``--tune`` measures."""
    from .quantize import RELATIVE_TOLERANCE
    from .validate import cpu_session, relative_error_check

    ref_sess, q_sess = cpu_session(float_path), cpu_session(q_path)
    rel = RELATIVE_TOLERANCE[q_spec.extra["precision"]]
    names = [t.name for t in t_spec.outputs]
    checks = []
    for case, feeds in tree_cases(cfg, t_spec, seed):
        ref = dict(zip(names, ref_sess.run(names, feeds)))
        got = dict(zip(names, q_sess.run(names, feeds)))
        for name in names:
            finite = bool(np.isfinite(got[name]).all())
            if name.startswith("present_"):
                checks.append(relative_error_check("draft_tree_ort_cpu", case, name, ref[name], got[name], rel))
            else:
                checks.append(Check("draft_tree_ort_cpu", case, f"{name} (finite)", 0.0 if finite else float("inf"), 0.0))
    return checks
