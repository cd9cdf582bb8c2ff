"""transformers' Gemma 3n as the ground truth: random checkpoints that transformers itself writes, and its logits.

No weights can be downloaded, so parity is checked on models that transformers builds from a config and saves.
transformers zero-initialises some parameters (AltUp's correct_output_scale), which would switch the per-layer-input
path off; `randomise_` gives every parameter a random value so that every path contributes to the logits.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import torch

from models.checkpoint import CAUSAL_LM, CONDITIONAL_GENERATION
from models.config import TINY, TextConfig
from models.random_init import randomise_
from models.vision import MOBILENETV5_300M, timm_block_args

# The MobileNet-V5 of the default whole model and the multimodal test checkpoints: 1/16 of the published width, and
# each stage cut to the blocks that differ in kind (its strided first block, a residual block of each kind, one
# attention pair): 12 of the 84 blocks. Conversion time goes with graph nodes (the 84-block graph, about 3,600 nodes,
# took ExecuTorch 283 s and LiteRT 75 s to convert), so every bundle of the whole model converts in a fraction of it;
# the published depth stays checked against timm and transformers (tests/test_vision.py) and converted at full size
# by `make bench`.
_S0, _S1, _S2, _S3 = MOBILENETV5_300M
SHALLOW_STAGES = (_S0[:2], _S1[:2], (*_S2[:2], *_S2[8:11]), _S3[:3])
TEST_VISION_ARGS = {"channel_multiplier": 0.0625, "block_args": timm_block_args(SHALLOW_STAGES)}
TEST_AUDIO = dict(
    hidden_size=32,
    conf_num_hidden_layers=1,
    conf_num_attention_heads=2,
    sscp_conv_channel_size=[8, 4],
    conf_attention_chunk_size=4,
    conf_attention_context_left=5,
)


def hf_config(cfg: TextConfig, layout: str = CAUSAL_LM, vision_args: dict | None = None, audio: dict | None = None):
    from transformers import (
        Gemma3nAudioConfig,
        Gemma3nConfig,
        Gemma3nTextConfig,
        Gemma3nVisionConfig,
    )

    text = Gemma3nTextConfig(**cfg.to_hf_text_dict())
    if layout == CAUSAL_LM:
        return text
    tokens = media_token_ids(cfg)
    vision = Gemma3nVisionConfig(
        architecture="mobilenetv5_300m_enc",
        model_args=TEST_VISION_ARGS if vision_args is None else vision_args,
        hidden_size=2048,
        vocab_offset=tokens["vision_vocab_offset"],
        vocab_size=tokens["media_vocab_size"],
    )
    audio_config = Gemma3nAudioConfig(
        **(TEST_AUDIO if audio is None else audio),
        vocab_offset=tokens["audio_vocab_offset"],
        vocab_size=tokens["media_vocab_size"],
    )
    ids = {k: v for k, v in tokens.items() if k.endswith("_token_id")}
    return Gemma3nConfig(text_config=text, vision_config=vision, audio_config=audio_config, **ids)


def media_token_ids(cfg: TextConfig) -> dict[str, int]:
    """The published layout of media ids, fitted to any vocabulary: the ids above the PLE table split evenly into the
    vision and the audio embedders' vocabularies (each starting with its end token, then its soft token), and the two
    start tokens are the last ids of the PLE table. For the published vocabulary this is the published layout but
    for the start tokens (255999 and 256000 there)."""
    media = (cfg.vocab_size - cfg.vocab_size_per_layer_input) // 2
    vision, audio = cfg.vocab_size_per_layer_input, cfg.vocab_size_per_layer_input + media
    return dict(vision_vocab_offset=vision, audio_vocab_offset=audio, media_vocab_size=media,
                boi_token_id=vision - 2, boa_token_id=vision - 1, eoi_token_id=vision, image_token_id=vision + 1,
                eoa_token_id=audio, audio_token_id=audio + 1)


def random_hf_model(cfg: TextConfig = TINY, layout: str = CAUSAL_LM, seed: int = 0, **config_kwargs):
    from transformers import Gemma3nForCausalLM, Gemma3nForConditionalGeneration

    config = hf_config(cfg, layout, **config_kwargs)
    config._attn_implementation = "eager"
    if layout == CAUSAL_LM:
        model = Gemma3nForCausalLM(config)
    elif layout == CONDITIONAL_GENERATION:
        config.text_config._attn_implementation = "eager"
        model = timm_safe_build(Gemma3nForConditionalGeneration, config)
    else:
        raise ValueError(f"unknown layout {layout}")
    randomise_(model, seed)
    return model.eval()


def timm_safe_build(cls, config):
    """cls(config), built from a copy of config.vision_config.model_args: timm builds its blocks from model_args'
    block_args in place (it pops and rewrites their keys), so the config (and whatever dict it was given, e.g.
    TEST_VISION_ARGS) would otherwise save, or build a second model from, what is left."""
    given = config.vision_config.model_args
    config.vision_config.model_args = copy.deepcopy(given)
    model = cls(config)
    config.vision_config.model_args = given
    return model


def write_random_checkpoint(path: str | Path, cfg: TextConfig = TINY, layout: str = CAUSAL_LM, seed: int = 0, **kw):
    """Saves a randomised transformers model with transformers' own save_pretrained; returns the model."""
    model = random_hf_model(cfg, layout, seed, **kw)
    model.save_pretrained(str(path))
    return model


def published_config(text: TextConfig):
    """The published google/gemma-3n config.json of a text shape (E2B or E4B): transformers' Gemma3nConfig defaults
    are the published MobileNet-V5-300M, conformer and media ids; the text config is ours."""
    from transformers import Gemma3nConfig, Gemma3nTextConfig

    return Gemma3nConfig(text_config=Gemma3nTextConfig(**text.to_hf_text_dict()))


def write_random_streamed(path: str | Path, config, seed: int = 0, extra_files: dict[str, bytes] | None = None,
                          progress=None) -> int:
    """A Gemma3nForConditionalGeneration checkpoint of `config` laid out as transformers saves it (bf16, sharded
    safetensors with model.safetensors.index.json), with the values write_random_checkpoint's model has, written
    tensor by tensor: the model is built on the meta device and never whole in memory, so the real-size shapes fit
    a small machine. Returns the parameter count."""
    from transformers import Gemma3nForConditionalGeneration

    from models.checkpoint import write_checkpoint
    from models.random_init import random_tensors

    with torch.device("meta"):
        model = timm_safe_build(Gemma3nForConditionalGeneration, config)
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}  # tied lm_head: saved once, as HF does
    hf = config.to_dict() | {"architectures": [CONDITIONAL_GENERATION], "dtype": "bfloat16"}
    write_checkpoint(path, hf, random_tensors(shapes, seed, torch.bfloat16, progress=progress),
                     extra_files=extra_files)
    return sum(math.prod(s) for s in shapes.values())


def load_hf_model(path: str | Path):
    """Loads a checkpoint directory with transformers (eager attention, fp32)."""
    import json

    from transformers import Gemma3nForCausalLM, Gemma3nForConditionalGeneration

    model_type = json.loads((Path(path) / "config.json").read_text())["model_type"]
    cls = Gemma3nForConditionalGeneration if model_type == "gemma3n" else Gemma3nForCausalLM
    return cls.from_pretrained(str(path), attn_implementation="eager", dtype=torch.float32).eval()


@torch.no_grad()
def hf_prefill_and_decode(
    hf_model, prompt: torch.Tensor, steps: int, **media
) -> tuple[torch.Tensor, list[torch.Tensor], list[int]]:
    """Prefill logits [1, T, V], then `steps` greedy decode steps through transformers' own KV cache.
    media: pixel_values, input_features, input_features_mask for the prefill of a multimodal model.
    Returns (prefill logits, per-step logits [1, V], greedy tokens)."""
    out = hf_model(input_ids=prompt, use_cache=True, **media)
    prefill = out.logits
    cache = out.cache if hasattr(out, "cache") else out.past_key_values
    token = int(prefill[0, -1].argmax())
    tokens, step_logits = [token], []
    for _ in range(steps):
        out = hf_model(input_ids=torch.tensor([[token]]), cache=cache, use_cache=True)
        cache = out.cache if hasattr(out, "cache") else out.past_key_values
        step_logits.append(out.logits[:, -1])
        token = int(out.logits[0, -1].argmax())
        tokens.append(token)
    return prefill, step_logits, tokens
