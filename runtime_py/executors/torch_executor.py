"""The torch backend: our eager TextDecoder and float encoders, the golden reference every other backend is held to."""

from __future__ import annotations

import numpy as np
import torch

from models.text import TextDecoder
from runtime_py.executors.base import check_image_size


class TorchExecutor:
    name = "torch"

    def __init__(self, model: TextDecoder, cache_len: int, prefill_lengths: tuple[int, ...]):
        self.model = model.eval()  # float32, or a bf16 model's models.float32.float32_reference (session_for_model)
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


class TorchEncoders:
    """The float PyTorch encoders of a whole Gemma3n model: the reference. image_sizes: the sizes it accepts, first
    the default (a bundle's torch backend takes the bundle's sizes, so that every backend accepts the same)."""

    name = "torch"

    def __init__(self, model, image_sizes: tuple[int, ...] = (768, 256, 512)):
        from models.encoders import AudioEmbedder, VisionEmbedder

        self.vision, self.audio_embedder = VisionEmbedder(model).eval(), AudioEmbedder(model).eval()
        self.image_sizes, self.has_vision, self.has_audio = tuple(image_sizes), True, True

    def image(self, pixel_values: np.ndarray) -> np.ndarray:
        check_image_size(pixel_values, self.image_sizes, "torch")
        with torch.no_grad():
            return self.vision(torch.from_numpy(np.ascontiguousarray(pixel_values, np.float32))).numpy()

    def audio(self, features: np.ndarray, padding_mask: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return self.audio_embedder(torch.from_numpy(np.ascontiguousarray(features, np.float32)),
                                       torch.from_numpy(np.ascontiguousarray(padding_mask, np.float32))).numpy()
