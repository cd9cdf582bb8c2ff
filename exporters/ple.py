"""The PLE table as the exporters store it: the rows of the standalone, memory-mappable asset (format and reader:
contract/ple.py), and the lookup module that the LiteRT per_layer_embedder section and the ExecuTorch .ptd hold."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor, nn

from contract.bundle import PLE_ASSET_FILE as FILE_NAME
from contract.ple import FORMAT, METADATA_KEY
from models.text import TextDecoder, in_dtype

_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def quantize_rows_int8(table: torch.Tensor, block_rows: int = 8192) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: row ~= q * scale, scale = max|row| / 127. A block of rows at a time, so that the float32
    temporaries stay small beside a bf16 table of billions of entries (E2B's PLE table: 8 GB in float32)."""
    q = torch.empty(table.shape, dtype=torch.int8)
    scale = torch.empty(table.shape[0], dtype=torch.float32)
    for start in range(0, table.shape[0], block_rows):
        block = table[start:start + block_rows].float()
        s = block.abs().amax(dim=1).clamp(min=1e-12) / 127.0
        q[start:start + block_rows] = torch.round(block / s[:, None]).clamp(-127, 127).to(torch.int8)
        scale[start:start + block_rows] = s
    return q, scale


class RowTable(nn.Module):
    """A lookup table as the exporters store one: ids -> float32 rows, from int8 rows with one scale per row
    (`quantize_rows_int8`) or fp16/bf16/fp32 rows. The PLE table and a quantized program's token embedding."""

    def __init__(self, table: Tensor, storage: str):
        super().__init__()
        if storage == "int8":
            rows, row_scales = quantize_rows_int8(table)
            self.register_buffer("row_scales", row_scales[:, None].contiguous())
        else:
            rows, self.row_scales = table.to(_DTYPES[storage]).contiguous(), None
        self.register_buffer("rows", rows)

    def forward(self, ids: Tensor) -> Tensor:
        rows = F.embedding(ids, self.rows).float()
        return rows if self.row_scales is None else rows * F.embedding(ids, self.row_scales)


class PerLayerEmbedder(nn.Module):
    """token ids [1, T] -> per-layer rows [1, T, L, P] from the PLE table stored as `storage`: int8 rows with per-row
    scales, or fp16/bf16/fp32 -- the same numbers that contract.ple.PleTable reads from the safetensors asset. Its
    constants are named ple.rows and ple.row_scales (exporters.executorch.is_ple_constant sends them to the .ptd)."""

    def __init__(self, model: TextDecoder, storage: str):
        super().__init__()
        ple = model.per_layer_embedding
        self.vocab, self.num_layers, self.dim = ple.vocab, ple.num_layers, ple.dim
        self.scale = in_dtype(ple.scale, torch.float32)
        self.ple = RowTable(ple.weight.detach(), storage)

    def forward(self, token_ids: Tensor) -> Tensor:
        ids = torch.where((token_ids >= 0) & (token_ids < self.vocab), token_ids, 0)
        return (self.ple(ids) * self.scale).reshape(*token_ids.shape, self.num_layers, self.dim)


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
