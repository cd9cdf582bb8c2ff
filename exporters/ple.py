"""The PLE table as the exporters store it: the rows of the standalone, memory-mappable asset (format and reader:
contract/ple.py), and the lookup module that the LiteRT per_layer_embedder section and the ExecuTorch .ptd hold.

Storages: int8 (one scale per row), int4 (two values per int8 byte, one scale per row and layer: E2B's 2.0B-entry
table in 1.0 GB instead of 2.0 GB), fp16, bf16, fp32. int4 is packed in int8 bytes, not uint8, because litert-torch
cannot lower a uint8 lookup, and unpacked in the graph with float arithmetic (FLOOR, MUL, SUB), which every target
runs: a byte b holds q_even + 8 + 16 * q_odd (q in -8..7), so q_odd = floor(b / 16) and q_even = b - 16 q_odd - 8.
"""

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
from models.errors import InputError
from models.text import TextDecoder, in_dtype

_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
QUANTIZED = ("int8", "int4")


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


def quantize_rows_int4(table: torch.Tensor, groups: int, block_rows: int = 8192) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int4 with one scale per group of a row (`groups` equal groups; the PLE table's are its layers):
    value ~= q * scale, q in -7..7, scale = max|group| / 7; packed two to a byte as the module docstring says.
    Returns (bytes int8 [V, N/2], scales fp32 [V, groups]), a block of rows at a time as quantize_rows_int8."""
    vocab, width = table.shape
    if width % (2 * groups):
        raise InputError(f"--ple-storage int4: rows of width {width} do not split into {groups} groups of even "
                         "size (int4 packs two values per byte)")
    packed = torch.empty(vocab, width // 2, dtype=torch.int8)
    scale = torch.empty(vocab, groups, dtype=torch.float32)
    for start in range(0, vocab, block_rows):
        block = table[start:start + block_rows].float().unflatten(1, (groups, -1))
        s = block.abs().amax(dim=2).clamp(min=1e-12) / 7.0
        q = torch.round(block / s[..., None]).clamp(-7, 7).flatten(1).to(torch.int16)
        packed[start:start + block_rows] = (q[:, 0::2] + 8 + 16 * q[:, 1::2]).to(torch.int8)
        scale[start:start + block_rows] = s
    return packed, scale


def unpack_int4(packed: Tensor) -> Tensor:
    """int8 bytes [..., N/2] -> float32 q [..., N] (quantize_rows_int4's packing)."""
    b = packed.float()
    odd = torch.floor(b * 0.0625)
    return torch.stack((b - odd * 16 - 8, odd), dim=-1).flatten(-2)


def quantize_rows(table: Tensor, storage: str, groups: int) -> dict[str, Tensor]:
    """The stored tensors of `table` in `storage`: {"rows", "row_scales"} (scales [V, 1] for int8, [V, groups] for
    int4) or {"rows"} for a float storage."""
    if storage == "int8":
        rows, scales = quantize_rows_int8(table)
        return {"rows": rows, "row_scales": scales[:, None].contiguous()}
    if storage == "int4":
        rows, scales = quantize_rows_int4(table, groups)
        return {"rows": rows, "row_scales": scales}
    return {"rows": table.to(_DTYPES[storage]).contiguous()}


class RowTable(nn.Module):
    """A lookup table as the exporters store one: ids -> float32 rows, from int8 rows with one scale per row, int4
    rows with one scale per group (`quantize_rows`), or fp16/bf16/fp32 rows. The PLE table and a quantized
    program's token embedding. scale_dtype: how the scales are stored (float32, as the PLE asset's; bf16 halves
    an int4 table's scales, at 0.4% of a scale against int4's steps of 1/7 of the block's largest value)."""

    def __init__(self, table: Tensor, storage: str, groups: int = 1, scale_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.int4 = storage == "int4"
        stored = quantize_rows(table, storage, groups)
        self.register_buffer("rows", stored["rows"])
        scales = stored.get("row_scales")
        self.register_buffer("row_scales", None if scales is None else scales.to(scale_dtype))

    def forward(self, ids: Tensor) -> Tensor:
        rows = F.embedding(ids, self.rows)
        if self.row_scales is None:
            return rows.float()
        scales = F.embedding(ids, self.row_scales).float()
        if not self.int4:
            return rows.float() * scales
        return (unpack_int4(rows).unflatten(-1, (scales.shape[-1], -1)) * scales[..., None]).flatten(-2)


class PerLayerEmbedder(nn.Module):
    """token ids [1, T] -> per-layer rows [1, T, L, P] from the PLE table stored as `storage`: int8 rows with per-row
    scales, int4 rows with per-row-and-layer scales, or fp16/bf16/fp32 -- the same numbers that contract.ple.PleTable
    reads from the safetensors asset. Its constants are named ple.rows and ple.row_scales
    (exporters.executorch.is_ple_constant sends them to the .ptd)."""

    def __init__(self, model: TextDecoder, storage: str):
        super().__init__()
        ple = model.per_layer_embedding
        self.vocab, self.num_layers, self.dim = ple.vocab, ple.num_layers, ple.dim
        self.scale = in_dtype(ple.scale, torch.float32)
        self.ple = RowTable(ple.weight.detach(), storage, groups=self.num_layers)

    def forward(self, token_ids: Tensor) -> Tensor:
        ids = torch.where((token_ids >= 0) & (token_ids < self.vocab), token_ids, 0)
        return (self.ple(ids) * self.scale).reshape(*token_ids.shape, self.num_layers, self.dim)


def write_ple_table(
    table: torch.Tensor, path: str | Path, storage: str, text_vocab_size: int, num_layers: int, embed_scale: float
) -> Path:
    """table [V_ple, L * P] (unscaled rows) -> a safetensors PLE asset at `path`."""
    stored = quantize_rows(table, storage, num_layers)
    tensors = {"weight": stored["rows"]}
    if "row_scales" in stored:  # int8: [V]; int4: [V, L]
        tensors["scale"] = stored["row_scales"].squeeze(1) if storage == "int8" else stored["row_scales"]
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
