"""Our TextDecoder against transformers' Gemma3n on the same checkpoint: prefill logits and cached decode steps."""

from __future__ import annotations

from pathlib import Path

import torch

from models.checkpoint import load_pretrained
from models.generate import prefill_and_decode
from models.hf_reference import hf_prefill_and_decode, load_hf_model


def parity_prompt(vocab_size: int, ple_vocab_size: int, length: int, seed: int = 1) -> torch.Tensor:
    """Random ids; when the text vocabulary is larger than the PLE table, one id lies beyond the table, to exercise
    the reference's row-0 fallback for such ids."""
    prompt = torch.randint(0, vocab_size, (1, length), generator=torch.Generator().manual_seed(seed))
    if vocab_size > ple_vocab_size and length > 3:
        prompt[0, 3] = vocab_size - 1
    return prompt


def compare_with_transformers(checkpoint: str | Path, prompt_len: int = 24, steps: int = 20) -> dict:
    ours = load_pretrained(checkpoint, dtype=torch.float32)
    hf = load_hf_model(checkpoint)
    cfg = ours.config
    prompt = parity_prompt(cfg.vocab_size, cfg.vocab_size_per_layer_input, prompt_len)
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
