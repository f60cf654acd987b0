"""Draft trees: the one frozen TreeSpec, one drafted tree (``DraftTree``), and tree masks / positions for a verify
call (numpy only).

A tree of N nodes is given by ``parents``: parents[i] < i is the index of node i's parent, -1 for the
root. Node i may attend the whole cached prefix, its ancestors and itself.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class TreeSpec:
    """Total verified tokens N (root included), draft depth D, top-k K per expansion (EAGLE-2 dynamic tree);
    ``lookup`` L: up to L of the N nodes may be a copy of what followed the context's latest earlier occurrence
    of its last tokens (prompt lookup, ``lookup.lookup_continuation``), 0 = the drafter's tree alone;
    ``min_logp`` P: candidates whose cumulative draft log-prob is below P are not verified (a verify row costs
    a share of a decode step, and one unlikely to be accepted does not pay for it), None = fill all N."""

    total_tokens: int = 32
    depth: int = 6
    top_k: int = 4
    lookup: int = 0
    min_logp: float | None = None

    def __post_init__(self):
        if self.total_tokens < 1 or self.depth < 1 or self.top_k < 1:
            raise ValueError(f"TreeSpec needs positive N, D, K; got {self}")
        if self.lookup < 0:
            raise ValueError(f"TreeSpec lookup must be >= 0; got {self}")
        if self.min_logp is not None and not self.min_logp <= 0:
            raise ValueError(f"TreeSpec min_logp must be a log-probability (<= 0); got {self}")

    def to_json(self) -> dict:
        data = asdict(self)
        if not self.lookup:  # manifests written before lookup existed read the same
            data.pop("lookup")
        if self.min_logp is None:
            data.pop("min_logp")
        return data

    @classmethod
    def from_json(cls, data: dict) -> "TreeSpec":
        return cls(**data)

    @classmethod
    def parse(cls, text: str) -> "TreeSpec":
        """``N,D,K``, ``N,D,K,L`` (L: prompt-lookup tokens) or ``N,D,K,L,P`` (P: the least cumulative draft
        log-prob verified), as the command lines take it."""
        try:
            parts = text.split(",")
            if len(parts) not in (3, 4, 5):
                raise ValueError(text)
            return cls(*[int(x) for x in parts[:4]], *[float(x) for x in parts[4:]])
        except ValueError as exc:
            raise ValueError(f"tree {text!r}: expected N,D,K, N,D,K,L or N,D,K,L,P (positive total tokens, depth, "
                             f"top-k; L >= 0 prompt-lookup tokens; P <= 0 the least log-prob verified), such as "
                             f"32,6,4 or 8,3,2,8,-1.5") from exc


@dataclass
class DraftTree:
    """One drafted tree. Node 0 is the root; nodes 1.. are the drafted candidates. parents[0] = -1."""

    tokens: np.ndarray   # int64 target ids
    scores: np.ndarray   # cumulative draft log-prob (root 0)
    parents: np.ndarray  # int64
    depth: np.ndarray    # int64


def depths(parents: np.ndarray) -> np.ndarray:
    d = np.zeros(len(parents), dtype=np.int64)
    for i, p in enumerate(parents):
        if p >= 0:
            if p >= i:
                raise ValueError(f"parents[{i}] = {p}: a parent must come before its child")
            d[i] = d[p] + 1
    return d


def ancestor_matrix(parents: np.ndarray) -> np.ndarray:
    """[N,N] bool: row i is True at i and at every ancestor of i."""
    n = len(parents)
    m = np.eye(n, dtype=bool)
    for i, p in enumerate(parents):
        if p >= 0:
            m[i] |= m[p]
    return m


def tree_mask(parents: np.ndarray, past_len: int, mask_min: float) -> np.ndarray:
    """Additive mask [1,1,N,past_len+N]: 0 where allowed, mask_min elsewhere."""
    n = len(parents)
    allowed = np.concatenate([np.ones((n, past_len), dtype=bool), ancestor_matrix(parents)], axis=1)
    return np.where(allowed, 0.0, mask_min).astype(np.float32)[None, None]


def causal_mask(q_len: int, past_len: int, mask_min: float) -> np.ndarray:
    if q_len == 1:  # a decode step sees everything
        return np.zeros((1, 1, 1, past_len + 1), np.float32)
    return tree_mask(np.arange(q_len) - 1, past_len, mask_min)


def image_block_mask(mask: np.ndarray, is_image: np.ndarray, past_len: int) -> np.ndarray:
    """Open ``mask`` ([1,1,Q,P+Q], the Q new positions' causal mask) so that every image token sees every image
    token of its own block (a run of consecutive image tokens), later ones included, as transformers' Gemma 3
    masks the prompt (``token_type_ids``): text stays causal, and one image never sees a later image."""
    is_image = np.asarray(is_image, bool)
    run = np.cumsum(np.concatenate([[is_image[0]], is_image[1:] & ~is_image[:-1]]))  # block number of each token
    block = np.where(is_image, run, 0)
    same = (block[:, None] == block[None, :]) & is_image[:, None]
    out = mask.copy()
    out[0, 0, :, past_len:][same] = 0.0
    return out


def random_tree(n: int, rng: np.random.Generator) -> np.ndarray:
    """A random tree with nodes in parent-before-child order (for validation and tests)."""
    parents = np.full(n, -1, dtype=np.int64)
    for i in range(1, n):
        parents[i] = rng.integers(0, i)
    return parents
