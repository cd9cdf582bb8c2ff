"""How the bench measures: interleaved medians, the peak RSS of a process tree, the machine's memory bandwidth, and
how much of a mapped file is resident (mincore)."""

from __future__ import annotations

import ctypes
import mmap
import os
import platform
import statistics
import subprocess
import threading
import time
from pathlib import Path

from models.errors import InputError

PAGE = mmap.PAGESIZE


def interleaved(fns: dict, repeats: int) -> tuple[dict, dict]:
    """Median wall seconds of each function over `repeats` rounds after one warm-up call, the functions run
    alternately so that load on the machine hits all alike; and each one's warm-up output (for correctness checks)."""
    outputs = {key: fn() for key, fn in fns.items()}
    times = {key: [] for key in fns}
    for _ in range(repeats):
        for key, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - t)
    return {key: statistics.median(ts) for key, ts in times.items()}, outputs


def tree_rss_kib(root: int, field: str = "VmRSS") -> int:
    """Resident KiB of `root` and every descendant (converters spawn workers); field "RssAnon": its anonymous part
    alone, without the pages of mapped files (a checkpoint's safetensors, which the kernel can drop and read again)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        todo.extend(children.get(pid, []))
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith(field + ":"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total


def run_measured(cmd: list[str], log: Path, env: dict | None = None) -> dict:
    """Runs cmd (stderr to log); returns wall seconds, the peak RSS of its process tree and the peak of its anonymous
    part (MiB, sampled every 0.1 s) and its stdout's last line (the children print their result there as JSON)."""
    start = time.perf_counter()
    with open(log, "a") as out:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=out, text=True, env=env)
        peak = [0, 0]

        def sample():
            while proc.poll() is None:
                peak[0] = max(peak[0], tree_rss_kib(proc.pid))
                peak[1] = max(peak[1], tree_rss_kib(proc.pid, "RssAnon"))
                time.sleep(0.1)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        stdout, _ = proc.communicate()
        sampler.join()
    if proc.returncode != 0:
        raise InputError(f"{' '.join(Path(c).name if i == 0 else c for i, c in enumerate(cmd[:5]))} ... failed "
                         f"(exit {proc.returncode}); see {log}")
    lines = stdout.strip().splitlines()
    return {"seconds": time.perf_counter() - start, "peak_rss_mib": peak[0] / 1024, "peak_anon_mib": peak[1] / 1024,
            "last": lines[-1] if lines else ""}


def memory_bandwidth(threads: int, gib: float = 1.0, repeats: int = 5) -> float:
    """Bytes per second this machine reads from memory: the median of summing a float32 array of `gib` GiB (far
    beyond any cache) with torch on `threads` threads, the thread count every contender runs with."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x = torch.ones(int(gib * (1 << 30)) // 4)
        seconds, _ = interleaved({"sum": lambda: float(x.sum())}, repeats)
    finally:
        torch.set_num_threads(previous)
    return x.numel() * 4 / seconds["sum"]


def resident_share(path: Path, begin: int = 0, end: int | None = None) -> float:
    """The share of the pages of path[begin:end] that are in the page cache (mincore over a fresh mapping): what any
    process reading that file has brought into memory, whether through a mapping or read()."""
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    size = os.path.getsize(path)
    end = size if end is None else end
    pages = (size + PAGE - 1) // PAGE
    vec = (ctypes.c_ubyte * pages)()
    with open(path, "rb") as f:
        # A private (copy-on-write) mapping, so that ctypes can take its address; pages never written are the page
        # cache's, which is what mincore reports.
        mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        anchor = ctypes.c_char.from_buffer(mapping)
        try:
            if libc.mincore(ctypes.c_void_p(ctypes.addressof(anchor)), ctypes.c_size_t(size), vec) != 0:
                raise OSError(ctypes.get_errno(), f"mincore on {path}")
        finally:
            del anchor
            mapping.close()
    first, last = begin // PAGE, (end + PAGE - 1) // PAGE
    return sum(vec[i] & 1 for i in range(first, last)) / max(last - first, 1)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"
