"""Encoder runners: one per backend, each running a bundle's exported vision and audio encoders (with their
adapters) on the same inputs as the float PyTorch encoders.

Interface (duck-typed), the same for every backend:
    image_sizes: tuple[int, ...]         # the input sizes the bundle's vision encoder takes (first: the default)
    has_audio: bool, has_vision: bool
    image(pixel_values: np.ndarray [1, 3, S, S] float32) -> np.ndarray [1, 256, H] float32
    audio(features: np.ndarray [1, 2997, 128] float32, padding_mask: np.ndarray [1, 2997] float32 (1.0 = padded))
        -> np.ndarray [1, 188, H] float32
A size the bundle lacks, or a bundle without that encoder, is an InputError naming what it has.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from models.errors import InputError


def check_image_size(pixel_values: np.ndarray, sizes: tuple[int, ...], where: str) -> int:
    shape = tuple(pixel_values.shape)
    if len(shape) != 4 or shape[:2] != (1, 3) or shape[2] != shape[3]:
        raise InputError(f"pixel_values of shape {list(shape)}: expected [1, 3, S, S]")
    if shape[2] not in sizes:
        raise InputError(f"{where}: no vision encoder for {shape[2]} px (it has {', '.join(map(str, sizes))})")
    return shape[2]


class TorchEncoders:
    """The float PyTorch encoders of a whole Gemma3n model: the reference. image_sizes: the sizes it accepts, first
    the default (a bundle's torch backend takes the bundle's sizes, so that every backend accepts the same)."""

    name = "torch"

    def __init__(self, model, image_sizes: tuple[int, ...] = (768, 256, 512)):
        from exporters.encoders import AudioEmbedder, VisionEmbedder

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


def load_encoders(backend: str, bundle: Path, manifest: dict, threads: int = 2):
    """The encoder runner of a verified bundle for `backend` (not torch: the engine builds TorchEncoders from the
    reference model). None when the bundle has no encoders."""
    import sys

    bundle = Path(bundle)
    if not set(manifest.get("export_spec", {}).get("components", [])) & {"vision", "audio"}:
        return None
    if backend == "litert":
        from runtime_py.executors.litert_executor import LiteRtEncoders

        return LiteRtEncoders(bundle, manifest, threads)
    if backend == "executorch":
        from runtime_py.executors.executorch_executor import ExecuTorchEncoders

        return ExecuTorchEncoders(bundle, manifest, threads)
    if backend == "coreml":
        if sys.platform != "darwin":
            raise InputError("the coreml backend needs macOS: coremltools cannot run Core ML models on Linux")
        from runtime_py.executors.coreml_executor import CoreMLEncoders

        return CoreMLEncoders(bundle, manifest, threads)
    raise InputError(f"--backend {backend}: runs no encoders")
