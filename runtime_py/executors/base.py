"""What every backend implements: the executor (decoder graphs and the KV cache) and the encoder runner (a bundle's
vision and audio encoders with their adapters), as Protocols; the session and engine above see nothing else.

An executor only runs graphs and owns the KV cache; tokenizer, template, sampling, stop detection and the PLE rows
are shared above it in the session, so every backend behaves the same.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import tempfile
import threading
from pathlib import Path
from typing import Protocol

import numpy as np

from models.errors import InputError

# Where native runtimes' lines go while they load (ExecuTorch's cpuinfo probing, TFLite's "Created XNNPACK delegate",
# torch's import-time warnings): not the terminal, where only the generated text and our own lines belong.
RUNTIME_LOG_ENV = "G3N_RUNTIME_LOG"
_quiet_lock, _quiet_depth, _saved_stderr = threading.Lock(), 0, None


def runtime_log() -> Path:
    return Path(os.environ.get(RUNTIME_LOG_ENV) or Path(tempfile.gettempdir()) / f"g3n-runtime-{os.getuid()}.log")


def release_freed_memory() -> None:
    """Collects reference cycles and hands the freed heap back to the system (glibc keeps freed blocks of a few MB
    resident: a loaded and dropped E2B Core ML program left 9.5 GB resident, 5.5 GB after malloc_trim)."""
    gc.collect()
    libc = ctypes.CDLL(None)
    if hasattr(libc, "malloc_trim"):  # glibc only
        libc.malloc_trim(0)


@contextlib.contextmanager
def native_output_to_log():
    """File descriptor 2 appended to runtime_log() inside the block (native code writes there directly, past
    sys.stderr). Nested and concurrent blocks share one redirection: the first in saves the descriptor, the last out
    restores it. With G3N_DEBUG set, nothing is redirected."""
    global _quiet_depth, _saved_stderr
    if os.environ.get("G3N_DEBUG"):
        yield
        return
    with _quiet_lock:
        if _quiet_depth == 0:
            import sys

            sys.stderr.flush()
            _saved_stderr = os.dup(2)
            with open(runtime_log(), "ab") as log:
                os.dup2(log.fileno(), 2)
        _quiet_depth += 1
    try:
        yield
    finally:
        with _quiet_lock:
            _quiet_depth -= 1
            if _quiet_depth == 0:
                import sys

                sys.stderr.flush()
                os.dup2(_saved_stderr, 2)
                os.close(_saved_stderr)


@contextlib.contextmanager
def stdout_to_log():
    """File descriptor 1 appended to runtime_log() inside the block, for native code that prints what it also hands
    back (ExecuTorch's LLM runner prints every generated piece). Not nested; with G3N_DEBUG set, nothing moves."""
    import sys

    if os.environ.get("G3N_DEBUG"):
        yield
        return
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(runtime_log(), "ab") as log:
            os.dup2(log.fileno(), 1)
        yield
    finally:
        import ctypes

        ctypes.CDLL(None).fflush(None)  # C stdio's buffered tail goes to the log too, not to the restored terminal
        os.dup2(saved, 1)
        os.close(saved)


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
