"""Greedy generation over the static KV cache: prefill once, then one token per decode step."""

from __future__ import annotations

import torch
from torch import Tensor

from models.errors import InputError
from models.text import TextDecoder


def check_token_ids(token_ids: Tensor, vocab_size: int) -> None:
    if token_ids.ndim != 2 or token_ids.shape[0] != 1 or token_ids.shape[1] == 0:
        raise InputError(f"token ids must have shape [1, T] with T >= 1, got {list(token_ids.shape)}")
    bad = token_ids[(token_ids < 0) | (token_ids >= vocab_size)]
    if bad.numel():
        raise InputError(f"token id {int(bad[0])} is out of range: the vocabulary has {vocab_size} ids (0..{vocab_size - 1})")


@torch.no_grad()
def prefill_and_decode(
    model: TextDecoder, prompt: Tensor, steps: int, cache_len: int
) -> tuple[Tensor, list[Tensor], list[int]]:
    """Prefill logits [1, T, V], then `steps` greedy decode steps. Returns (prefill logits, step logits [1, V], tokens
    including the one chosen from the prefill)."""
    check_token_ids(prompt, model.config.vocab_size)
    return prefill_and_decode_embeddings(model, model.embed(prompt), model.per_layer_embedding(prompt), steps, cache_len)


@torch.no_grad()
def prefill_and_decode_embeddings(
    model: TextDecoder, inputs_embeds: Tensor, per_layer_rows: Tensor, steps: int, cache_len: int, embed=None
) -> tuple[Tensor, list[Tensor], list[int]]:
    """As prefill_and_decode, from a prompt already embedded (e.g. with images or audio spliced in).
    embed: ids [1, 1] -> (embeds, per-layer rows) for the decode steps; by default the text decoder's own lookups
    (a whole Gemma3n must pass its `embed_prompt`: it embeds ids of its media vocabularies with its embedders)."""
    T = inputs_embeds.shape[1]
    if T + steps > cache_len:
        raise InputError(f"prompt of {T} tokens plus {steps} new tokens does not fit the KV cache of {cache_len}")
    model.setup_caches(cache_len)
    prefill = model.forward_embeddings(inputs_embeds, per_layer_rows, torch.arange(T))
    token = int(prefill[0, -1].argmax())
    tokens, step_logits = [token], []
    for pos in range(T, T + steps):
        ids = torch.tensor([[token]])
        embeds, rows = embed(ids) if embed is not None else (model.embed(ids), model.per_layer_embedding(ids))
        logits = model.forward_embeddings(embeds, rows, torch.tensor([pos]))
        step_logits.append(logits[:, -1])
        token = int(logits[0, -1].argmax())
        tokens.append(token)
    return prefill, step_logits, tokens
