"""DREAM speculative decoding over the exported graphs: draft a tree, verify it in one target call,
accept, commit. Torch-free.

One step (``SpeculativeDecoder.step``):
  1. draft   — EAGLE-2 dynamic tree: from the root (the last emitted token) expand the top-K children of
               the top-K frontier nodes by cumulative draft log-prob, depth by depth; keep the best
               N-1 nodes (+ root).
  2. verify  — one target call over the N nodes with the tree mask, positions = context + depth.
  3. accept  — walk down from the root. At each node the target's distribution p decides among the
               node's children in draft order: child c is accepted with probability p(c); a rejected
               child's mass is removed and p renormalised. If no child is accepted, the next token is
               drawn from what is left of p (the bonus). Greedy is the same walk with p one-hot, so
               greedy output equals plain greedy decoding and sampled output has the target's law.
  4. commit  — the accepted path's target K/V are kept (moved down in place); the drafter rolls back
               its tree rows and catches up on the accepted tokens with the target's real features.
The drafter's memory (cross-attention over target features) holds only the kept image tokens
(visual token compression); the target always sees all of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .sampling import SamplingConfig, probabilities
from .tree import TreeSpec, ancestor_matrix


@dataclass
class StepResult:
    tokens: list[int]          # emitted this step: the accepted draft tokens, then the bonus token
    accepted: int              # accepted draft tokens (tokens = accepted + 1)
    tree_size: int


class _Grow:
    """A preallocated [1,kvh,cap,hd] array appended along axis 2 and rolled back by length."""

    def __init__(self, kvh: int, hd: int, cap: int):
        self.data = np.zeros((1, kvh, cap, hd), np.float32)
        self.length = 0

    def view(self) -> np.ndarray:
        return np.ascontiguousarray(self.data[:, :, : self.length])

    def append(self, rows: np.ndarray) -> None:
        n = rows.shape[2]
        if self.length + n > self.data.shape[2]:
            grown = np.zeros(self.data.shape[:2] + (max(2 * self.data.shape[2], self.length + n),) + self.data.shape[3:], np.float32)
            grown[:, :, : self.length] = self.data[:, :, : self.length]
            self.data = grown
        self.data[:, :, self.length: self.length + n] = rows
        self.length += n


class DrafterState:
    """The drafter's caches: its own token stream (self-attention K/V of blocks 0 and 2) and the memory
    (cross-attention K/V of target or drafted features), each with the positions of its entries."""

    def __init__(self, pipe, info: dict):
        cfg = info["config"]
        self.backend = pipe.backend
        self.spec = pipe.bundle.graph(info["graph"])
        self.mask_min = float(self.spec["mask_min"])
        shapes = {t["name"]: t["shape"] for t in self.spec["inputs"]}
        cap = 256
        # each cache's (heads, head_dim) comes from the graph's declared input shape
        self.kv = {name: _Grow(shapes[name][1], shapes[name][3], cap) for name in self.spec["past"]}
        self.self_pos: list[int] = []
        self.mem_pos: list[int] = []
        d2t = info.get("draft_to_target")
        self.d2t = np.load(pipe.bundle.file(d2t), allow_pickle=False) if d2t else None

    @property
    def self_len(self) -> int:
        return len(self.self_pos)

    @property
    def mem_len(self) -> int:
        return len(self.mem_pos)

    def call(self, embeds, positions, self_allowed, memory, mem_positions, cross_allowed):
        """Run the drafter over Q queries with M new memory rows; every new row is appended (the caller rolls back)."""
        feeds = {
            "inputs_embeds": embeds[None].astype(np.float32),
            "position_ids": np.asarray(positions, np.int64)[None],
            "attention_mask": np.where(self_allowed, 0.0, self.mask_min).astype(np.float32)[None, None],
            "memory": memory[None].astype(np.float32),
            "cross_mask": np.where(cross_allowed, 0.0, self.mask_min).astype(np.float32)[None, None],
        }
        for name in self.spec["past"]:
            feeds[name] = self.kv[name].view()
        out = self.backend.run("drafter", feeds)
        for past, present in zip(self.spec["past"], self.spec["present"]):
            self.kv[past].append(out[present])
        self.self_pos += [int(p) for p in positions]
        self.mem_pos += [int(p) for p in mem_positions]
        return out["logits"][0], out["features"][0]

    def catch_up(self, embeds, positions, features, feature_positions):
        """Committed tokens and the target's features for the positions before them: causal, memory strictly earlier."""
        pos = np.asarray(positions)
        self_pos = np.asarray(self.self_pos + list(positions))
        mem_pos = np.asarray(self.mem_pos + list(feature_positions))
        self_allowed = self_pos[None, :] <= pos[:, None]
        cross_allowed = mem_pos[None, :] < pos[:, None]
        return self.call(embeds, positions, self_allowed, features, feature_positions, cross_allowed)

    def rollback(self, self_len: int, mem_len: int) -> None:
        for name, g in self.kv.items():
            g.length = mem_len if "mem" in name else self_len
        del self.self_pos[self_len:]
        del self.mem_pos[mem_len:]

    def to_target(self, draft_ids: np.ndarray) -> np.ndarray:
        return draft_ids if self.d2t is None else self.d2t[draft_ids]


@dataclass
class _Node:
    token: int
    parent: int        # index into the node list; -1 for the root
    depth: int
    logp: float
    children: list[int] = field(default_factory=list)


class SpeculativeDecoder:
    """Drives one sequence: ``start`` after the target prefill, then ``step`` until the caller stops."""

    def __init__(self, pipe, tree: TreeSpec, cfg: SamplingConfig, rng: np.random.Generator):
        self.pipe = pipe
        self.tree = tree
        self.cfg = cfg
        self.rng = rng
        self.info = pipe.bundle.manifest["drafter"]
        self.drafter = DrafterState(pipe, self.info)
        self.dec = pipe.new_decoder(slack=tree.total_tokens)
        self.root = -1
        self.root_logits = None     # drafter logits for the root's children
        self.root_feature = None    # drafter's predicted feature at the root's position

    # --- setup --------------------------------------------------------------------------------------
    def start(self, prompt_embeds: np.ndarray, input_ids: np.ndarray) -> int:
        """Target prefill, first token, drafter prefill over the kept prompt positions. Returns the first token."""
        out = self.pipe.step(self.dec, prompt_embeds)
        first = self._choose(out["logits"][0, -1])
        keep = self._kept_positions(input_ids, out["attention_received"][0])
        emb = prompt_embeds[0][keep]
        root_emb = self.pipe.embed(np.array([first]))
        n = len(input_ids)
        logits, feats = self.drafter.catch_up(
            np.concatenate([emb, root_emb]), list(keep) + [n], out["hidden_states"][0][keep], list(keep)
        )
        self.root, self.root_logits, self.root_feature = first, logits[-1], feats[-1]
        return first

    def _kept_positions(self, input_ids: np.ndarray, received: np.ndarray) -> np.ndarray:
        """Visual token compression: all text positions plus the most-attended fraction of image positions."""
        keep_frac = float(self.info.get("keep_visual", 1.0))
        image = np.flatnonzero(input_ids == self.pipe.image_token_id)
        keep = np.ones(len(input_ids), bool)
        if keep_frac < 1.0 and len(image):
            n_keep = int(np.ceil(keep_frac * len(image)))
            order = np.argsort(-received[image], kind="stable")
            keep[image[order[n_keep:]]] = False
        return np.flatnonzero(keep)

    def _choose(self, logits: np.ndarray) -> int:
        if self.cfg.greedy:
            return int(np.argmax(logits))
        p = probabilities(logits, self.cfg)
        return int(min(np.searchsorted(np.cumsum(p), self.rng.random() * p.sum(), side="right"), len(p) - 1))

    # --- one step -----------------------------------------------------------------------------------
    def step(self, max_tokens: int | None = None) -> StepResult:
        room = self.pipe.max_positions - self.dec.length  # verified positions that stay inside the context
        budget = max(1, min(self.tree.total_tokens, room))
        nodes = self._draft(budget)
        order = self._select(nodes, budget)
        logits, hidden = self._verify(nodes, order)
        path, bonus = self._accept(nodes, order, logits)
        self.dec.commit(path)
        tokens = [nodes[order[i]].token for i in path[1:]] + [bonus]
        self._catch_up(nodes, order, path, hidden, bonus)
        return StepResult(tokens, len(path) - 1, len(order))

    def _draft(self, budget: int) -> list[_Node]:
        k, depth = self.tree.top_k, self.tree.depth
        nodes = [_Node(self.root, -1, 0, 0.0)]
        if budget == 1:
            return nodes
        base_self, base_mem = self.drafter.self_len, self.drafter.mem_len
        root_pos = self.dec.length
        # scratch rows: drafter self entries and memory entries, each tagged with the node it belongs to
        self_owner: list[int] = []
        mem_owner: list[int] = []
        queried: dict[int, tuple[np.ndarray, np.ndarray]] = {0: (self.root_logits, self.root_feature)}
        frontier = [0]
        pending_mem = [(0, self.root_feature)]  # features to append to memory with the next call
        for d in range(1, depth + 1):
            cands = []
            for u in frontier:
                lp = _log_softmax(queried[u][0])
                top = np.argsort(-lp, kind="stable")[:k]
                for di, tok in zip(top, self.drafter.to_target(top)):
                    cands.append((nodes[u].logp + float(lp[di]), u, int(tok)))
            cands.sort(key=lambda c: -c[0])
            new = []
            for logp, u, tok in cands:
                nodes.append(_Node(tok, u, d, logp))
                nodes[u].children.append(len(nodes) - 1)
                new.append(len(nodes) - 1)
            if d == depth:
                break
            frontier = new[:k]  # EAGLE-2: expand the best K nodes of this depth
            anc_nodes = [self._ancestors(nodes, u) for u in frontier]
            own_self = self_owner + frontier
            own_mem = mem_owner + [u for u, _ in pending_mem]
            self_allowed = np.ones((len(frontier), base_self + len(own_self)), bool)
            cross_allowed = np.ones((len(frontier), base_mem + len(own_mem)), bool)
            for qi, anc in enumerate(anc_nodes):
                self_allowed[qi, base_self:] = [o in anc for o in own_self]
                cross_allowed[qi, base_mem:] = [o in anc and o != frontier[qi] for o in own_mem]
            emb = self.pipe.embed(np.array([nodes[u].token for u in frontier]))
            memory = np.stack([f for _, f in pending_mem])
            mem_positions = [root_pos + nodes[u].depth for u, _ in pending_mem]
            logits, feats = self.drafter.call(emb, [root_pos + d for _ in frontier], self_allowed,
                                              memory, mem_positions, cross_allowed)
            self_owner += frontier
            mem_owner += [u for u, _ in pending_mem]
            for qi, u in enumerate(frontier):
                queried[u] = (logits[qi], feats[qi])
            pending_mem = [(u, feats[qi]) for qi, u in enumerate(frontier)]
        self.drafter.rollback(base_self, base_mem)
        return nodes

    @staticmethod
    def _ancestors(nodes, u) -> set[int]:
        out = set()
        while u >= 0:
            out.add(u)
            u = nodes[u].parent
        return out

    def _select(self, nodes: list[_Node], budget: int) -> list[int]:
        """Root + the best budget-1 nodes by cumulative log-prob, closed under ancestors, parents first."""
        ranked = sorted(range(1, len(nodes)), key=lambda i: -nodes[i].logp)
        chosen = {0}
        for i in ranked:
            if len(chosen) >= budget:
                break
            anc = self._ancestors(nodes, i)
            if len(chosen | anc) <= budget:
                chosen |= anc
        return sorted(chosen, key=lambda i: (nodes[i].depth, i))

    def _verify(self, nodes, order):
        index = {u: j for j, u in enumerate(order)}
        parents = np.array([index.get(nodes[u].parent, -1) for u in order])
        p = self.dec.length
        allowed = np.concatenate([np.ones((len(order), p), bool), ancestor_matrix(parents)], axis=1)
        mask = np.where(allowed, 0.0, self.pipe.mask_min).astype(np.float32)[None, None]
        positions = p + np.array([nodes[u].depth for u in order])
        out = self.dec.run(self.pipe.embed(np.array([nodes[u].token for u in order]))[None], mask, positions)
        return out["logits"][0], out["hidden_states"][0]

    def _accept(self, nodes, order, logits):
        """Returns the accepted rows (root first) and the bonus token (see the module docstring)."""
        index = {u: j for j, u in enumerate(order)}
        row = 0
        path = [0]
        while True:
            kids = [c for c in nodes[order[row]].children if c in index]
            if self.cfg.greedy:
                target = int(np.argmax(logits[row]))
                match = next((c for c in kids if nodes[c].token == target), None)
                if match is None:
                    return path, target
            else:
                p = probabilities(logits[row], self.cfg)
                match = None
                for c in kids:  # children in draft order (best first)
                    tok = nodes[c].token
                    if p[tok] > 0 and self.rng.random() * p.sum() < p[tok]:
                        match = c
                        break
                    p[tok] = 0.0
                if match is None:
                    s = p.sum()
                    bonus = int(min(np.searchsorted(np.cumsum(p), self.rng.random() * s, side="right"), len(p) - 1))
                    return path, bonus
            row = index[match]
            path.append(row)

    def _catch_up(self, nodes, order, path, hidden, bonus):
        p0 = self.dec.length - len(path)  # position of the root
        tokens = [nodes[order[i]].token for i in path[1:]] + [bonus]
        positions = [p0 + 1 + i for i in range(len(tokens))]
        logits, feats = self.drafter.catch_up(self.pipe.embed(np.array(tokens)), positions,
                                              hidden[path], [p0 + i for i in range(len(path))])
        self.root, self.root_logits, self.root_feature = bonus, logits[-1], feats[-1]


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max()
    return x - np.log(np.exp(x).sum())
