"""The engine: opens a bundle (or a bare PyTorch model) and hands out sessions on the chosen backend."""

from __future__ import annotations

from pathlib import Path

import torch

from models.errors import InputError
from runtime_py.components.stop import stop_ids_for
from runtime_py.components.tokenizer import Tokenizer
from runtime_py.executors import BACKENDS
from runtime_py.session import Session

DEFAULT_TOKENIZER = Path(__file__).resolve().parents[1] / "models" / "assets" / "tokenizer.model"


def session_for_model(model, tokenizer_path=DEFAULT_TOKENIZER, cache_len: int = 256,
                      prefill_lengths: tuple[int, ...] = (32,), image_sizes: tuple[int, ...] | None = None) -> Session:
    """A torch-backend session straight over a TextDecoder or a whole Gemma3n (no bundle): the reference every bundle
    is checked against. A Gemma3n's session takes images and audio (its float encoders; image_sizes: the sizes it
    accepts, first the default)."""
    from models.multimodal import Gemma3n
    from runtime_py.components.media import MediaTokenRows
    from runtime_py.executors.encoders import TorchEncoders
    from runtime_py.executors.torch_executor import TorchExecutor

    whole = model if isinstance(model, Gemma3n) else None
    decoder = whole.language_model if whole is not None else model
    tokenizer = Tokenizer(tokenizer_path)
    cfg = decoder.config
    if tokenizer.vocab_size > cfg.vocab_size:
        raise InputError(f"{tokenizer.path}: {tokenizer.vocab_size} pieces, more than the model's {cfg.vocab_size} ids")
    executor = TorchExecutor(decoder, cache_len, prefill_lengths)

    def per_layer_rows(ids):
        with torch.no_grad():
            return decoder.per_layer_embedding(torch.as_tensor(ids)[None])[0].numpy()

    session = Session(executor, tokenizer, per_layer_rows, cfg.bos_token_id, stop_ids_for(cfg.eos_token_ids, tokenizer),
                      cfg.vocab_size, ple_vocab_size=cfg.vocab_size_per_layer_input)
    if whole is not None:
        whole.float().eval()
        session.encoders = TorchEncoders(whole, *([image_sizes] if image_sizes else []))
        session.media_rows, session.media_tokens = MediaTokenRows.from_model(whole), whole.config.tokens
    return session


def check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise InputError(f"--backend: unknown backend {backend!r} ({', '.join(BACKENDS)})")


# Which bundle target each backend runs.
BACKEND_TARGETS = {"torch": None, "litert": "android", "litertlm": "android", "executorch": "executorch",
                   "coreml": "ios"}


def open_bundle(path: str | Path, backend: str = "torch", threads: int = 2):
    """Verifies the bundle (every file's size and sha256), then returns a session on `backend`. The torch backend
    runs the float reference checkpoint beside the bundle (../reference), checked against the manifest too."""
    from runtime_py.manifest import verify_bundle

    check_backend(backend)
    path = Path(path)
    manifest = verify_bundle(path)
    needed = BACKEND_TARGETS[backend]
    if needed is not None and manifest["target"] != needed:
        raise InputError(f"--backend {backend} runs {needed} bundles; {path} is a {manifest['target']} bundle")
    spec = manifest["export_spec"]
    cache_len, prefill_lengths = spec["cache_len"], tuple(spec["prefill_lengths"])
    tokenizer = Tokenizer(path / manifest["tokenizer"]["file"])
    stop_ids, bos_id = manifest["tokenizer"]["stop_ids"], manifest["tokenizer"]["bos_id"]
    vocab_size = manifest["model"]["config"]["vocab_size"]
    encoders = manifest.get("encoders") or {}  # absent from text-only bundles
    if backend == "torch":
        model = reference_model(path, manifest, whole=bool(encoders))
        session = session_for_model(model, tokenizer.path, cache_len, prefill_lengths,
                                    tuple(encoders.get("image_sizes", ())) or None)
        session.stop_ids, session.source = stop_ids, str(path)
        return session
    if backend == "litertlm":  # Google's engine tokenizes, samples and stops by itself
        from runtime_py.executors.litert_executor import LitertLmSession

        return LitertLmSession(path / "model.litertlm", cache_len, threads)
    from runtime_py.executors import load_executor

    executor, per_layer_rows = load_executor(backend, path, manifest, threads)
    session = Session(executor, tokenizer, per_layer_rows, bos_id, stop_ids, vocab_size,
                      ple_vocab_size=manifest["model"]["config"].get("vocab_size_per_layer_input"), source=str(path))
    if encoders:
        from models.multimodal import MediaTokens
        from runtime_py.components.media import MediaTokenRows
        from runtime_py.executors.encoders import load_encoders

        session.encoders = load_encoders(backend, path, manifest, threads)
        session.media_rows = MediaTokenRows.from_file(path / encoders["media_token_embeddings"]["file"])
        session.media_tokens = MediaTokens(**encoders["media_tokens"])
    return session


def reference_model(bundle: Path, manifest: dict, whole: bool = False):
    """The bundle's float reference checkpoint (../reference), checked against the manifest: its text decoder, or
    with whole=True the whole Gemma3n (a text-only checkpoint still gives a TextDecoder)."""
    from models.checkpoint import load_pretrained, load_text_decoder
    from runtime_py.manifest import sha256_of

    ref = (bundle / manifest["reference"]["path"]).resolve()
    for entry in manifest["reference"]["files"]:
        file = ref / entry["path"]
        if not file.is_file() or file.stat().st_size != entry["size"] or sha256_of(file) != entry["sha256"]:
            raise InputError(f"{file}: the torch backend's reference checkpoint is missing or differs from the manifest")
    return (load_pretrained if whole else load_text_decoder)(ref, dtype=torch.float32)
