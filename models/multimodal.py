"""Gemma 3n as a whole: the text decoder, the audio and vision towers, and the embedders that map their outputs
into the text embedding space.

A prompt is one sequence of token ids in which every image is the span
    <start_of_image> <image_soft_token> x 256 <end_of_image>
and every audio window (at most 30 s) the span
    <start_of_audio> <audio_soft_token> x 188 <end_of_audio>
(`expand_media_placeholders` writes those spans where a prompt holds a bare <start_of_image> or <start_of_audio>, as
transformers' Gemma3nProcessor does). The soft-token positions get the encoders' embeddings; the <end_of_image> and
<end_of_audio> ids lie in the embedders' own small vocabularies and are embedded by them ("hard" tokens). Per-layer
inputs (PLE) are looked up from the ids as for text: ids beyond the PLE table (every media id) read row 0, and the
projection part of the per-layer inputs comes from the spliced embeddings, exactly as transformers computes them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from models.audio import AudioConfig, AudioEncoder
from models.config import TextConfig
from models.errors import InputError
from models.text import RMSNorm, TextDecoder
from models.vision import MobileNetV5, VisionConfig

IMAGE_SOFT_TOKENS, AUDIO_SOFT_TOKENS = 256, 188


@dataclass(frozen=True)
class MediaTokens:
    """Token ids of the media spans, and how many soft tokens each image or audio window takes."""

    boi: int = 255_999
    image: int = 262_145
    eoi: int = 262_144
    boa: int = 256_000
    audio: int = 262_273
    eoa: int = 262_272
    image_soft_tokens: int = IMAGE_SOFT_TOKENS
    audio_soft_tokens: int = AUDIO_SOFT_TOKENS

    @classmethod
    def from_hf_dict(cls, d: dict) -> "MediaTokens":
        default = cls()
        get = lambda key, value: int(d.get(key) if d.get(key) is not None else value)  # noqa: E731
        return cls(
            boi=get("boi_token_id", default.boi),
            image=get("image_token_id", default.image),
            eoi=get("eoi_token_id", default.eoi),
            boa=get("boa_token_id", default.boa),
            audio=get("audio_token_id", default.audio),
            eoa=get("eoa_token_id", default.eoa),
            image_soft_tokens=get("vision_soft_tokens_per_image", IMAGE_SOFT_TOKENS),
            audio_soft_tokens=get("audio_soft_tokens_per_image", AUDIO_SOFT_TOKENS),
        )


@dataclass(frozen=True)
class EmbedderConfig:
    """A tower's embedder: its output width, and its own vocabulary of hard tokens [vocab_offset, +vocab_size)."""

    hidden_size: int
    vocab_offset: int
    vocab_size: int
    rms_norm_eps: float = 1e-6

    @classmethod
    def from_hf_dict(cls, d: dict, hidden_size: int, vocab_offset: int) -> "EmbedderConfig":
        return cls(int(d.get("hidden_size", hidden_size)), int(d.get("vocab_offset", vocab_offset)),
                   int(d.get("vocab_size", 128)), float(d.get("rms_norm_eps", 1e-6)))


@dataclass(frozen=True)
class Gemma3nConfig:
    text: TextConfig
    vision: VisionConfig
    audio: AudioConfig
    vision_embedder: EmbedderConfig
    audio_embedder: EmbedderConfig
    tokens: MediaTokens

    @classmethod
    def from_hf_dict(cls, d: dict) -> "Gemma3nConfig":
        """Reads a `gemma3n` (Gemma3nForConditionalGeneration) config.json."""
        vision, audio = d.get("vision_config") or {}, d.get("audio_config") or {}
        return cls(
            text=TextConfig.from_hf_dict(d),
            vision=VisionConfig.from_hf_dict(vision),
            audio=AudioConfig.from_hf_dict(audio),
            vision_embedder=EmbedderConfig.from_hf_dict(vision, 2048, 262_144),
            audio_embedder=EmbedderConfig.from_hf_dict(audio, 1536, 262_272),
            tokens=MediaTokens.from_hf_dict(d),
        )


class MultimodalEmbedder(nn.Module):
    """Gemma 3n's multimodal embedder: soft tokens (an encoder's output, [.., D]) or the tower's own hard-token ids go
    through an RMSNorm, a projection to the text width H and a scale-free RMSNorm: [..., H]."""

    def __init__(self, cfg: EmbedderConfig, text_hidden_size: int):
        super().__init__()
        self.vocab_offset, self.vocab_size = cfg.vocab_offset, cfg.vocab_size
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.hard_embedding_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.soft_embedding_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.embedding_projection = nn.Linear(cfg.hidden_size, text_hidden_size, bias=False)
        self.embedding_post_projection_norm = RMSNorm(text_hidden_size, cfg.rms_norm_eps, with_scale=False)

    def embed_ids(self, token_ids: Tensor) -> Tensor:
        return self._project(self.hard_embedding_norm(self.embedding(token_ids - self.vocab_offset)))

    def embed_soft_tokens(self, soft_tokens: Tensor) -> Tensor:
        return self._project(self.soft_embedding_norm(soft_tokens))

    def _project(self, x: Tensor) -> Tensor:
        return self.embedding_post_projection_norm(self.embedding_projection(x))

    def owns(self, token_ids: Tensor) -> Tensor:
        return (token_ids >= self.vocab_offset) & (token_ids < self.vocab_offset + self.vocab_size)


class Gemma3n(nn.Module):
    """The whole model. Submodule names are transformers' (`language_model`, `vision_tower`, `audio_tower`,
    `embed_vision`, `embed_audio`), so a Gemma3nForConditionalGeneration checkpoint loads by stripping `model.`
    (and `timm_model.` inside the vision tower)."""

    def __init__(self, cfg: Gemma3nConfig):
        super().__init__()
        self.config = cfg
        self.language_model = TextDecoder(cfg.text)
        self.vision_tower = MobileNetV5(cfg.vision)
        self.audio_tower = AudioEncoder(cfg.audio)
        self.embed_vision = MultimodalEmbedder(cfg.vision_embedder, cfg.text.hidden_size)
        self.embed_audio = MultimodalEmbedder(cfg.audio_embedder, cfg.text.hidden_size)

    # --- encoders: media -> soft-token embeddings in the text space --------------------------------------------

    def image_embeddings(self, pixel_values: Tensor) -> Tensor:
        """pixel_values [N, 3, S, S] (preprocessed) -> [N, 256, H]."""
        features = self.vision_tower(pixel_values)  # [N, C, h, w]
        n, c = features.shape[:2]
        soft_tokens = features.reshape(n, c, -1).permute(0, 2, 1)
        # The tower ends in an RMS norm; the embedder's own norm expects the sqrt(C)-scaled tokens the model was trained on.
        return self.embed_vision.embed_soft_tokens(soft_tokens * c**0.5)

    def audio_embeddings(self, features: Tensor, padding_mask: Tensor) -> Tensor:
        """log-mel features [N, F, 128] with padding_mask [N, F] (True = padded frame) -> [N, 188, H]: encoder
        positions of padded frames, and the positions beyond the encoder's output, take the embedding of the last
        audio hard token, as transformers pads them."""
        encodings, encoded_padding = self.audio_tower(features, padding_mask)
        embeddings = self.embed_audio.embed_soft_tokens(encodings)
        pad_id = torch.full((1, 1), self.config.text.vocab_size - 1, dtype=torch.long, device=features.device)
        padding = self.embed_audio.embed_ids(pad_id)
        embeddings = torch.where(encoded_padding.unsqueeze(-1), padding, embeddings)
        n, length, h = embeddings.shape
        wanted = self.config.tokens.audio_soft_tokens
        if length > wanted:
            raise InputError(f"audio of {length} encoder positions exceeds one window of {wanted} tokens (30 s)")
        return torch.cat([embeddings, padding.expand(n, wanted - length, h)], dim=1)

    # --- the prompt: ids and media -> one embedding sequence ----------------------------------------------------

    def embed_prompt(
        self, token_ids: Tensor, image_embeddings: Tensor | None = None, audio_embeddings: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """token_ids [1, T] -> (inputs_embeds [1, T, H], per_layer_rows [1, T, L, P]), soft tokens spliced in at the
        placeholder positions in order (images [N, 256, H], audio windows [M, 188, H])."""
        lm = self.language_model
        embeds = lm.embed(token_ids)
        for embedder in (self.embed_vision, self.embed_audio):
            owned = embedder.owns(token_ids)
            safe_ids = torch.where(owned, token_ids, embedder.vocab_offset + embedder.vocab_size - 1)
            embeds = torch.where(owned.unsqueeze(-1), embedder.embed_ids(safe_ids).to(embeds.dtype), embeds)
        tokens = self.config.tokens
        for name, token, soft in (("image", tokens.image, image_embeddings), ("audio", tokens.audio, audio_embeddings)):
            if soft is None:
                # As transformers without pixel values or audio: the ids keep their embedder rows (a generated
                # soft-token id in decode).
                continue
            slots = token_ids == token
            given = soft.shape[0] * soft.shape[1]
            if int(slots.sum()) != given:
                raise InputError(f"the prompt has {int(slots.sum())} {name} soft-token positions but {given} {name} "
                                 "embeddings were given")
            embeds = embeds.masked_scatter(slots.unsqueeze(-1), soft.to(embeds.dtype))
        return embeds, lm.per_layer_embedding(token_ids)

    def forward(
        self,
        token_ids: Tensor,
        pixel_values: Tensor | None = None,
        audio_features: Tensor | None = None,
        audio_padding_mask: Tensor | None = None,
        input_pos: Tensor | None = None,
    ) -> Tensor:
        """The eager convenience path: ids [1, T] and preprocessed media -> logits [1, T, V]."""
        images = self.image_embeddings(pixel_values) if pixel_values is not None else None
        audio = self.audio_embeddings(audio_features, audio_padding_mask) if audio_features is not None else None
        embeds, rows = self.embed_prompt(token_ids, images, audio)
        return self.language_model.forward_embeddings(embeds, rows, input_pos)


def expand_media_placeholders(token_ids: list[int], tokens: MediaTokens, audio_windows: list[int] | None = None) -> list[int]:
    """Each <start_of_image> becomes a full image span; each <start_of_audio> becomes one audio span per window of
    that clip (audio_windows[i] for the i-th clip, 1 by default). Other ids are kept."""
    clips = sum(t == tokens.boa for t in token_ids)
    if audio_windows is not None and clips != len(audio_windows):
        raise InputError(f"the prompt has {clips} <start_of_audio> placeholders for {len(audio_windows)} audio clips")
    out, clip = [], 0
    for t in token_ids:
        if t == tokens.boi:
            out += [tokens.boi] + [tokens.image] * tokens.image_soft_tokens + [tokens.eoi]
        elif t == tokens.boa:
            windows = audio_windows[clip] if audio_windows is not None else 1
            clip += 1
            out += ([tokens.boa] + [tokens.audio] * tokens.audio_soft_tokens + [tokens.eoa]) * windows
        else:
            out.append(t)
    return out
