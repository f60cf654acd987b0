"""DREAM speculative decoding over the exported graphs: draft a tree, verify it in one target call,
accept, commit. Torch-free.

One step (``SpeculativeDecoder.step``):
  1. draft   — EAGLE-2 dynamic tree: from the root (the last emitted token) expand the top-K children of
               the top-K frontier nodes by cumulative draft log-prob, depth by depth; keep the best
               N-1 nodes (+ root). With ``TreeSpec.lookup`` L > 0, up to L of the N nodes are a copy of what
               followed the latest earlier occurrence of the context's last 1-3 tokens (prompt lookup),
               ranked with the drafter's nodes (``lookup.py``): answers repeat the question's words.
  2. verify  — one target call over the N nodes with the tree mask, positions = context + depth.
  3. accept  — walk down from the root. At each node the target's distribution p decides among the
               node's children in draft order: child c is accepted with probability p(c); a rejected
               child's mass is removed and p renormalised. If no child is accepted, the next token is
               drawn from what is left of p (the bonus). Greedy is the same walk with p one-hot, so
               greedy output equals plain greedy decoding and sampled output has the target's law.
  4. commit  — the accepted path's target K/V are kept (moved down in place). The drafter's catch-up on
               the accepted tokens (with the target's real features) is the first part of the next draft.
Two drafting paths give the same tree: the bundle's ``draft_tree`` graph (catch-up + every level in one
call, for the exported D and K) and depth-by-depth calls of the ``drafter`` graph (any D, K); the drafter's
caches and catch-up are ``drafter.py``'s.
The drafter's memory (cross-attention over target features) holds only the kept image tokens
(visual token compression); the target always sees all of them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .context import Context
from .drafter import CatchUp, DrafterState
from .errors import BundleError
from .lookup import graft_chain, lookup_continuation
from .sampling import SamplingConfig, probabilities
from .tree import DraftTree, TreeSpec, ancestor_matrix


@dataclass
class StepResult:
    tokens: list[int]          # emitted this step: the accepted draft tokens, then the bonus token
    accepted: int              # accepted draft tokens (tokens = accepted + 1)
    tree_size: int


@dataclass
class _Node:
    token: int
    parent: int        # index into the node list; -1 for the root
    depth: int
    logp: float


class SpeculativeDecoder:
    """Drives one sequence: ``start`` after the target prefill, then ``step`` until the caller stops.

    ``unrolled=None`` uses the bundle's one-call ``draft_tree`` graph when its (D, K) equal the tree's."""

    def __init__(self, pipe, tree: TreeSpec, cfg: SamplingConfig, rng: np.random.Generator,
                 unrolled: bool | None = None, ctx=None):
        self.pipe = pipe
        self.tree = tree
        self.cfg = cfg
        self.rng = rng
        self.info = pipe.bundle.manifest["drafter"]
        self.ctx = ctx if ctx is not None else Context(pipe, slack=tree.total_tokens)
        if self.ctx.drafter is None:
            self.ctx.drafter = DrafterState(pipe, self.info)
        self.drafter = self.ctx.drafter
        self.dec = self.ctx.dec
        graph = pipe.bundle.manifest["graphs"].get(self.drafter.tree_graph or "", {})
        fits = bool(graph) and (graph.get("depth"), graph.get("top_k")) == (tree.depth, tree.top_k)
        if unrolled and not fits:
            raise BundleError(f"the unrolled draft graph was asked for, but the bundle has none for depth "
                              f"{tree.depth}, top-k {tree.top_k} (it has: {graph.get('depth')}, {graph.get('top_k')})")
        self.unrolled = fits if unrolled is None else unrolled
        if self.unrolled:
            k, c = tree.top_k, int(graph["candidates"])
            self._tree_depth = np.concatenate([[0, *([1] * k)], np.repeat(np.arange(2, tree.depth + 1), k * k)])[: c + 1]
        self.root = -1
        self.pending: CatchUp | None = None
        self.min_logp = tree.min_logp

    # --- setup --------------------------------------------------------------------------------------
    def start(self, prompt_embeds: np.ndarray, input_ids: np.ndarray) -> int:
        """Target prefill of a whole prompt and the first token (see ``begin``). Returns the first token."""
        input_ids = np.asarray(input_ids, np.int64)
        self.ctx.image_embeds = prompt_embeds[0][input_ids == self.pipe.image_token_id]
        return self.begin(self.ctx.prefill(input_ids, prompt_embeds))

    def begin(self, logits: np.ndarray) -> int:
        """After the context's prefill: choose the first token from the last position's ``logits``. What the
        drafter has not seen (every position from where its caches stop being valid, prompt included, with the
        target's features for them, then the first token) becomes the first catch-up. Returns the first token."""
        ctx = self.ctx
        first = self._choose(logits)
        n = ctx.length
        upto = min(ctx.drafter_upto, n)
        self.drafter.rollback_to_position(upto)
        keep = ctx.kept_positions(upto, n, float(self.info.get("keep_visual", 1.0)))
        embeds = ctx.embeds_for(ctx.ids[:n], upto)[keep - upto]
        self.root = first
        self.pending = CatchUp(np.concatenate([embeds, self.pipe.embed(np.array([first]))]),
                               np.append(keep, n), ctx.hidden[keep], keep, n)
        return first

    def snapshot(self):
        """State between steps (for tests that replay one step many times)."""
        return self.dec.length, self.drafter.self_len, self.drafter.mem_len, self.root, self.pending, self.ctx.drafter_upto

    def restore(self, snap) -> None:
        self.dec.truncate(snap[0])
        self.drafter.rollback(snap[1], snap[2])
        self.root, self.pending, self.ctx.drafter_upto = snap[3], snap[4], snap[5]

    def _choose(self, logits: np.ndarray) -> int:
        if self.cfg.greedy:
            return int(np.argmax(logits))
        p = probabilities(logits, self.cfg)
        return int(min(np.searchsorted(np.cumsum(p), self.rng.random() * p.sum(), side="right"), len(p) - 1))

    # --- one step -----------------------------------------------------------------------------------
    def step(self) -> StepResult:
        room = self.pipe.max_positions - self.dec.length  # verified positions that stay inside the context
        budget = max(1, min(self.tree.total_tokens, room))
        tree = self._draft_unrolled() if self.unrolled else self._draft_stepwise(budget)
        if self.tree.lookup and budget > 1:
            tree = self._with_lookup(tree, min(self.tree.lookup, budget - 1))
        order = self._select(tree, budget, self.dec.chains, self.min_logp)
        logits, hidden, parents = self._verify(tree, order)
        path, bonus = self._accept(tree, order, parents, logits)
        p0 = self.dec.length  # the root's position
        self.dec.commit(path)
        self.ctx.record(p0, tree.tokens[order[path]], hidden[path])
        tokens = [int(t) for t in tree.tokens[order[path[1:]]]] + [bonus]
        self.pending = CatchUp(self.pipe.embed(np.array(tokens)), p0 + 1 + np.arange(len(tokens)),
                               hidden[path], p0 + np.arange(len(path)), self.dec.length)
        self.root = bonus
        return StepResult(tokens, len(path) - 1, len(order))

    def _draft_unrolled(self) -> DraftTree:
        c = self.pending
        self.pending = None
        toks, scores, parents = self.drafter.draft_tree(c.embeds, c.positions, c.features, c.feature_positions)
        self.ctx.drafter_upto = c.upto
        return DraftTree(np.concatenate([[self.root], toks]), np.concatenate([[0.0], scores]),
                         np.concatenate([[-1], parents + 1]), self._tree_depth)

    def _draft_stepwise(self, budget: int) -> DraftTree:
        c = self.pending
        self.pending = None
        logits, feats = self.drafter.catch_up(c.embeds, c.positions, c.features, c.feature_positions)
        self.ctx.drafter_upto = c.upto
        nodes = self._draft(budget, logits[-1], feats[-1])
        return DraftTree(np.array([n.token for n in nodes], np.int64), np.array([n.logp for n in nodes]),
                         np.array([n.parent for n in nodes], np.int64), np.array([n.depth for n in nodes], np.int64))

    def _draft(self, budget: int, root_logits: np.ndarray, root_feature: np.ndarray) -> list[_Node]:
        k, depth = self.tree.top_k, self.tree.depth
        nodes = [_Node(self.root, -1, 0, 0.0)]
        if budget == 1:
            return nodes
        base_self, base_mem = self.drafter.self_len, self.drafter.mem_len
        root_pos = self.dec.length
        # scratch rows: drafter self entries and memory entries, each tagged with the node it belongs to
        self_owner: list[int] = []
        mem_owner: list[int] = []
        queried: dict[int, np.ndarray] = {0: root_logits}
        frontier = [0]
        pending_mem = [(0, root_feature)]  # features to append to memory with the next call
        for d in range(1, depth + 1):
            cands = []
            for u in frontier:
                lp = _log_softmax(queried[u])
                top = np.argsort(-lp, kind="stable")[:k]
                for di, tok in zip(top, self.drafter.to_target(top)):
                    cands.append((nodes[u].logp + float(lp[di]), u, int(tok)))
            cands.sort(key=lambda c: -c[0])
            new = []
            for logp, u, tok in cands:
                nodes.append(_Node(tok, u, d, logp))
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
                queried[u] = logits[qi]
            pending_mem = [(u, feats[qi]) for qi, u in enumerate(frontier)]
        self.drafter.rollback(base_self, base_mem)
        return nodes

    def _with_lookup(self, tree: DraftTree, n: int) -> DraftTree:
        """``tree`` with the prompt-lookup chain of up to ``n`` tokens below the root (``lookup.graft_chain``), ranked
        with the drafter's nodes by ``_select``. (Chains below the drafter's best nodes as well were tried: no gain
        on held-out text.)"""
        seq = np.append(self.ctx.ids[: self.dec.length], self.root)
        chain = lookup_continuation(seq, n, self.pipe.image_token_id)
        return graft_chain(tree, chain) if chain else tree

    @staticmethod
    def _ancestors(nodes, u) -> set[int]:
        out = set()
        while u >= 0:
            out.add(u)
            u = nodes[u].parent
        return out

    @staticmethod
    def _select(tree: DraftTree, budget: int, max_leaves: int | None = None, min_logp: float | None = None) -> np.ndarray:
        """Root + the best budget-1 candidates by cumulative log-prob (ties: shallower first), closed
        under ancestors; with ``max_leaves`` (a decoder that verifies root-to-leaf chains) a candidate that would
        make one leaf too many is passed over. A score never rises along a path, so the ranking puts parents
        before children and the result is already in verify order."""
        n = len(tree.tokens)
        if budget <= 1 or n == 1:
            return np.zeros(1, np.int64)
        rank = np.lexsort((np.arange(1, n), tree.depth[1:], -tree.scores[1:])) + 1
        chosen = np.zeros(n, bool)
        has_child = np.zeros(n, bool)
        chosen[0] = True
        out, leaves = [0], 1
        for i in rank:
            if min_logp is not None and tree.scores[i] < min_logp:
                break  # ranked by score: every later candidate is as unlikely
            p = tree.parents[i]
            if chosen[p]:
                more = 0 if not has_child[p] else 1  # a first child extends its parent's chain
                if max_leaves is not None and leaves + more > max_leaves:
                    continue
                chosen[i] = True
                has_child[p] = True
                leaves += more
                out.append(int(i))
                if len(out) == budget:
                    break
        return np.array(out, np.int64)

    def _verify(self, tree: DraftTree, order: np.ndarray):
        row_of = np.full(len(tree.tokens), -1, np.int64)
        row_of[order] = np.arange(len(order))
        p = tree.parents[order]
        parents = np.where(p >= 0, row_of[np.maximum(p, 0)], -1)  # each verified row's parent row
        embeds = self.pipe.embed(tree.tokens[order])[None]
        if self.dec.tree_native:
            out = self.dec.run_tree(embeds, parents)
            return out["logits"][0], out["hidden_states"][0], parents
        ctx = self.dec.length
        allowed = np.concatenate([np.ones((len(order), ctx), bool), ancestor_matrix(parents)], axis=1)
        mask = np.where(allowed, np.float32(0.0), np.float32(self.pipe.mask_min))[None, None]
        positions = ctx + tree.depth[order]
        out = self.dec.run(embeds, mask, positions)
        return out["logits"][0], out["hidden_states"][0], parents

    def _accept(self, tree: DraftTree, order: np.ndarray, parents: np.ndarray, logits: np.ndarray):
        """Returns the accepted rows (root first) and the bonus token (see the module docstring)."""
        tokens = tree.tokens[order]
        if self.cfg.greedy:
            child = {(int(parents[r]), int(tokens[r])): r for r in range(1, len(order))}
            target = logits.argmax(-1)
            row, path = 0, [0]
            while True:
                nxt = child.get((row, int(target[row])))
                if nxt is None:
                    return path, int(target[row])
                path.append(nxt)
                row = nxt
        kids: dict[int, list[int]] = {}
        for r in range(1, len(order)):  # rows are in draft rank order: children best first
            kids.setdefault(int(parents[r]), []).append(r)
        row, path = 0, [0]
        while True:
            p = probabilities(logits[row], self.cfg)
            match = None
            for c in kids.get(row, ()):
                tok = tokens[c]
                if p[tok] > 0 and self.rng.random() * p.sum() < p[tok]:
                    match = c
                    break
                p[tok] = 0.0
            if match is None:
                s = p.sum()
                return path, int(min(np.searchsorted(np.cumsum(p), self.rng.random() * s, side="right"), len(p) - 1))
            path.append(match)
            row = match


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max()
    return x - np.log(np.exp(x).sum())
