"""What every backend implements: the executor (decoder graphs and the KV cache) and the encoder runner (a bundle's
vision and audio encoders with their adapters), as Protocols; the session and engine above see nothing else.

An executor only runs graphs and owns the KV cache; tokenizer, template, sampling, stop detection and the PLE rows
are shared above it in the session, so every backend behaves the same.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from models.errors import InputError


class Executor(Protocol):
    name: str
    cache_len: int
    prefill_lengths: tuple[int, ...]  # the fixed prompt-chunk lengths its prefill graphs take

    def embed(self, ids: np.ndarray) -> np.ndarray:
        """token ids [T] -> embeddings [1, T, H] (the token-embedding lookup)."""

    def prefill(self, embeds: np.ndarray, per_layer_rows: np.ndarray, start: int) -> np.ndarray:
        """embeds [1, T, H], per_layer_rows [1, T, L, P] at positions start..start+T-1 -> last position's logits [V]."""

    def decode(self, embeds: np.ndarray, per_layer_rows: np.ndarray, pos: int) -> np.ndarray:
        """One position -> its logits [V]."""

    def reset(self) -> None:
        """Empty the KV cache."""


class EncoderRunner(Protocol):
    """A bundle's exported vision and audio encoders (with their adapters), on the same inputs as the float PyTorch
    encoders. A size the bundle lacks, or a bundle without that encoder, is an InputError naming what it has."""

    name: str
    image_sizes: tuple[int, ...]  # the input sizes its vision encoder takes (first: the default)
    has_vision: bool
    has_audio: bool

    def image(self, pixel_values: np.ndarray) -> np.ndarray:
        """pixel_values [1, 3, S, S] float32 -> image embeddings [1, 256, H] float32."""

    def audio(self, features: np.ndarray, padding_mask: np.ndarray) -> np.ndarray:
        """features [1, 2997, 128] float32, padding_mask [1, 2997] float32 (1.0 = padded) -> [1, 188, H] float32."""


def check_image_size(pixel_values: np.ndarray, sizes: tuple[int, ...], where: str) -> int:
    shape = tuple(pixel_values.shape)
    if len(shape) != 4 or shape[:2] != (1, 3) or shape[2] != shape[3]:
        raise InputError(f"pixel_values of shape {list(shape)}: expected [1, 3, S, S]")
    if shape[2] not in sizes:
        raise InputError(f"{where}: no vision encoder for {shape[2]} px (it has {', '.join(map(str, sizes))})")
    return shape[2]
