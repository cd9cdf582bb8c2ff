"""Our TextDecoder against transformers' Gemma3n on the same checkpoint: prefill logits and cached decode steps."""

from __future__ import annotations

from pathlib import Path

import torch

from models.checkpoint import load_text_decoder
from models.generate import prefill_and_decode
from models.hf_reference import hf_prefill_and_decode, load_hf_model


def parity_prompt(vocab_size: int, ple_vocab_size: int, length: int, seed: int = 1) -> torch.Tensor:
    """Random ids; when the text vocabulary is larger than the PLE table, one id lies beyond the table, to exercise
    the reference's row-0 fallback for such ids."""
    prompt = torch.randint(0, vocab_size, (1, length), generator=torch.Generator().manual_seed(seed))
    if vocab_size > ple_vocab_size and length > 3:
        prompt[0, 3] = vocab_size - 1
    return prompt


def text_vocab_size(model) -> int:
    """How many ids a text decoder embeds by itself: all of them for a Gemma3nForCausalLM checkpoint; those below the
    media vocabularies for a Gemma3nForConditionalGeneration one (whose media ids go through the towers' embedders)."""
    hf_config = getattr(model, "hf_config", None) or {}
    decoder = getattr(model, "language_model", model)  # a whole Gemma3n: its text decoder's vocabulary
    if hf_config.get("model_type") != "gemma3n":
        return decoder.config.vocab_size
    from models.multimodal import Gemma3nConfig

    cfg = Gemma3nConfig.from_hf_dict(hf_config)
    return min(decoder.config.vocab_size, cfg.vision_embedder.vocab_offset, cfg.audio_embedder.vocab_offset)


def compare_with_transformers(checkpoint: str | Path, prompt_len: int = 24, steps: int = 20) -> dict:
    ours = load_text_decoder(checkpoint, dtype=torch.float32)
    hf = load_hf_model(checkpoint)
    cfg = ours.config
    prompt = parity_prompt(text_vocab_size(ours), cfg.vocab_size_per_layer_input, prompt_len)
    hf_prefill, hf_steps, hf_tokens = hf_prefill_and_decode(hf, prompt, steps)
    our_prefill, our_steps, our_tokens = prefill_and_decode(ours, prompt, steps, cache_len=prompt_len + steps)
    decode_err = max((a - b).abs().max().item() for a, b in zip(hf_steps, our_steps)) if steps else 0.0
    return {
        "checkpoint": str(checkpoint),
        "prompt_len": prompt_len,
        "sliding_window": cfg.sliding_window,
        "kv_shared_layers": cfg.num_kv_shared_layers,
        "decode_steps": steps,
        "prefill_max_abs_error": (hf_prefill - our_prefill).abs().max().item(),
        "decode_max_abs_error": decode_err,
        "logit_scale": hf_prefill.abs().max().item(),
        "greedy_tokens_equal": hf_tokens == our_tokens,
        "greedy_tokens": our_tokens,
    }


def parity_media(seed: int = 0, audio_seconds: float = 2.5):
    """A deterministic image (non-square RGB, uint8) and audio clip (16 kHz: a chirp plus noise) for parity checks."""
    import numpy as np

    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, size=(400, 600, 3), dtype=np.uint8)
    t = np.arange(int(16_000 * audio_seconds)) / 16_000
    audio = (0.4 * np.sin(2 * np.pi * (220 + 400 * t) * t) + 0.05 * rng.standard_normal(t.shape)).astype(np.float32)
    return image, audio


def multimodal_prompt(tokens, text_vocab: int, seed: int = 2) -> list[int]:
    """bos, some text, an image, more text, an audio clip, more text; the media spans expanded."""
    from models.multimodal import expand_media_placeholders

    g = torch.Generator().manual_seed(seed)
    text = lambda n: torch.randint(6, min(text_vocab, tokens.boi), (n,), generator=g).tolist()  # noqa: E731
    return expand_media_placeholders([2] + text(5) + [tokens.boi] + text(4) + [tokens.boa] + text(3), tokens)


@torch.no_grad()
def compare_multimodal_with_transformers(checkpoint: str | Path, steps: int = 8) -> dict:
    """Each component of a Gemma3nForConditionalGeneration checkpoint against transformers (and so timm) on the same
    weights and inputs: the audio feature extractor, the audio encoder, the vision tower, and the whole model's
    logits for a prompt with an image and an audio clip (prefill, then cached greedy decode steps)."""
    from transformers import Gemma3nAudioFeatureExtractor

    from models.audio import log_mel_features
    from models.checkpoint import load_pretrained
    from models.generate import prefill_and_decode_embeddings
    from models.vision import preprocess_images

    ours, hf = load_pretrained(checkpoint, dtype=torch.float32), load_hf_model(checkpoint)
    image, audio = parity_media()

    mel, valid = log_mel_features(audio)
    hf_audio = Gemma3nAudioFeatureExtractor()(audio, sampling_rate=16_000, return_tensors="pt")
    hf_features = hf_audio["input_features"][0, : mel.shape[0]]
    features, padding = torch.from_numpy(mel)[None], ~torch.from_numpy(valid)[None]

    encodings, _ = ours.audio_tower(features, padding)
    hf_encodings = hf.model.audio_tower(features, padding, return_dict=True).last_hidden_state
    pixels = preprocess_images([image], 768)
    towers = ours.vision_tower(pixels)
    hf_towers = hf.model.vision_tower(pixel_values=pixels, do_pooling=False, return_dict=True).last_hidden_state

    ids = torch.tensor([multimodal_prompt(ours.config.tokens, ours.config.text.vocab_size)])
    media = dict(pixel_values=pixels, input_features=features, input_features_mask=~padding)
    hf_prefill, hf_steps, hf_tokens = hf_prefill_and_decode(hf, ids, steps, **media)
    embeds, rows = ours.embed_prompt(ids, ours.image_embeddings(pixels), ours.audio_embeddings(features, padding))
    prefill, step_logits, tokens = prefill_and_decode_embeddings(
        ours.language_model, embeds, rows, steps, ids.shape[1] + steps, embed=ours.embed_prompt)

    def error(a, b):
        return {"max_abs_error": (a - b).abs().max().item(), "scale": b.abs().max().item()}

    return {
        "checkpoint": str(checkpoint),
        "audio_features": error(features[0], hf_features),
        "audio_encoder": error(encodings, hf_encodings),
        "vision_tower": error(towers, hf_towers),
        "prompt_tokens": ids.shape[1],
        "prefill_logits": error(prefill, hf_prefill),
        "decode_logits": {"max_abs_error": max((a - b).abs().max().item() for a, b in zip(step_logits, hf_steps)),
                          "steps": steps},
        "greedy_tokens_equal": tokens == hf_tokens,
        "greedy_tokens": tokens,
    }
