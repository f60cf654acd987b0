"""Prompt lookup (Saxena 2023; "copy" drafting): tokens copied from what followed an earlier occurrence of the
context's last few tokens, grafted onto the drafted tree as one more chain below the root. Answers often repeat
the question's words; a small drafter misses many of them. Lossless whatever proposed the tokens: acceptance
only needs every node's children to be distinct, and grafting keeps them so."""

from __future__ import annotations

import numpy as np

from .tree import DraftTree

# The score of a copied token at depth d is d * LOOKUP_LOGP, as if each were accepted with probability ~0.6: a
# chain outranks the drafter's unsure nodes and yields to its confident ones. Chosen on held-out data other than
# the benchmarks' (68 held-out instructions, 24 scenes on smolvlm-smollm2): 0 (always first) cost image prompts
# acceptance (3.73 -> 3.45), -1 gave up part of the text gain; -0.25 .. -0.5 kept both.
LOOKUP_LOGP = -0.5


def lookup_continuation(seq: np.ndarray, n: int, image_token_id: int | None = None, max_ngram: int = 3,
                        min_ngram: int = 1) -> list[int]:
    """The up to ``n`` tokens that followed the latest earlier occurrence of ``seq``'s last g tokens, for the
    longest g in ``max_ngram``..``min_ngram`` that occurs; [] when none does. A continuation stops before an
    image token (never an answer token)."""
    seq = np.asarray(seq, np.int64)
    m = len(seq)
    if n <= 0 or m < 2:
        return []
    # ends j of earlier windows (each followed by a token: j <= m - 2) whose last token is the context's last; a
    # g-gram matches where the g - 1 tokens before j match too (one pass over the context, then only the candidates)
    ends = np.flatnonzero(seq[: m - 1] == seq[-1])
    for g in range(min(max_ngram, m - 1), min_ngram - 1, -1):
        hit = ends[ends >= g - 1]
        for k in range(1, g):
            hit = hit[seq[hit - k] == seq[m - 1 - k]]
        if len(hit):
            start = int(hit[-1]) + 1
            out = [int(t) for t in seq[start: start + n]]
            if image_token_id is not None and image_token_id in out:
                out = out[: out.index(image_token_id)]
            if out:
                return out
    return []


def graft_chain(tree: DraftTree, chain: list[int]) -> DraftTree:
    """``tree`` with ``chain`` hanging below the root, token by token. Each copied token reuses the drafter's node
    for it when there is one, else a new node is added; a copied token at depth d scores d x ``LOOKUP_LOGP`` (a
    reused node keeps the higher of its two scores), so the verify selection ranks the chain with the drafter's
    nodes. Every node still has distinct children."""
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
