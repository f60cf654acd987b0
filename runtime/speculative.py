"""DREAM speculative decoding over the exported graphs: draft a tree, verify it in one target call,
accept, commit. Torch-free.

One step (``SpeculativeDecoder.step``):
  1. draft   — EAGLE-2 dynamic tree: from the root (the last emitted token) expand the top-K children of
               the top-K frontier nodes by cumulative draft log-prob, depth by depth; keep the best
               N-1 nodes (+ root). With ``TreeSpec.lookup`` L > 0, up to L of the N nodes are a copy of what
               followed the latest earlier occurrence of the context's last 1-3 tokens (prompt lookup),
               ranked with the drafter's nodes (``LOOKUP_LOGP``): answers repeat the question's words.
  2. verify  — one target call over the N nodes with the tree mask, positions = context + depth.
  3. accept  — walk down from the root. At each node the target's distribution p decides among the
               node's children in draft order: child c is accepted with probability p(c); a rejected
               child's mass is removed and p renormalised. If no child is accepted, the next token is
               drawn from what is left of p (the bonus). Greedy is the same walk with p one-hot, so
               greedy output equals plain greedy decoding and sampled output has the target's law.
  4. commit  — the accepted path's target K/V are kept (moved down in place). The drafter's catch-up on
               the accepted tokens (with the target's real features) is the first part of the next draft.
Two drafting paths give the same tree: the bundle's ``draft_tree`` graph (catch-up + every level in one
call, for the exported D and K) and depth-by-depth calls of the ``drafter`` graph (any D, K).
The drafter's memory (cross-attention over target features) holds only the kept image tokens
(visual token compression); the target always sees all of them.

"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .sampling import SamplingConfig, probabilities
from .tree import TreeSpec, ancestor_matrix


@dataclass
class DraftTree:
    """Node 0 is the root; nodes 1.. are the drafted candidates. parents[0] = -1."""

    tokens: np.ndarray   # int64 target ids
    scores: np.ndarray   # cumulative draft log-prob (root 0)
    parents: np.ndarray  # int64
    depth: np.ndarray    # int64


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


class _Positions:
    """A growable int64 vector, rolled back by length."""

    def __init__(self, cap: int = 256):
        self.data = np.zeros(cap, np.int64)
        self.length = 0

    def view(self) -> np.ndarray:
        return self.data[: self.length]

    def append(self, values) -> None:
        values = np.asarray(values, np.int64)
        n = len(values)
        if self.length + n > len(self.data):
            self.data = np.concatenate([self.data[: self.length], np.zeros(max(len(self.data), n), np.int64)])
        self.data[self.length: self.length + n] = values
        self.length += n


def tree_graph_for(backend, manifest: dict) -> str | None:
    """The one-call draft graph this backend runs: the quantized ORT-CPU twin when the bundle has one and
    the backend is ONNX Runtime on a CPU, otherwise the float (TensorRT-parsable) graph."""
    info = manifest.get("drafter") or {}
    ort_cpu = info.get("tree_graph_ort_cpu")
    if ort_cpu and ort_cpu in manifest["graphs"] and backend.ort_cpu:
        return ort_cpu
    return info.get("tree_graph")


class DrafterState:
    """The drafter's caches: its own token stream (self-attention K/V of blocks 0 and 2) and the memory
    (cross-attention K/V of target or drafted features), each with the positions of its entries."""

    def __init__(self, pipe, info: dict):
        self.backend = pipe.backend
        self.spec = pipe.bundle.graph(info["graph"])
        self.tree_graph = tree_graph_for(pipe.backend, pipe.bundle.manifest)
        self.mask_min = float(self.spec["mask_min"])
        shapes = {t["name"]: t["shape"] for t in self.spec["inputs"]}
        cap = 256
        # each cache's (heads, head_dim) comes from the graph's declared input shape
        self.kv = {name: _Grow(shapes[name][1], shapes[name][3], cap) for name in self.spec["past"]}
        self.self_pos = _Positions()
        self.mem_pos = _Positions()
        d2t = info.get("draft_to_target")
        self.d2t = np.load(pipe.bundle.file(d2t), allow_pickle=False) if d2t else None

    @property
    def self_len(self) -> int:
        return self.self_pos.length

    @property
    def mem_len(self) -> int:
        return self.mem_pos.length

    def _feeds(self, embeds, positions, self_allowed, memory, cross_allowed) -> dict:
        feeds = {
            "inputs_embeds": np.asarray(embeds, np.float32)[None],
            "position_ids": np.asarray(positions, np.int64)[None],
            "attention_mask": np.where(self_allowed, np.float32(0.0), np.float32(self.mask_min))[None, None],
            "memory": np.asarray(memory, np.float32)[None],
            "cross_mask": np.where(cross_allowed, np.float32(0.0), np.float32(self.mask_min))[None, None],
        }
        for name in self.spec["past"]:
            feeds[name] = self.kv[name].view()
        return feeds

    def _append(self, out: dict, positions, mem_positions) -> None:
        for past, present in zip(self.spec["past"], self.spec["present"]):
            self.kv[past].append(out[present])
        self.self_pos.append(positions)
        self.mem_pos.append(mem_positions)

    def call(self, embeds, positions, self_allowed, memory, mem_positions, cross_allowed):
        """Run the drafter over Q queries with M new memory rows; every new row is appended (the caller rolls back)."""
        out = self.backend.run("drafter", self._feeds(embeds, positions, self_allowed, memory, cross_allowed))
        self._append(out, positions, mem_positions)
        return out["logits"][0], out["features"][0]

    def _catch_up_masks(self, positions, feature_positions):
        pos = np.asarray(positions, np.int64)
        self_pos = np.concatenate([self.self_pos.view(), pos])
        mem_pos = np.concatenate([self.mem_pos.view(), np.asarray(feature_positions, np.int64)])
        return self_pos[None, :] <= pos[:, None], mem_pos[None, :] < pos[:, None]

    def catch_up(self, embeds, positions, features, feature_positions):
        """Committed tokens and the target's features for the positions before them: causal, memory strictly earlier."""
        self_allowed, cross_allowed = self._catch_up_masks(positions, feature_positions)
        return self.call(embeds, positions, self_allowed, features, feature_positions, cross_allowed)

    def draft_tree(self, embeds, positions, features, feature_positions):
        """Catch-up and the whole unrolled tree search in one call of the ``draft_tree`` graph; keeps the
        catch-up rows. Returns the candidates' target ids, cumulative log-probs and parents (-1 = root)."""
        self_allowed, cross_allowed = self._catch_up_masks(positions, feature_positions)
        out = self.backend.run(self.tree_graph, self._feeds(embeds, positions, self_allowed, features, cross_allowed))
        self._append(out, positions, feature_positions)
        return out["tree_tokens"], out["tree_scores"], out["tree_parents"]

    def rollback_to_position(self, position: int) -> None:
        """Keep only the entries for positions < ``position`` (entries are appended in position order)."""
        self.rollback(int(np.searchsorted(self.self_pos.view(), position)),
                      int(np.searchsorted(self.mem_pos.view(), position)))

    def rollback(self, self_len: int, mem_len: int) -> None:
        for name, g in self.kv.items():
            g.length = mem_len if "mem" in name else self_len
        self.self_pos.length = self_len
        self.mem_pos.length = mem_len

    def to_target(self, draft_ids: np.ndarray) -> np.ndarray:
        return draft_ids if self.d2t is None else self.d2t[draft_ids]


@dataclass
class _Node:
    token: int
    parent: int        # index into the node list; -1 for the root
    depth: int
    logp: float
    children: list[int] = field(default_factory=list)


@dataclass
class _CatchUp:
    """What the drafter has not seen yet: the tokens emitted by the last step and the target features
    for the positions before each of them."""

    embeds: np.ndarray
    positions: np.ndarray
    features: np.ndarray
    feature_positions: np.ndarray
    upto: int  # once caught up, the drafter's caches are valid for positions < upto


class SpeculativeDecoder:
    """Drives one sequence: ``start`` after the target prefill, then ``step`` until the caller stops.

    ``unrolled=None`` uses the bundle's one-call ``draft_tree`` graph when its (D, K) equal the tree's."""

    def __init__(self, pipe, tree: TreeSpec, cfg: SamplingConfig, rng: np.random.Generator,
                 unrolled: bool | None = None, ctx=None):
        from .context import Context

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
            from .errors import BundleError

            raise BundleError(f"the unrolled draft graph was asked for, but the bundle has none for depth "
                              f"{tree.depth}, top-k {tree.top_k} (it has: {graph.get('depth')}, {graph.get('top_k')})")
        self.unrolled = fits if unrolled is None else unrolled
        if self.unrolled:
            k, c = tree.top_k, int(graph["candidates"])
            self._tree_depth = np.concatenate([[0, *([1] * k)], np.repeat(np.arange(2, tree.depth + 1), k * k)])[: c + 1]
        self.root = -1
        self.pending: _CatchUp | None = None
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
        self.pending = _CatchUp(np.concatenate([embeds, self.pipe.embed(np.array([first]))]),
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
    def step(self, max_tokens: int | None = None) -> StepResult:
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
        self.pending = _CatchUp(self.pipe.embed(np.array(tokens)), p0 + 1 + np.arange(len(tokens)),
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
                queried[u] = logits[qi]
            pending_mem = [(u, feats[qi]) for qi, u in enumerate(frontier)]
        self.drafter.rollback(base_self, base_mem)
        return nodes

    def _with_lookup(self, tree: DraftTree, n: int) -> DraftTree:
        """``tree`` with the prompt-lookup chain below the root (``lookup_continuation`` of the context and the
        root). Each copied token reuses the drafter's node for it when there is one, else a new node is added; a
        copied token at depth d scores d x ``LOOKUP_LOGP`` (a reused node keeps the higher of its two scores), so
        ``_select`` ranks the chain with the drafter's nodes. Every node still has distinct children, so
        acceptance (greedy or sampled) is unchanged: lossless whatever proposed the tokens. (Chains below the
        drafter's best nodes as well were tried: no gain on held-out text.)"""
        seq = np.append(self.ctx.ids[: self.dec.length], self.root)
        chain = lookup_continuation(seq, n, self.pipe.image_token_id)
        if not chain:
            return tree
        tokens, scores = list(tree.tokens), list(tree.scores)
        parents, depth = list(tree.parents), list(tree.depth)
        child = {(int(p), int(t)): i for i, (p, t) in enumerate(zip(parents, tokens)) if p >= 0}
        at = 0
        for tok in chain:
            node = child.get((at, tok))
            if node is None:
                node = len(tokens)
                tokens.append(tok)
                parents.append(at)
                depth.append(depth[at] + 1)
                scores.append(depth[-1] * LOOKUP_LOGP)
                child[(at, tok)] = node
            else:
                scores[node] = max(scores[node], depth[node] * LOOKUP_LOGP)
            at = node
        return DraftTree(np.array(tokens, np.int64), np.array(scores, np.float64), np.array(parents, np.int64),
                         np.array(depth, np.int64))

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


# The score of a copied token at depth d is d * LOOKUP_LOGP, as if each were accepted with probability ~0.6: a
# chain outranks the drafter's unsure nodes and yields to its confident ones. Chosen on held-out data other than
# the benchmarks' (68 held-out instructions, 24 scenes on smolvlm-smollm2): 0 (always first) cost image prompts
# acceptance (3.73 -> 3.45), -1 gave up part of the text gain; -0.25 .. -0.5 kept both.
LOOKUP_LOGP = -0.5


def lookup_continuation(seq: np.ndarray, n: int, image_token_id: int | None = None, max_ngram: int = 3,
                        min_ngram: int = 1) -> list[int]:
    """Prompt lookup (Saxena 2023; "copy" drafting): the up to ``n`` tokens that followed the latest earlier
    occurrence of ``seq``'s last g tokens, for the longest g in ``max_ngram``..``min_ngram`` that occurs; [] when
    none does. A continuation stops before an image token (never an answer token). Answers often repeat the
    question's words; a small drafter misses many of them."""
    seq = np.asarray(seq, np.int64)
    if n <= 0 or len(seq) < 2:
        return []
    for g in range(min(max_ngram, len(seq) - 1), min_ngram - 1, -1):
        tail = seq[-g:]
        windows = np.lib.stride_tricks.sliding_window_view(seq[:-1], g)  # starts 0 .. len-1-g: each has a next token
        hits = np.flatnonzero((windows == tail).all(axis=1))
        if len(hits):
            start = int(hits[-1]) + g
            out = [int(t) for t in seq[start: start + n]]
            if image_token_id is not None and image_token_id in out:
                out = out[: out.index(image_token_id)]
            if out:
                return out
    return []


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max()
    return x - np.log(np.exp(x).sum())
