"""The per-layer-embedding (PLE) asset: a standalone, memory-mappable safetensors file, read row by row.

On E2B the PLE table holds 2.0B of 5.4B parameters. It never enters an accelerator-resident graph: apps map this file
and copy out only the rows of the tokens in use, then feed them to the decoder graph as `per_layer_rows`.

Layout: tensor `weight` [V_ple, L * P] (int8, fp16, bf16 or fp32) and, for int8, `scale` [V_ple] fp32 with
row = weight[id] * scale[id] (symmetric, per row). int4: `weight` [V_ple, L * P / 2] int8, two values per byte
(byte j of a row holds element 2j as its value mod 16, minus 8, and element 2j+1 as floor(byte / 16)), and `scale`
[V_ple, L] fp32, one per row and layer: row[l, p] = q[l * P + p] * scale[id, l]. The reader multiplies by
`embed_scale` (sqrt(P)), as the model does. Metadata (one JSON entry) records the storage and the shapes; the
header is JSON, never a pickle.

The same format holds the Core ML bundle's token table (embeddings.safetensors: rows [V, H], in H / 32 groups of 32
as "num_layers" groups of "dim", embed_scale sqrt(H)): an app reads a row of it as a row of this table, reshaped
to [H].
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
        tensors, meta, data_start = _read_header(self.path)
        if meta.get("format") != FORMAT:
            raise InputError(f"{self.path}: not a PLE asset (metadata format {meta.get('format')!r}, expected {FORMAT})")
        self.storage = _meta(self.path, meta, "storage", str)
        if self.storage not in _STORAGE_DTYPE:
            raise InputError(f"{self.path}: PLE storage {self.storage!r} is not one of {', '.join(_STORAGE_DTYPE)}")
        self.vocab_size = _meta(self.path, meta, "vocab_size", int)
        self.text_vocab_size = _meta(self.path, meta, "text_vocab_size", int)
        self.num_layers, self.dim = _meta(self.path, meta, "num_layers", int), _meta(self.path, meta, "dim", int)
        self.embed_scale = float(_meta(self.path, meta, "embed_scale", float))
        if self.text_vocab_size < self.vocab_size or not np.isfinite(self.embed_scale):
            raise InputError(f"{self.path}: PLE metadata inconsistent (text_vocab_size {self.text_vocab_size} < "
                             f"vocab_size {self.vocab_size}, or embed_scale {self.embed_scale} not finite)")
        packed = 2 if self.storage == "int4" else 1
        if self.dim % packed:
            raise InputError(f"{self.path}: PLE metadata dim {self.dim} is odd; int4 rows pack two values per byte")
        self.weight = _map(self.path, tensors, "weight", _STORAGE_DTYPE[self.storage], data_start,
                           (self.vocab_size, self.num_layers * self.dim // packed))
        scale_shape = {"int8": (self.vocab_size,), "int4": (self.vocab_size, self.num_layers)}.get(self.storage)
        self.scale = None if scale_shape is None else _map(self.path, tensors, "scale", "F32", data_start, scale_shape)

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
        elif self.storage == "int4":
            b = raw.astype(np.int16)
            rows = np.stack(((b & 15) - 8, b >> 4), axis=-1).astype(np.float32)  # >> on a signed int: floor(b / 16)
        else:
            rows = raw.astype(np.float32)
        rows = rows.reshape(len(ids), self.num_layers, self.dim)
        if self.scale is not None:
            rows = rows * self.scale[ids].astype(np.float32).reshape(len(ids), -1, 1)
        return rows * np.float32(self.embed_scale)


_STORAGE_DTYPE = {"int8": "I8", "int4": "I8", "fp16": "F16", "bf16": "BF16", "fp32": "F32"}


def _meta(path: Path, meta: dict, key: str, kind: type):
    """A metadata value of `kind` (an int is a float too; a bool is neither), positive where it is a number."""
    value = meta.get(key)
    kinds = (int, float) if kind is float else kind
    if isinstance(value, bool) or not isinstance(value, kinds) or (kind is int and value <= 0):
        raise InputError(f"{path}: PLE metadata {key} is {value!r}, expected a{' positive' * (kind is int)} "
                         f"{kind.__name__}")
    return value


def _read_header(path: Path) -> tuple[dict, dict, int]:
    """The safetensors header, checked whole before any tensor is mapped: (tensors, PLE metadata, data start).
    Every tensor entry has a known dtype, a shape of non-negative ints and data offsets inside the file that hold
    exactly that shape; anything else is one InputError naming the file."""
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
    if not isinstance(header, dict):
        raise InputError(f"{path}: corrupt PLE asset (header is not a JSON object)")
    metadata = header.pop("__metadata__", None)
    description = metadata.get(METADATA_KEY) if isinstance(metadata, dict) else None
    try:
        meta = json.loads(description) if isinstance(description, str) else None
    except json.JSONDecodeError:
        meta = None
    if not isinstance(meta, dict):
        raise InputError(f"{path}: not a PLE asset (no {METADATA_KEY} metadata)")
    end = 0
    for name, info in header.items():
        if not _tensor_entry(info):
            raise InputError(f"{path}: corrupt PLE asset (tensor {name!r}: {str(info)[:80]})")
        end = max(end, info["data_offsets"][1])
    if 8 + n + end > size:
        raise InputError(f"{path}: truncated PLE asset ({size} bytes, the header describes {8 + n + end})")
    return header, meta, 8 + n


def _naturals(value, lengths) -> bool:
    return (isinstance(value, list) and len(value) in lengths
            and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in value))


def _tensor_entry(info) -> bool:
    """A safetensors header entry: a known dtype, a shape of 1 to 4 non-negative ints, and data offsets that hold
    exactly that many elements."""
    if not (isinstance(info, dict) and isinstance(info.get("dtype"), str) and info["dtype"] in _NUMPY
            and _naturals(info.get("shape"), range(1, 5)) and _naturals(info.get("data_offsets"), (2,))):
        return False
    begin, stop = info["data_offsets"]
    return stop - begin == int(np.prod(info["shape"], dtype=np.float64)) * np.dtype(_NUMPY[info["dtype"]]).itemsize


def _map(path: Path, tensors: dict, name: str, dtype: str, data_start: int, shape: tuple[int, ...]) -> np.memmap:
    if name not in tensors:
        raise InputError(f"{path}: PLE asset has no tensor {name!r}")
    info = tensors[name]
    if tuple(info["shape"]) != shape or info["dtype"] != dtype:
        raise InputError(f"{path}: tensor {name!r} is {info['dtype']}{info['shape']}, expected {dtype}{list(shape)}")
    begin, _ = info["data_offsets"]
    array = np.memmap(path, dtype=_NUMPY[dtype], mode="r", offset=data_start + begin, shape=shape)
    # Lookups jump between rows far apart: tell the kernel not to read ahead or map neighbouring pages.
    if hasattr(mmap, "MADV_RANDOM") and isinstance(getattr(array, "_mmap", None), mmap.mmap):
        array._mmap.madvise(mmap.MADV_RANDOM)
    return array
