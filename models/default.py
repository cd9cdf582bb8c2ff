"""The embedded default model: the tiny preset with deterministic weights, so the pipeline runs offline."""

from __future__ import annotations

from models.config import TINY
from models.random_init import randomise_
from models.text import TextDecoder

DEFAULT_SEED = 20250626


def default_model() -> TextDecoder:
    model = TextDecoder(TINY)
    randomise_(model, DEFAULT_SEED)
    return model.eval()


def tiny_gemma3n_config():
    """The default model's whole-model config: the tiny text decoder, a narrow, shallow MobileNet-V5 (channel
    multiplier 1/16, 12 blocks: models.hf_reference.SHALLOW_STAGES) and a one-block audio conformer; the media ids
    laid out as models.hf_reference.media_token_ids lays them out for any vocabulary."""
    from models.audio import AudioConfig
    from models.hf_reference import TEST_AUDIO, TEST_VISION_ARGS, media_token_ids
    from models.multimodal import EmbedderConfig, Gemma3nConfig, MediaTokens
    from models.vision import VisionConfig

    ids = media_token_ids(TINY)
    audio_fields = {k: tuple(v) if isinstance(v, list) else v for k, v in TEST_AUDIO.items()}
    audio = AudioConfig(**audio_fields, vocab_size=ids["media_vocab_size"], vocab_offset=ids["audio_vocab_offset"])
    return Gemma3nConfig(
        text=TINY,
        vision=VisionConfig.from_hf_dict({"model_args": TEST_VISION_ARGS}),
        audio=audio,
        vision_embedder=EmbedderConfig(2048, ids["vision_vocab_offset"], ids["media_vocab_size"]),
        audio_embedder=EmbedderConfig(audio.hidden_size, ids["audio_vocab_offset"], ids["media_vocab_size"]),
        tokens=MediaTokens(boi=ids["boi_token_id"], image=ids["image_token_id"], eoi=ids["eoi_token_id"],
                           boa=ids["boa_token_id"], audio=ids["audio_token_id"], eoa=ids["eoa_token_id"]),
    )


def default_gemma3n():
    """The embedded default as a whole model: default_model()'s decoder (the same weights, so text results do not
    change) with towers and embedders randomised from the next seed."""
    from models.multimodal import Gemma3n

    model = Gemma3n(tiny_gemma3n_config())
    decoder = model.language_model
    model.language_model = None
    randomise_(model, DEFAULT_SEED + 1)
    model.language_model = decoder
    decoder.load_state_dict(default_model().state_dict())
    return model.eval()
