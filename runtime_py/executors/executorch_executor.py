"""The executorch backend: the bundle's .pte (XNNPACK) run by executorch.runtime, the PLE table memory-mapped from
the .ptd and paged in row by row (pages_on_demand). The KV cache lives inside the program as mutable buffers, written
by text_decoder.
It calls the methods of ExecuTorch's LLM runner contract (exporters.executorch) as the stock runner does:
token_embedding, then text_decoder for prompt chunks of any length and for each decoded token. ExecuTorchEncoders runs
the same program's encoder methods."""

from __future__ import annotations

import ctypes
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from contract.bundle import (
    AUDIO_ENCODER,
    HIDDEN_SIZE,
    PER_LAYER_SHAPE,
    TEXT_DECODER,
    TOKEN_EMBEDDING,
    vision_encoder_name,
)
from models.encoders import runner_audio_input
from models.errors import InputError
from models.fileio import drop_from_page_cache
from runtime_py.executors.base import check_image_size, native_output_to_log

_CAP_IPC_LOCK, _MADV_RANDOM = 14, 1  # linux/capability.h, asm-generic/mman-common.h


@contextmanager
def pages_on_demand(*files: Path):
    """Loads under it leave `files` mapped but not read: the PLE table (.ptd) and the token embedding (.pte) are
    read a few rows per token, so only those rows' pages should come into memory.

    ExecuTorch's Python runtime maps programs with mlock (MmapDataLoader, UseMlockIgnoreErrors): a process that may
    lock memory (root: CAP_IPC_LOCK) gets the whole table pinned when token_embedding loads (2 GB on E2B at int8).
    Without that right the lock fails and the failure is ignored, which is what any user under the default memlock
    limit gets; so the block runs with the calling thread's CAP_IPC_LOCK cleared (capabilities are per thread) and
    restored after. Then the mappings of `files` are advised MADV_RANDOM: each row's page fault would otherwise read
    ahead the disk's read-ahead window (8 MB on this VM), and 256 lookups brought 60% of E2B's table in. The loads'
    own first reads (headers, segment starts) came before that advice and read ahead too: 11% of the scaled bench
    model's 126 MB table before any lookup. Those pages are dropped from the page cache again; pages that something
    has mapped stay (the kernel keeps them), so nothing the program uses is lost."""

    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]

    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        header, data = Header(0x20080522, 0), (Data * 2)()  # _LINUX_CAPABILITY_VERSION_3: two 32-bit words
        held = libc.capget(ctypes.byref(header), data) == 0 and data[0].effective >> _CAP_IPC_LOCK & 1
    except (OSError, AttributeError):  # not Linux with glibc: nothing to clear or advise
        libc, held = None, False
    if held:
        data[0].effective &= ~(1 << _CAP_IPC_LOCK)
        held = libc.capset(ctypes.byref(header), data) == 0
    try:
        yield
    finally:
        if held:
            data[0].effective |= 1 << _CAP_IPC_LOCK
            libc.capset(ctypes.byref(header), data)
        if libc is not None and files:
            _advise_random(libc, {str(Path(f).resolve()) for f in files})
            for f in files:
                drop_from_page_cache(Path(f))


def _advise_random(libc, paths: set[str]) -> None:
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    try:
        maps = Path("/proc/self/maps").read_text().splitlines()
    except OSError:  # no procfs: the mappings keep the kernel's default read-ahead
        return
    for line in maps:
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5] in paths:
            begin, end = (int(x, 16) for x in fields[0].split("-"))
            libc.madvise(begin, end - begin, _MADV_RANDOM)


def load_program(pte: Path, ptd: Path):
    """The program of `pte` with its external weights `ptd`; both are memory-mapped. Load its methods under
    pages_on_demand too: a method maps its constants when it loads."""
    with native_output_to_log():
        import executorch.kernels.quantized  # noqa: F401  (registers the kernels quantized programs call)
        from executorch.runtime import Runtime
    try:
        with native_output_to_log(), pages_on_demand():
            return Runtime.get().load_program(pte, data_path=ptd)
    except Exception as e:  # the runtime raises RuntimeError for unreadable programs
        raise InputError(f"{pte}: ExecuTorch cannot load it ({e})") from None


class ExecuTorchExecutor:
    name = "executorch"

    def __init__(self, pte: Path, ptd: Path, cache_len: int, prefill_lengths: tuple[int, ...]):
        program = load_program(pte, ptd)
        with native_output_to_log(), pages_on_demand(pte, ptd):  # XNNPACK's first load probes the CPU, loudly
            self.methods = {name: program.load_method(name) for name in (TOKEN_EMBEDDING, TEXT_DECODER)}
        # text_decoder takes any chunk: every length up to the bundle's longest is a prefill length to the session.
        self.cache_len, self.prefill_lengths = cache_len, tuple(range(1, max(prefill_lengths) + 1))
        with native_output_to_log():
            self.hidden_size = int(program.load_method(HIDDEN_SIZE).execute([])[0])
            self.rows_shape = tuple(int(n) for n in program.load_method(PER_LAYER_SHAPE).execute([]))
        self._last: tuple[bytes, np.ndarray] | None = None

    def embeddings(self, ids: np.ndarray) -> np.ndarray:
        """token_embedding's [1, T, H + L*P] for ids, kept for the call that asks for the other half."""
        key = np.asarray(ids, dtype=np.int64)
        if self._last is None or self._last[0] != key.tobytes():
            self._last = key.tobytes(), self.methods[TOKEN_EMBEDDING].execute([torch.from_numpy(key)[None]])[0].numpy()
        return self._last[1]

    def embed(self, ids: np.ndarray) -> np.ndarray:
        return self.embeddings(ids)[..., : self.hidden_size]

    def per_layer_rows(self, ids: np.ndarray) -> np.ndarray:
        out = self.embeddings(ids)[0, :, self.hidden_size :]
        return out.reshape(out.shape[0], *self.rows_shape)

    def prefill(self, embeds, rows, start: int) -> np.ndarray:
        """embeds [1, T, H] and rows [1, T, L, P] side by side again, as token_embedding gave them."""
        T = embeds.shape[1]
        joined = np.concatenate([embeds, np.asarray(rows).reshape(1, T, -1)], axis=-1)
        out = self.methods[TEXT_DECODER].execute([torch.from_numpy(np.ascontiguousarray(joined, np.float32)),
                                                  torch.arange(start, start + T)])
        return out[0][0, -1].numpy()

    decode = prefill  # one method for both, as the runner calls it

    def reset(self) -> None:
        """Nothing to clear: every position is written before any query reads it, and later slots are masked."""


class ExecuTorchEncoders:
    """The encoder methods of a bundle's model.pte (vision_encoder_<S>, audio_encoder): the interface of
    runtime_py.executors.base.EncoderRunner. Methods load on first use, each with its own planned activation memory.
    It takes no thread count: XNNPACK's thread pool is one per process, and each delegate keeps the pool it was
    loaded with, so resizing it after the decoder's methods have loaded would leave them a freed pool."""

    name = "executorch"

    def __init__(self, pte: Path, ptd: Path, components: tuple[str, ...], image_sizes: tuple[int, ...]):
        """components, image_sizes: what the bundle lists; each must be a method of the program."""
        self.pte = Path(pte)
        self.program = load_program(self.pte, ptd)
        components, names = set(components), self.program.method_names
        sizes = tuple(image_sizes) if "vision" in components else ()
        missing = [m for m in [vision_encoder_name(s) for s in sizes] + [AUDIO_ENCODER] * ("audio" in components)
                   if m not in names]
        if missing:
            raise InputError(f"{self.pte}: the manifest lists encoders the program lacks (no method "
                             f"{', '.join(missing)}; it has {', '.join(sorted(names))})")
        self.image_sizes, self.has_vision, self.has_audio = sizes, bool(sizes), "audio" in components
        if self.has_audio:  # the one window the method takes, [1, 128 + 1, F]: features [1, F, 128] and mask [1, F]
            bins, frames = tuple(self.program.metadata(AUDIO_ENCODER).input_tensor_meta(0).sizes())[1:]
            self.audio_shapes = (1, frames, bins - 1), (1, frames)
        with native_output_to_log():
            self.hidden_size = int(self.program.load_method(HIDDEN_SIZE).execute([])[0])
        self._methods: dict[str, object] = {}

    def _method(self, name: str):
        if name not in self._methods:
            with native_output_to_log(), pages_on_demand():
                self._methods[name] = self.program.load_method(name)
        return self._methods[name]

    def image(self, pixel_values: np.ndarray) -> np.ndarray:
        if not self.has_vision:
            raise InputError(f"{self.pte}: the bundle has no vision encoder")
        size = check_image_size(pixel_values, self.image_sizes, str(self.pte))
        pixels = torch.from_numpy(np.ascontiguousarray(pixel_values, np.float32))
        return self._method(vision_encoder_name(size)).execute([pixels])[0].numpy()[..., : self.hidden_size]

    def audio(self, features: np.ndarray, padding_mask: np.ndarray) -> np.ndarray:
        if not self.has_audio:
            raise InputError(f"{self.pte}: the bundle has no audio encoder")
        if (tuple(features.shape), tuple(padding_mask.shape)) != self.audio_shapes:
            expected = " and ".join(str(list(shape)) for shape in self.audio_shapes)
            raise InputError(f"audio features {list(features.shape)} and padding mask {list(padding_mask.shape)}: "
                             f"expected {expected} (one 30 s window)")
        packed = torch.from_numpy(runner_audio_input(features, padding_mask))
        return self._method(AUDIO_ENCODER).execute([packed])[0].numpy()[..., : self.hidden_size]

