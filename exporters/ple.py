"""Writes the PLE table as its standalone, memory-mappable asset (format and reader: contract/ple.py)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from contract.bundle import PLE_ASSET_FILE as FILE_NAME
from contract.ple import FORMAT, METADATA_KEY
from models.text import TextDecoder

_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def quantize_rows_int8(table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: row ~= q * scale, scale = max|row| / 127."""
    table = table.float()
    scale = table.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    q = torch.round(table / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def write_ple_table(
    table: torch.Tensor, path: str | Path, storage: str, text_vocab_size: int, num_layers: int, embed_scale: float
) -> Path:
    """table [V_ple, L * P] (unscaled rows) -> a safetensors PLE asset at `path`."""
    if storage == "int8":
        q, scale = quantize_rows_int8(table)
        tensors = {"weight": q, "scale": scale}
    else:
        tensors = {"weight": table.to(_DTYPES[storage])}
    description = {
        "format": FORMAT,
        "storage": storage,
        "vocab_size": table.shape[0],
        "text_vocab_size": text_vocab_size,
        "num_layers": num_layers,
        "dim": table.shape[1] // num_layers,
        "embed_scale": float(embed_scale),
    }
    # One metadata entry: safetensors writes several in hash order, which would make rebuilds differ byte-wise.
    metadata = {METADATA_KEY: json.dumps(description, sort_keys=True)}
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
    os.replace(tmp, path)
    return path


def write_ple_asset(model: TextDecoder, directory: str | Path, storage: str = "int8") -> Path:
    """Writes `directory/per_layer_embeddings.safetensors` from the model's PLE table; returns its path."""
    cfg = model.config
    return write_ple_table(
        model.per_layer_embedding.weight.detach(),
        Path(directory) / FILE_NAME,
        storage,
        cfg.vocab_size,
        cfg.num_layers,
        model.per_layer_embedding.scale,
    )
