"""The DREAM drafter's side of a sequence: its caches (``DrafterState``), what it has not seen yet (``CatchUp``) and
which one-call draft graph a backend runs (``tree_graph_for``). The tree search itself is in ``speculative``."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .kv import AppendBuffer


def tree_graph_for(backend, manifest: dict) -> str | None:
    """The one-call draft graph this backend runs: the quantized ORT-CPU twin when the bundle has one and
    the backend is ONNX Runtime on a CPU, otherwise the float (TensorRT-parsable) graph."""
    info = manifest.get("drafter") or {}
    ort_cpu = info.get("tree_graph_ort_cpu")
    if ort_cpu and ort_cpu in manifest["graphs"] and backend.ort_cpu:
        return ort_cpu
    return info.get("tree_graph")


@dataclass
class CatchUp:
    """What the drafter has not seen yet: the tokens emitted by the last step and the target features
    for the positions before each of them."""

    embeds: np.ndarray
    positions: np.ndarray
    features: np.ndarray
    feature_positions: np.ndarray
    upto: int  # once caught up, the drafter's caches are valid for positions < upto


class DrafterState:
    """The drafter's caches: its own token stream (self-attention K/V of blocks 0 and 2) and the memory
    (cross-attention K/V of target or drafted features), each with the positions of its entries. They grow as
    needed (the tree search appends scratch rows and rolls them back)."""

    def __init__(self, pipe, info: dict):
        self.backend = pipe.backend
        self.spec = pipe.bundle.graph(info["graph"])
        self.tree_graph = tree_graph_for(pipe.backend, pipe.bundle.manifest)
        self.mask_min = float(self.spec["mask_min"])
        shapes = {t["name"]: t["shape"] for t in self.spec["inputs"]}
        cap = 256
        # each cache [1, heads, positions, head_dim]: (heads, head_dim) from the graph's declared input shape
        self.kv = {name: AppendBuffer((1, shapes[name][1], cap, shapes[name][3]), axis=2, grow=True)
                   for name in self.spec["past"]}
        self.self_pos = AppendBuffer((cap,), axis=0, dtype=np.int64, grow=True)
        self.mem_pos = AppendBuffer((cap,), axis=0, dtype=np.int64, grow=True)
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
        self.self_pos.append(np.asarray(positions, np.int64))
        self.mem_pos.append(np.asarray(mem_positions, np.int64))

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
        for name, buf in self.kv.items():
            buf.length = mem_len if "mem" in name else self_len
        self.self_pos.length = self_len
        self.mem_pos.length = mem_len

    def to_target(self, draft_ids: np.ndarray) -> np.ndarray:
        return draft_ids if self.d2t is None else self.d2t[draft_ids]
