"""Next-token choice: greedy, or temperature / top-p sampling from an explicit seeded generator."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 0.0      # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        if not (self.temperature >= 0):
            raise ValueError(f"temperature {self.temperature}: expected >= 0 (0 means greedy)")
        if not (0 < self.top_p <= 1):
            raise ValueError(f"top_p {self.top_p}: expected 0 < top_p <= 1")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def probabilities(logits: np.ndarray, cfg: SamplingConfig) -> np.ndarray:
    """The distribution sampling draws from: softmax(logits / T), restricted to the top-p nucleus."""
    z = logits.astype(np.float64) / cfg.temperature
    z -= z.max()
    p = np.exp(z)
    p /= p.sum()
    if cfg.top_p < 1.0:
        # transformers' TopPLogitsWarper rule: drop the low tail whose total mass is <= 1 - top_p
        order = np.argsort(p, kind="stable")
        drop = np.cumsum(p[order]) <= 1 - cfg.top_p
        drop[-1] = False  # always keep the most likely token
        mask = np.ones_like(p, dtype=bool)
        mask[order[drop]] = False
        p = np.where(mask, p, 0.0)
        p /= p.sum()
    return p


def sample(p: np.ndarray, rng: np.random.Generator) -> int:
    return int(min(np.searchsorted(np.cumsum(p), rng.random() * p.sum(), side="right"), len(p) - 1))


def choose(logits: np.ndarray, cfg: SamplingConfig, rng: np.random.Generator) -> int:
    if cfg.greedy:
        return int(np.argmax(logits))
    return sample(probabilities(logits, cfg), rng)
