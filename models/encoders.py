"""The audio and vision encoders as every target lowers them and the runtime's torch backend runs them: fixed-shape modules over models.multimodal.Gemma3n.

Each encoder is split the way LiteRT-LM splits it, an encoder (the tower) and an adapter (the multimodal embedder
into the text width), and the two compose into the whole path that ExecuTorch and Core ML lower as one graph:

  VisionEncoder  pixel_values [1, 3, S, S] float32 in [0, 1]      -> soft_tokens [1, 256, C]   (C = 2048, scaled
                                                                      by sqrt(C) as the embedder expects)
  VisionAdapter  soft_tokens [1, 256, C]                           -> image_embeddings [1, 256, H]
  AudioEncoder   features [1, F, 128] float32, padding_mask [1, F] -> encodings [1, 188, D], encodings_mask [1, 188]
                 (F = 2997: one 30 s window; masks are float32, 1.0 = padded, since not every runtime takes bool)
  AudioAdapter   encodings [1, 188, D], encodings_mask [1, 188]     -> audio_embeddings [1, 188, H]

VisionEmbedder and AudioEmbedder compose the two halves. The outputs equal Gemma3n.image_embeddings and
Gemma3n.audio_embeddings. The embedders' hard tokens (<end_of_image>, <end_of_audio>, ...) depend on the id alone,
so they are not lowered: `media_token_embeddings` precomputes their rows for the bundle.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import Tensor, nn

from models.audio import (
    AUDIO_WINDOW_FRAMES,
    AUDIO_WINDOW_SAMPLES,
    SAMPLE_RATE,
    log_mel_features,
    num_frames,
)
from models.multimodal import Gemma3n
from models.vision import preprocess_images

COMPONENTS = ("vision", "audio")


class VisionEncoder(nn.Module):
    """MobileNet-V5: pixel_values [1, 3, S, S] -> soft_tokens [1, 256, C], flattened row-major and scaled by sqrt(C)."""

    def __init__(self, model: Gemma3n):
        super().__init__()
        self.tower = model.vision_tower

    def forward(self, pixel_values: Tensor) -> Tensor:
        features = self.tower(pixel_values)
        n, c = features.shape[:2]
        return features.reshape(n, c, -1).permute(0, 2, 1) * c**0.5


class VisionAdapter(nn.Module):
    """The vision embedder's soft path: soft_tokens [1, 256, C] -> image_embeddings [1, 256, H]."""

    def __init__(self, model: Gemma3n):
        super().__init__()
        self.embedder = model.embed_vision

    def forward(self, soft_tokens: Tensor) -> Tensor:
        return self.embedder.embed_soft_tokens(soft_tokens)


class VisionEmbedder(nn.Module):
    """pixel_values [1, 3, S, S] -> image_embeddings [1, 256, H] (= Gemma3n.image_embeddings)."""

    def __init__(self, model: Gemma3n):
        super().__init__()
        self.encoder, self.adapter = VisionEncoder(model), VisionAdapter(model)

    def forward(self, pixel_values: Tensor) -> Tensor:
        return self.adapter(self.encoder(pixel_values))


class AudioEncoder(nn.Module):
    """The conformer: features [1, F, 128], padding_mask [1, F] (1.0 = padded) -> encodings [1, N, D] (padded
    tokens zero), encodings_mask [1, N] (1.0 = padded)."""

    def __init__(self, model: Gemma3n):
        super().__init__()
        self.tower = model.audio_tower

    def forward(self, features: Tensor, padding_mask: Tensor) -> tuple[Tensor, Tensor]:
        encodings, mask = self.tower(features, padding_mask > 0.5)
        return encodings, mask.to(features.dtype)


class AudioAdapter(nn.Module):
    """The audio embedder: encodings [1, N, D], encodings_mask [1, N] -> audio_embeddings [1, 188, H]; padded and
    missing positions take the embedding of the audio vocabulary's last id, as Gemma3n.audio_embeddings does."""

    def __init__(self, model: Gemma3n):
        super().__init__()
        self.embedder = model.embed_audio
        self.pad_id = model.config.text.vocab_size - 1
        self.soft_tokens = model.config.tokens.audio_soft_tokens

    def forward(self, encodings: Tensor, encodings_mask: Tensor) -> Tensor:
        embeddings = self.embedder.embed_soft_tokens(encodings)
        padding = self.embedder.embed_ids(torch.full((1, 1), self.pad_id, dtype=torch.long))
        embeddings = torch.where(encodings_mask.unsqueeze(-1) > 0.5, padding, embeddings)
        n, length, h = embeddings.shape
        if length < self.soft_tokens:
            embeddings = torch.cat([embeddings, padding.expand(n, self.soft_tokens - length, h)], dim=1)
        return embeddings


class AudioEmbedder(nn.Module):
    """features [1, F, 128], padding_mask [1, F] -> audio_embeddings [1, 188, H] (= Gemma3n.audio_embeddings)."""

    def __init__(self, model: Gemma3n):
        super().__init__()
        self.encoder, self.adapter = AudioEncoder(model), AudioAdapter(model)

    def forward(self, features: Tensor, padding_mask: Tensor) -> Tensor:
        return self.adapter(*self.encoder(features, padding_mask))


def vision_sample_inputs(size: int) -> tuple[Tensor]:
    return (torch.zeros(1, 3, size, size),)


def audio_sample_inputs() -> tuple[Tensor, Tensor]:
    return torch.zeros(1, AUDIO_WINDOW_FRAMES, 128), torch.zeros(1, AUDIO_WINDOW_FRAMES)


def runner_audio_input(features: np.ndarray, padding_mask: np.ndarray) -> np.ndarray:
    """features [1, F, 128], padding_mask [1, F] -> the one tensor ExecuTorch's LLM runner hands an audio encoder,
    [batch, bins, frames] = [1, 128 + 1, F]: the log-mel bins, then the padding mask as one more row."""
    packed = np.concatenate([np.swapaxes(features, 1, 2), padding_mask[:, None]], axis=1)
    return np.ascontiguousarray(packed, dtype=np.float32)  # concatenate keeps the swapped strides


def audio_window_inputs(window: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One window of at most 30 s (16 kHz mono) -> the exported encoder's inputs: features [1, 2997, 128] float32 and
    padding_mask [1, 2997] float32 (1.0 = padded frame)."""
    features, _ = log_mel_features(window, pad_to=AUDIO_WINDOW_SAMPLES)
    # Only the frames the clip has on its own are valid: the window's next few frames start inside the clip but read
    # its zero padding (transformers marks them valid in a padded batch), and the clip alone has none of them. With
    # the encoder zeroing padded frames, the clip then gets exactly its unpadded tokens.
    padded = np.arange(features.shape[0]) >= num_frames(len(window))
    return features[None], padded.astype(np.float32)[None]


def media_token_embeddings(model: Gemma3n) -> dict[str, Tensor]:
    """Every hard-token id of the two embedders' vocabularies -> its embedding [n, H] in the text space, with the first
    id of each range; the runtime substitutes these rows for those ids. Computed in float32 whatever the model's dtype
    (a copy of the small embedder), as the exporters compute everything else of a bf16 checkpoint."""
    out = {}
    with torch.no_grad():
        for name, embedder in (("vision", model.embed_vision), ("audio", model.embed_audio)):
            ids = torch.arange(embedder.vocab_offset, embedder.vocab_offset + embedder.vocab_size)[None]
            out[f"{name}_rows"] = copy.deepcopy(embedder).float().embed_ids(ids)[0].contiguous()
            out[f"{name}_first_id"] = torch.tensor([embedder.vocab_offset])
    return out


# --- fixed media for golden vectors and tests ------------------------------------------------------------------


def golden_image() -> np.ndarray:
    """A fixed 600x400 RGB uint8 image (gradients, stripes and a disc): not square, so resizing is exercised."""
    y, x = np.mgrid[0:400, 0:600].astype(np.float32)
    r = 255 * x / 599
    g = 255 * (0.5 + 0.5 * np.sin(y / 9.0))
    b = np.where((x - 380) ** 2 + (y - 180) ** 2 < 90**2, 230.0, 40.0 + 0.2 * y)
    return np.stack([r, g, b], axis=-1).round().clip(0, 255).astype(np.uint8)


def golden_audio(seconds: float = 2.5) -> np.ndarray:
    """A fixed chirp (200 Hz to 3 kHz) with a little deterministic noise, 16 kHz mono float32."""
    t = np.arange(int(seconds * SAMPLE_RATE), dtype=np.float64) / SAMPLE_RATE
    phase = 2 * np.pi * (200 * t + (3000 - 200) / (2 * seconds) * t**2)
    noise = np.random.default_rng(0).standard_normal(t.shape) * 0.01
    return (0.5 * np.sin(phase) + noise).astype(np.float32)


@torch.no_grad()
def golden_media(model: Gemma3n, image_sizes: tuple[int, ...]) -> dict[str, Tensor]:
    """The fixed image and clip, the encoders' exact inputs and the float model's embeddings: what a device check
    feeds each exported encoder and compares with."""
    image, clip = golden_image(), golden_audio()
    tensors = {"image_uint8": torch.from_numpy(image), "audio_waveform": torch.from_numpy(clip)}
    vision = VisionEmbedder(model).eval()
    for size in image_sizes:
        pixels = preprocess_images(image, size)
        tensors[f"pixel_values_{size}"] = pixels.contiguous()
        tensors[f"image_embeddings_{size}"] = vision(pixels).contiguous()
    features, mask = audio_window_inputs(clip)
    tensors["audio_features"], tensors["audio_padding_mask"] = torch.from_numpy(features), torch.from_numpy(mask)
    tensors["audio_embeddings"] = AudioEmbedder(model).eval()(tensors["audio_features"],
                                                              tensors["audio_padding_mask"]).contiguous()
    return tensors
