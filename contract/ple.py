"""The per-layer-embedding (PLE) asset: a standalone, memory-mappable safetensors file, read row by row.

On E2B the PLE table holds 2.0B of 5.4B parameters. It never enters an accelerator-resident graph: apps map this file
and copy out only the rows of the tokens in use, then feed them to the decoder graph as `per_layer_rows`.

Layout: tensor `weight` [V_ple, L * P] (int8, fp16, bf16 or fp32) and, for int8, `scale` [V_ple] fp32 with
row = weight[id] * scale[id] (symmetric, per row). The reader multiplies by `embed_scale` (sqrt(P)), as the model
does. Metadata (one JSON entry) records the storage and the shapes; the header is JSON, never a pickle.
"""

from __future__ import annotations

import json
import mmap
import struct
from pathlib import Path

import numpy as np

from models.errors import InputError

FORMAT = "gemma3n-ple/1"
METADATA_KEY = "gemma3n_ple"
_NUMPY = {"I8": np.int8, "F16": np.float16, "F32": np.float32, "BF16": np.uint16}


class PleTable:
    """Memory-mapped PLE lookup. `rows(ids)` reads only the rows of `ids` from disk."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        header, data_start = _read_header(self.path)
        try:
            meta = json.loads((header.pop("__metadata__", None) or {}).get(METADATA_KEY, "{}"))
        except json.JSONDecodeError:
            meta = {}
        if meta.get("format") != FORMAT:
            raise InputError(f"{self.path}: not a PLE asset (metadata format {meta.get('format')!r}, expected {FORMAT})")
        try:
            self.storage = meta["storage"]
            self.vocab_size = int(meta["vocab_size"])
            self.text_vocab_size = int(meta["text_vocab_size"])
            self.num_layers, self.dim = int(meta["num_layers"]), int(meta["dim"])
            self.embed_scale = float(meta["embed_scale"])
        except (KeyError, ValueError) as e:
            raise InputError(f"{self.path}: PLE metadata incomplete ({e})") from None
        self.weight = _map(self.path, header, "weight", data_start, (self.vocab_size, self.num_layers * self.dim))
        self.scale = (
            _map(self.path, header, "scale", data_start, (self.vocab_size,)) if self.storage == "int8" else None
        )

    def rows(self, token_ids) -> np.ndarray:
        """token ids [T] -> float32 [T, L, P]. Ids of the text vocabulary beyond the PLE table (multimodal soft
        tokens) read row 0, as the model does; ids outside the text vocabulary are an error."""
        ids = np.asarray(token_ids, dtype=np.int64).reshape(-1)
        bad = ids[(ids < 0) | (ids >= self.text_vocab_size)]
        if bad.size:
            raise InputError(
                f"token id {int(bad[0])} is out of range: the vocabulary has {self.text_vocab_size} ids "
                f"(0..{self.text_vocab_size - 1})"
            )
        ids = np.where(ids < self.vocab_size, ids, 0)
        raw = self.weight[ids]
        if self.storage == "bf16":
            rows = (raw.astype(np.uint32) << 16).view(np.float32)
        else:
            rows = raw.astype(np.float32)
        if self.scale is not None:
            rows = rows * self.scale[ids].astype(np.float32)[:, None]
        rows = rows * np.float32(self.embed_scale)
        return rows.reshape(len(ids), self.num_layers, self.dim)


def _read_header(path: Path) -> tuple[dict, int]:
    if not path.is_file():
        raise InputError(f"{path}: PLE asset missing")
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) != 8:
            raise InputError(f"{path}: truncated PLE asset (no safetensors header)")
        (n,) = struct.unpack("<Q", prefix)
        if n > min(size - 8, 100 << 20):
            raise InputError(f"{path}: corrupt PLE asset (header length {n} exceeds the file)")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise InputError(f"{path}: corrupt PLE asset (header is not JSON)") from None
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise InputError(f"{path}: truncated PLE asset ({size} bytes, the header describes {8 + n + end})")
    return header, 8 + n


def _map(path: Path, header: dict, name: str, data_start: int, shape: tuple[int, ...]) -> np.memmap:
    if name not in header:
        raise InputError(f"{path}: PLE asset has no tensor {name!r}")
    info = header[name]
    if tuple(info["shape"]) != shape or info["dtype"] not in _NUMPY:
        raise InputError(f"{path}: tensor {name!r} is {info['dtype']}{info['shape']}, expected shape {list(shape)}")
    begin, _ = info["data_offsets"]
    array = np.memmap(path, dtype=_NUMPY[info["dtype"]], mode="r", offset=data_start + begin, shape=shape)
    # Lookups jump between rows far apart: tell the kernel not to read ahead or map neighbouring pages.
    if hasattr(mmap, "MADV_RANDOM") and isinstance(getattr(array, "_mmap", None), mmap.mmap):
        array._mmap.madvise(mmap.MADV_RANDOM)
    return array
