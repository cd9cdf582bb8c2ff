"""A conversion memo: a converter's output kept under a hash of everything the conversion reads, so that the same
module converted again (the float graph under each quantization level of `g3n compare`, the same encoder in several
bundles of one test run) is copied instead of converted. Conversion is framework-bound (MobileNet-V5's 84 blocks at
1/16 width, about 3,600 nodes, took LiteRT 75 s and ExecuTorch 283 s on this machine, at any image size), so a repeat
costs as much as the first.

Off unless G3N_CONVERSION_MEMO names a folder. The key covers the converter's version, the source of models/ and
exporters/ (a code change misses), and for every signature its name, its sample inputs, and every submodule's type,
plain attributes, parameters and buffers (bytes). A hit is a byte copy of a real conversion of equal inputs; a
per-key lock makes a second process wait for the first instead of converting the same graph beside it.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import os
import shutil
from pathlib import Path
from typing import Callable

import torch
from torch import nn

ENV = "G3N_CONVERSION_MEMO"
_SOURCES = ("models", "exporters")
# What the checkpoint loader attaches for saving back (models.checkpoint); forward never reads them.
_NOT_TRACED = ("hf_config", "carried_tensors")


@functools.cache
def _source_digest() -> bytes:
    root = Path(__file__).resolve().parent.parent
    h = hashlib.sha256()
    for package in _SOURCES:
        for path in sorted((root / package).rglob("*.py")):
            h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return h.digest()


class _Hasher:
    """sha256 over values; a tensor met again (the same storage, shape and strides: the model under each of its
    signatures) is hashed as a reference to its first sighting."""

    def __init__(self, seed: bytes):
        self.h, self.seen = hashlib.sha256(seed), {}

    def update(self, data: bytes) -> None:
        self.h.update(data)

    def tensor(self, t: torch.Tensor) -> None:
        t = t.detach()
        self.update(f"{t.dtype}{tuple(t.shape)}".encode())
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        if ident in self.seen and t.numel():
            self.update(b"seen%d" % self.seen[ident])
            return
        self.seen[ident] = len(self.seen)
        self.update(t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def _value(h: _Hasher, value) -> None:
    if isinstance(value, torch.Tensor):
        h.tensor(value)
    elif isinstance(value, dict):
        for k in sorted(value, key=str):
            h.update(repr(k).encode())
            _value(h, value[k])
    elif isinstance(value, (list, tuple)):
        for v in value:
            _value(h, v)
    else:
        h.update(repr(value).encode())


def _module(h: _Hasher, module: nn.Module) -> None:
    for name, sub in module.named_modules(remove_duplicate=False):
        h.update(f"{name}:{type(sub).__module__}.{type(sub).__qualname__}".encode())
        for key in sorted(vars(sub)):
            value = vars(sub)[key]
            if key in ("_parameters", "_buffers"):
                _value(h, {k: v for k, v in value.items() if v is not None})
            elif not key.startswith("_") and key not in _NOT_TRACED and not isinstance(value, nn.Module):
                h.update(key.encode())
                _value(h, value)
        h.update(b"training" if sub.training else b"eval")


def conversion_key(signatures: list[tuple[str, nn.Module, dict]], converter_version: str) -> str:
    h = _Hasher(converter_version.encode() + _source_digest())
    for name, module, sample in signatures:
        h.update(name.encode())
        _value(h, sample)
        _module(h, module)
    return h.h.hexdigest()


def enabled() -> bool:
    return bool(os.environ.get(ENV))


def _copy(source: Path, target: Path) -> None:
    if source.is_dir():
        shutil.copytree(source, target)
    else:
        shutil.copyfile(source, target)


def memoized(signatures: list[tuple[str, nn.Module, dict]], converter_version: str, path: Path,
             convert: Callable[[Path], None]) -> Path:
    """convert(path) writes the file or folder (a Core ML package); with the memo on, it runs only for a key not seen
    before. A folder is copied into a `path` that must not exist yet."""
    folder = os.environ.get(ENV)
    if not folder:
        convert(path)
        return path
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    key = conversion_key(signatures, converter_version)
    kept = folder / key
    with open(folder / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not kept.exists():
            convert(path)
            tmp = folder / f"{key}.{os.getpid()}.tmp"
            _copy(path, tmp)
            os.replace(tmp, kept)
            return path
    _copy(kept, path)
    return path
