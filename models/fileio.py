"""Output folders that appear whole or not at all, and a file's pages dropped from the page cache."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from models.errors import InputError


def check_new_directory(path: str | os.PathLike) -> Path:
    """An output folder that does not exist yet (checked before long work, and again by atomic_directory)."""
    path = Path(path)
    if path.exists():
        raise InputError(f"{path}: already exists; choose a new output directory")
    return path


@contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary folder beside `path` and renames it to `path` when the block succeeds; on any failure the
    temporary folder is removed, so no half-written output is ever left. `path` must not exist yet."""
    path = check_new_directory(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield tmp
        tmp.chmod(0o755)  # mkdtemp's 0700 is for the work in progress, not for the result
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_json_object(folder: Path, name: str, what: str, missing_hint: str, error: type = InputError) -> dict:
    """folder/name parsed as a JSON object; any problem is one `error` (a G3nError) line naming the file."""
    folder = Path(folder)
    path = folder / name
    if not folder.is_dir():
        raise error(f"{folder}: no such {what} directory")
    if not path.is_file():
        raise error(f"{path}: missing ({missing_hint})")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise error(f"{path}: expected a JSON object")
    return raw


def drop_from_page_cache(path: Path) -> None:
    """Evicts a file's pages from the page cache (written back first, so that fresh files' pages go too); pages a
    mapping holds stay. The bench measures residency after it; runtime_py's executorch backend drops what its loads
    read ahead."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


MADV_PAGEOUT = 21  # linux/mman.h; Python's mmap module does not name it


def release_mapped_pages(tensors) -> int:
    """Reclaims this process's pages of the file mappings behind `tensors` (a model loaded from memory-mapped
    safetensors) with MADV_PAGEOUT, which keeps the contents: a later read faults them back in from the file, and
    pages written to (none are) would stay. An exporter calls it once its programs hold every weight they need, so
    that the checkpoint's pages (7 GB of E2B's export peak) no longer count in its memory. Returns the bytes of the
    mappings advised; 0 where no tensor is mapped from a file (a model built in memory)."""
    import bisect
    import ctypes

    pointers = sorted({t.untyped_storage().data_ptr() for t in tensors})
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    advised = 0
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            if len(fields) < 6 or not fields[5].startswith("/"):  # anonymous memory: never advised
                continue
            start, end = (int(x, 16) for x in fields[0].split("-"))
            first = bisect.bisect_left(pointers, start)
            if first < len(pointers) and pointers[first] < end and libc.madvise(start, end - start, MADV_PAGEOUT) == 0:
                advised += end - start
    return advised
