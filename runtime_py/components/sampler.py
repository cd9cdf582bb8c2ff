"""Token sampling: greedy at temperature 0, else temperature, top-k and top-p (nucleus), seeded."""

from __future__ import annotations

import numpy as np

from models.errors import InputError


class Sampler:
    def __init__(self, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0):
        if temperature < 0 or top_k < 0 or not 0 < top_p <= 1:
            raise InputError("sampling: need temperature >= 0, top_k >= 0 and 0 < top_p <= 1")
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.rng = np.random.default_rng(seed)

    def __call__(self, logits: np.ndarray) -> int:
        logits = np.asarray(logits, dtype=np.float64).reshape(-1)
        if self.temperature == 0 or self.top_k == 1:
            return int(np.argmax(logits))
        order = np.argsort(-logits, kind="stable")
        if self.top_k:
            order = order[: self.top_k]
        z = logits[order] / self.temperature
        p = np.exp(z - z.max())
        p /= p.sum()
        if self.top_p < 1:
            keep = np.searchsorted(np.cumsum(p), self.top_p) + 1
            order, p = order[:keep], p[:keep] / p[:keep].sum()
        return int(order[self.rng.choice(len(order), p=p)])
