"""The executorch backend: the bundle's .pte (XNNPACK) run by executorch.runtime, the PLE table memory-mapped from
the .ptd. The KV cache lives inside the program as mutable buffers that the prefill and decode methods share."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from models.errors import InputError


class ExecuTorchExecutor:
    name = "executorch"

    def __init__(self, pte: Path, ptd: Path, cache_len: int, prefill_lengths: tuple[int, ...]):
        import executorch.kernels.quantized  # noqa: F401  (registers the kernels quantized programs call)
        from executorch.runtime import Runtime

        try:
            program = Runtime.get().load_program(pte, data_path=ptd)
        except Exception as e:  # the runtime raises RuntimeError for unreadable programs
            raise InputError(f"{pte}: ExecuTorch cannot load it ({e})") from None
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
