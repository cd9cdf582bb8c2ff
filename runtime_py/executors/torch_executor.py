"""The torch backend: our eager TextDecoder, the golden reference every other backend is held to."""

from __future__ import annotations

import numpy as np
import torch

from models.text import TextDecoder


class TorchExecutor:
    name = "torch"

    def __init__(self, model: TextDecoder, cache_len: int, prefill_lengths: tuple[int, ...]):
        self.model = model.float().eval()
        self.cache_len, self.prefill_lengths = cache_len, tuple(prefill_lengths)
        self.model.setup_caches(cache_len)

    def embed(self, ids: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return self.model.embed(torch.as_tensor(ids, dtype=torch.long)[None]).numpy()

    def _run(self, embeds, rows, start: int) -> np.ndarray:
        T = embeds.shape[1]
        with torch.no_grad():
            logits = self.model.forward_embeddings(
                torch.from_numpy(np.ascontiguousarray(embeds)),
                torch.from_numpy(np.ascontiguousarray(rows)),
                torch.arange(start, start + T),
                last_position_only=True,
            )
        return logits[0, -1].numpy()

    def prefill(self, embeds, rows, start: int) -> np.ndarray:
        return self._run(embeds, rows, start)

    def decode(self, embeds, rows, pos: int) -> np.ndarray:
        return self._run(embeds, rows, pos)

    def reset(self) -> None:
        self.model.reset_caches()
