"""The coreml backend (macOS only): the bundle's multifunction .mlpackage, prefill_<T> and decode sharing one KV-cache
state; token embeddings from embeddings.safetensors and PLE rows from per_layer_embeddings.safetensors, as an iOS app
reads them. Never exercised on Linux, where coremltools cannot predict."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from safetensors.numpy import load_file


class CoreMLExecutor:
    name = "coreml"

    def __init__(self, bundle: Path, cache_len: int, prefill_lengths: tuple[int, ...]):
        import coremltools as ct

        package = str(Path(bundle) / "model.mlpackage")
        self.functions = {name: ct.models.MLModel(package, function_name=name)
                          for name in [f"prefill_{t}" for t in prefill_lengths] + ["decode"]}
        self.table = load_file(str(Path(bundle) / "embeddings.safetensors"))["weight"]
        self.cache_len, self.prefill_lengths = cache_len, tuple(prefill_lengths)
        self.reset()

    def embed(self, ids: np.ndarray) -> np.ndarray:
        return self.table[np.asarray(ids)].astype(np.float32)[None]

    def _run(self, function: str, embeds, rows, start: int) -> np.ndarray:
        T = embeds.shape[1]
        inputs = {"inputs_embeds": embeds.astype(np.float32), "per_layer_rows": rows.astype(np.float32),
                  "input_pos": np.arange(start, start + T, dtype=np.int32)}
        return self.functions[function].predict(inputs, state=self.state)["logits"][0, -1].astype(np.float32)

    def prefill(self, embeds, rows, start: int) -> np.ndarray:
        return self._run(f"prefill_{embeds.shape[1]}", embeds, rows, start)

    def decode(self, embeds, rows, pos: int) -> np.ndarray:
        return self._run("decode", embeds, rows, pos)

    def reset(self) -> None:
        self.state = self.functions["decode"].make_state()  # one state, shared by every function
