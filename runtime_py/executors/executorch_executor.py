"""The executorch backend: the bundle's .pte (XNNPACK) run by executorch.runtime, the PLE table memory-mapped from
the .ptd. The KV cache lives inside the program as mutable buffers that the prefill and decode methods share.
ExecuTorchEncoders runs the same program's encoder methods (exporters.executorch)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from models.errors import InputError
from runtime_py.executors.encoders import check_image_size

VISION_METHOD, AUDIO_METHOD = "vision_encoder", "audio_encoder"  # as exporters.executorch names them


def load_program(pte: Path, ptd: Path):
    """The program of `pte` with its external weights `ptd`; both are memory-mapped."""
    import executorch.kernels.quantized  # noqa: F401  (registers the kernels quantized programs call)
    from executorch.runtime import Runtime

    try:
        return Runtime.get().load_program(pte, data_path=ptd)
    except Exception as e:  # the runtime raises RuntimeError for unreadable programs
        raise InputError(f"{pte}: ExecuTorch cannot load it ({e})") from None


def bundle_ptd(bundle: Path, manifest: dict) -> Path:
    """The .ptd that the manifest lists beside model.pte."""
    ptd = [Path(bundle) / f["path"] for f in manifest.get("files", []) if f["path"].endswith(".ptd")]
    if not ptd:
        raise InputError(f"{Path(bundle) / 'manifest.json'}: lists no .ptd file beside model.pte")
    return ptd[0]


class ExecuTorchExecutor:
    name = "executorch"

    def __init__(self, pte: Path, ptd: Path, cache_len: int, prefill_lengths: tuple[int, ...]):
        program = load_program(pte, ptd)
        self.methods = {name: program.load_method(name) for name in program.method_names
                        if name.startswith(("prefill_", "decode", "token_embedding", "per_layer_embedding"))}
        self.cache_len, self.prefill_lengths = cache_len, tuple(prefill_lengths)

    def _ids(self, ids: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(np.asarray(ids, dtype=np.int64))[None]

    def embed(self, ids: np.ndarray) -> np.ndarray:
        return self.methods["token_embedding"].execute([self._ids(ids)])[0].numpy()

    def per_layer_rows(self, ids: np.ndarray) -> np.ndarray:
        return self.methods["per_layer_embedding"].execute([self._ids(ids)])[0][0].numpy()

    def _run(self, method: str, embeds, rows, start: int) -> np.ndarray:
        T = embeds.shape[1]
        out = self.methods[method].execute(
            [torch.from_numpy(np.ascontiguousarray(embeds, np.float32)),
             torch.from_numpy(np.ascontiguousarray(rows, np.float32)), torch.arange(start, start + T)]
        )
        return out[0][0, -1].numpy()

    def prefill(self, embeds, rows, start: int) -> np.ndarray:
        return self._run(f"prefill_{embeds.shape[1]}", embeds, rows, start)

    def decode(self, embeds, rows, pos: int) -> np.ndarray:
        return self._run("decode", embeds, rows, pos)

    def reset(self) -> None:
        """Nothing to clear: every position is written before any query reads it, and later slots are masked."""


class ExecuTorchEncoders:
    """The encoder methods of a bundle's model.pte (vision_encoder_<S>, audio_encoder): the interface of
    runtime_py.executors.encoders. Methods load on first use, each with its own planned activation memory.
    `threads` is not applied: XNNPACK's thread pool is one per process, and each delegate keeps the pool it was
    loaded with, so resizing it after the decoder's methods have loaded would leave them a freed pool."""

    name = "executorch"

    def __init__(self, bundle: Path, manifest: dict, threads: int = 2):
        self.pte = Path(bundle) / "model.pte"
        self.program = load_program(self.pte, bundle_ptd(bundle, manifest))
        spec = manifest.get("export_spec", {})
        components, names = set(spec.get("components", [])), self.program.method_names
        sizes = tuple(spec.get("image_sizes", ())) if "vision" in components else ()
        missing = [m for m in [f"{VISION_METHOD}_{s}" for s in sizes] + [AUDIO_METHOD] * ("audio" in components)
                   if m not in names]
        if missing:
            raise InputError(f"{self.pte}: the manifest lists encoders the program lacks (no method "
                             f"{', '.join(missing)}; it has {', '.join(sorted(names))})")
        self.image_sizes, self.has_vision, self.has_audio = sizes, bool(sizes), "audio" in components
        if self.has_audio:  # the one window the method takes, [1, F, 128] and [1, F]
            meta = self.program.metadata(AUDIO_METHOD)
            self.audio_shapes = tuple(tuple(meta.input_tensor_meta(i).sizes()) for i in range(2))
        self._methods: dict[str, object] = {}

    def _method(self, name: str):
        if name not in self._methods:
            self._methods[name] = self.program.load_method(name)
        return self._methods[name]

    def image(self, pixel_values: np.ndarray) -> np.ndarray:
        if not self.has_vision:
            raise InputError(f"{self.pte}: the bundle has no vision encoder")
        size = check_image_size(pixel_values, self.image_sizes, str(self.pte))
        pixels = torch.from_numpy(np.ascontiguousarray(pixel_values, np.float32))
        return self._method(f"{VISION_METHOD}_{size}").execute([pixels])[0].numpy()

    def audio(self, features: np.ndarray, padding_mask: np.ndarray) -> np.ndarray:
        if not self.has_audio:
            raise InputError(f"{self.pte}: the bundle has no audio encoder")
        if (tuple(features.shape), tuple(padding_mask.shape)) != self.audio_shapes:
            expected = " and ".join(str(list(shape)) for shape in self.audio_shapes)
            raise InputError(f"audio features {list(features.shape)} and padding mask {list(padding_mask.shape)}: "
                             f"expected {expected} (one 30 s window)")
        inputs = [torch.from_numpy(np.ascontiguousarray(a, np.float32)) for a in (features, padding_mask)]
        return self._method(AUDIO_METHOD).execute(inputs)[0].numpy()

