"""One sequence's target state, reusable across calls (prefix reuse).

A ``Context`` holds the target decoder's K/V for the token ids in ``ids[:length]``, plus per position what
speculative decoding needs later: the target's final hidden state (the drafter's memory) and the attention
each position received during prompt prefills (visual token compression). ``prefill(ids)`` keeps the longest
common prefix of what is cached and what is asked, rolls the rest back and computes only the new suffix, so a
second question about the same frame, or the next turn of a chat, costs only its own tokens. The drafter's
state lives here too: it is valid for positions ``< drafter_upto`` and is rolled back with the target.
"""

from __future__ import annotations

import numpy as np

from . import rope
from .errors import InputError


class Context:
    def __init__(self, pipe, slack: int = 0):
        self.pipe = pipe
        self.dec = pipe.new_decoder(slack)
        # per-position arrays grow by doubling up to the decoder's capacity (zeroing the whole context's worth, ~20 MB
        # for 8k positions, cost every request milliseconds before its first token)
        rows = min(self.dec.capacity, 1024)
        self.ids = np.zeros(rows, np.int64)
        self.hidden = np.zeros((rows, int(pipe.text["hidden_size"])), np.float32)
        self.received = np.zeros(rows, np.float64)   # summed over the queries of every prompt prefill
        self._chunks: list[tuple[int, np.ndarray]] = []  # (start, that prefill's contribution to ``received``)
        self.image_embeds: np.ndarray | None = None  # [n_image_tokens, H]: what the image tokens stand for, in order
        self.image_grids: list | None = None  # (rows, cols) token grid per image: M-RoPE positions (runtime/rope.py)
        self.drafter = None        # drafter.DrafterState, created by the first speculative call
        self.drafter_upto = 0      # the drafter's caches are valid for positions < drafter_upto

    def set_images(self, embeds: np.ndarray | None, images: list) -> None:
        """The prompt's image embeddings (``Pipeline.vision``) and each image's token grid."""
        self.image_embeds = embeds
        self.image_grids = [self.pipe.pre.token_grid(i) for i in images] if self.pipe.rope_axes == 3 else None

    def _reserve(self, n: int) -> None:
        """Room for positions < ``n`` in the per-position arrays."""
        have = len(self.ids)
        if n <= have:
            return
        rows = have
        while rows < n:
            rows *= 2
        rows = max(min(rows, self.dec.capacity), n)
        self.ids = np.concatenate([self.ids, np.zeros(rows - have, np.int64)])
        self.hidden = np.concatenate([self.hidden, np.zeros((rows - have, self.hidden.shape[1]), np.float32)])
        self.received = np.concatenate([self.received, np.zeros(rows - have, np.float64)])

    @property
    def length(self) -> int:
        return self.dec.length

    def truncate(self, length: int) -> None:
        """Roll back to the first ``length`` positions (a no-op when already shorter)."""
        length = max(0, min(length, self.length))
        self.dec.truncate(length)
        keep = []
        for start, contrib in self._chunks:
            if start >= length:
                self.received[: len(contrib)] -= contrib
            else:
                keep.append((start, contrib))
        self._chunks = keep
        self.received[length:] = 0.0
        self.drafter_upto = min(self.drafter_upto, length)

    def common_prefix(self, ids: np.ndarray) -> int:
        n = min(self.length, len(ids))
        diff = np.flatnonzero(self.ids[:n] != ids[:n])
        return int(diff[0]) if len(diff) else n

    def embeds_for(self, ids: np.ndarray, start: int) -> np.ndarray:
        """Input embeddings of ``ids[start:]``: token embeddings, image tokens replaced by the image embeddings
        (the k-th image token of the whole sequence gets row k)."""
        new = ids[start:]
        embeds = self.pipe.embed(new)
        slots = np.flatnonzero(new == self.pipe.image_token_id)
        if len(slots):
            first = int(np.count_nonzero(ids[:start] == self.pipe.image_token_id))
            have = 0 if self.image_embeds is None else len(self.image_embeds)
            total = first + len(slots)
            if total > have:
                raise InputError(f"{int(np.count_nonzero(ids == self.pipe.image_token_id))} image tokens in the prompt "
                                 f"but {have} image embeddings (text that spells the image token, or a missing image)")
            embeds[slots] = self.image_embeds[first:total]
        return embeds

    def prefill(self, ids: np.ndarray, prompt_embeds: np.ndarray | None = None) -> np.ndarray:
        """Make the cache hold ``ids``, computing only what is not cached already; returns the last position's
        logits. ``prompt_embeds`` ([1,S,H], optional) are the embeddings of all of ``ids``."""
        ids = np.asarray(ids, np.int64)
        n = len(ids)
        if n == 0:
            raise InputError("the prompt has no tokens")
        if n >= self.pipe.max_positions:
            raise InputError(f"the prompt is {n} tokens (images included); the model's context is "
                             f"{self.pipe.max_positions}: shorten it, use fewer/smaller images or start a new session")
        c = min(self.common_prefix(ids), n - 1)  # at least one position runs: its logits are the answer's start
        c = self.pipe.image_block_start(ids, c)  # an image block that sees itself whole is computed whole
        self.truncate(c)
        if self.pipe.rope_axes == 3:  # M-RoPE: the prompt's 3-axis positions, from its image grids
            self.dec.rope = rope.mrope_table(ids, self.pipe.image_token_id, self.image_grids)
        embeds = prompt_embeds[:, c:] if prompt_embeds is not None else self.embeds_for(ids, c)[None]
        out = self.pipe.step(self.dec, embeds, ids[c:], logits="last")
        self._reserve(n)
        self.ids[c:n] = ids[c:]
        self.hidden[c:n] = out["hidden_states"][0]
        if "attention_received" in out:
            contrib = out["attention_received"][0].astype(np.float64) * (n - c)  # mean over queries -> sum
            self.received[: len(contrib)] += contrib
            self._chunks.append((c, contrib))
        self.last_prefill = n - c
        return out["logits"][0, -1]

    def record(self, start: int, tokens, hidden: np.ndarray) -> None:
        """Positions ``start..`` were committed to the decoder with these tokens and hidden states."""
        n = len(tokens)
        self._reserve(start + n)
        self.ids[start:start + n] = tokens
        self.hidden[start:start + n] = hidden

    def kept_positions(self, start: int, end: int, keep_frac: float) -> np.ndarray:
        """Positions in [start, end) the drafter sees: every text position and the most-attended ``keep_frac``
        of all image positions (visual token compression, ranked over the whole sequence)."""
        ids = self.ids[:end]
        image = np.flatnonzero(ids == self.pipe.image_token_id)
        keep = np.ones(end, bool)
        if keep_frac < 1.0 and len(image):
            n_keep = int(np.ceil(keep_frac * len(image)))
            order = np.argsort(-self.received[image], kind="stable")
            keep[image[order[n_keep:]]] = False
        return start + np.flatnonzero(keep[start:])
