"""Executors: one per backend. An executor only runs graphs and owns the KV cache; everything else (tokenizer,
template, sampling, stop detection, PLE rows) is shared above it in the session.

Interface (duck-typed):
    cache_len: int
    prefill_lengths: tuple[int, ...]        # the fixed prompt-chunk lengths its prefill graphs take
    embed(ids: np.ndarray [T]) -> np.ndarray [1, T, H]            # token-embedding lookup
    prefill(embeds [1,T,H], per_layer_rows [1,T,L,P], start: int) -> np.ndarray [V]   # last position's logits
    decode(embeds [1,1,H], per_layer_rows [1,1,L,P], pos: int) -> np.ndarray [V]
    reset() -> None                                                 # empty the KV cache

A bundle with encoders also gets an encoder runner per backend (runtime_py.executors.encoders: image(pixel_values),
audio(features, padding_mask)); the session splices their outputs into the embeddings it hands to prefill.
"""

BACKENDS = ("torch", "litert", "litertlm", "executorch", "coreml")


def load_executor(backend: str, bundle, manifest: dict, threads: int = 2):
    """(executor, per_layer_rows lookup) for a verified bundle."""
    import sys
    from pathlib import Path

    from models.errors import InputError

    bundle = Path(bundle)
    spec = manifest["export_spec"]
    cache_len, prefill_lengths = spec["cache_len"], tuple(spec["prefill_lengths"])
    if backend == "litert":
        from runtime_py.executors.litert_executor import LiteRtExecutor

        executor = LiteRtExecutor(bundle / "model.litertlm", cache_len, prefill_lengths, threads)
        return executor, executor.per_layer_rows
    if backend == "executorch":
        from runtime_py.executors.executorch_executor import ExecuTorchExecutor

        ptd = [bundle / f["path"] for f in manifest["files"] if f["path"].endswith(".ptd")]
        executor = ExecuTorchExecutor(bundle / "model.pte", ptd[0], cache_len, prefill_lengths)
        return executor, executor.per_layer_rows
    if backend == "coreml":
        if sys.platform != "darwin":
            raise InputError("the coreml backend needs macOS: coremltools cannot run Core ML models on Linux")
        from runtime_py.executors.coreml_executor import CoreMLExecutor
        from runtime_py.ple import PleTable

        executor = CoreMLExecutor(bundle, cache_len, prefill_lengths)
        return executor, PleTable(bundle / "per_layer_embeddings.safetensors").rows
    raise InputError(f"--backend {backend}: not an executor backend")
