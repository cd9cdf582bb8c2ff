"""Writes the PLE table of a TextDecoder as its standalone, memory-mappable asset (format: runtime_py/ple.py)."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from models.text import TextDecoder
from runtime_py.ple import FILE_NAME, FORMAT

_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def quantize_rows_int8(table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: row ~= q * scale, scale = max|row| / 127."""
    table = table.float()
    scale = table.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    q = torch.round(table / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def write_ple_asset(model: TextDecoder, directory: str | Path, storage: str = "int8") -> Path:
    """Writes `directory/per_layer_embeddings.safetensors`; returns its path."""
    cfg = model.config
    table = model.per_layer_embedding.weight.detach()
    if storage == "int8":
        q, scale = quantize_rows_int8(table)
        tensors = {"weight": q, "scale": scale}
    else:
        tensors = {"weight": table.to(_DTYPES[storage])}
    metadata = {
        "format": FORMAT,
        "storage": storage,
        "vocab_size": str(cfg.vocab_size_per_layer_input),
        "text_vocab_size": str(cfg.vocab_size),
        "num_layers": str(cfg.num_layers),
        "dim": str(cfg.hidden_size_per_layer_input),
        "embed_scale": repr(model.per_layer_embedding.scale),
    }
    path = Path(directory) / FILE_NAME
    tmp = path.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
    os.replace(tmp, path)
    return path
