"""Executors: one per backend. An executor only runs graphs and owns the KV cache; everything else (tokenizer,
template, sampling, stop detection, PLE rows) is shared above it in the session.

Interface (duck-typed):
    cache_len: int
    prefill_lengths: tuple[int, ...]        # the fixed prompt-chunk lengths its prefill graphs take
    embed(ids: np.ndarray [T]) -> np.ndarray [1, T, H]            # token-embedding lookup
    prefill(embeds [1,T,H], per_layer_rows [1,T,L,P], start: int) -> np.ndarray [V]   # last position's logits
    decode(embeds [1,1,H], per_layer_rows [1,1,L,P], pos: int) -> np.ndarray [V]
    reset() -> None                                                 # empty the KV cache
"""

BACKENDS = ("torch", "litert", "litertlm", "executorch", "coreml")
