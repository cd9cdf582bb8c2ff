"""The engine: opens a bundle (or a bare PyTorch model) and hands out sessions on the chosen backend."""

from __future__ import annotations

from pathlib import Path

import torch

from models.errors import InputError
from runtime_py.components.tokenizer import Tokenizer
from runtime_py.executors import BACKENDS
from runtime_py.session import Session

DEFAULT_TOKENIZER = Path(__file__).resolve().parents[1] / "models" / "assets" / "tokenizer.model"


def _stop_ids(model_config, tokenizer: Tokenizer) -> list[int]:
    ids = list(model_config.eos_token_ids)
    end_of_turn = tokenizer.token_id("<end_of_turn>")
    if end_of_turn is not None:
        ids.append(end_of_turn)
    return sorted(set(ids))


def session_for_model(model, tokenizer_path=DEFAULT_TOKENIZER, cache_len: int = 256,
                      prefill_lengths: tuple[int, ...] = (32,)) -> Session:
    """A torch-backend session straight over a TextDecoder (no bundle): the reference every bundle is checked against."""
    from runtime_py.executors.torch_executor import TorchExecutor

    tokenizer = Tokenizer(tokenizer_path)
    cfg = model.config
    if tokenizer.vocab_size > cfg.vocab_size:
        raise InputError(f"{tokenizer.path}: {tokenizer.vocab_size} pieces, more than the model's {cfg.vocab_size} ids")
    executor = TorchExecutor(model, cache_len, prefill_lengths)

    def per_layer_rows(ids):
        with torch.no_grad():
            return model.per_layer_embedding(torch.as_tensor(ids)[None])[0].numpy()

    return Session(executor, tokenizer, per_layer_rows, cfg.bos_token_id, _stop_ids(cfg, tokenizer), cfg.vocab_size)


def check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise InputError(f"--backend: unknown backend {backend!r} ({', '.join(BACKENDS)})")
