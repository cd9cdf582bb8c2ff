"""The engine: opens a bundle (or a bare PyTorch model) and hands out sessions on the chosen backend."""

from __future__ import annotations

from pathlib import Path

import torch

from contract.bundle import BACKEND_TARGETS, BACKENDS, LITERTLM_FILE, PTE_FILE, read_bundle
from models.errors import InputError
from runtime_py.components.stop import stop_ids_for
from runtime_py.components.tokenizer import DEFAULT_TOKENIZER, Tokenizer
from runtime_py.session import Session


def session_for_model(model, tokenizer_path=DEFAULT_TOKENIZER, cache_len: int = 256,
                      prefill_lengths: tuple[int, ...] = (32,), image_sizes: tuple[int, ...] | None = None) -> Session:
    """A torch-backend session straight over a TextDecoder or a whole Gemma3n (no bundle): the reference every bundle
    is checked against. A Gemma3n's session takes images and audio (its float encoders; image_sizes: the sizes it
    accepts, first the default)."""
    from models.float32 import float32_reference
    from models.multimodal import Gemma3n
    from runtime_py.components.media import MediaTokenRows
    from runtime_py.executors.torch_executor import TorchEncoders, TorchExecutor

    model = float32_reference(model)  # a bf16 model computes in float32 a layer at a time, never copied whole
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
        session.encoders = TorchEncoders(whole, *([image_sizes] if image_sizes else []))
        session.media_rows, session.media_tokens = MediaTokenRows.from_model(whole), whole.config.tokens
    return session


def check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise InputError(f"--backend: unknown backend {backend!r} ({', '.join(BACKENDS)})")


def open_bundle(path: str | Path, backend: str = "torch", threads: int = 2, compute_units: str | None = None,
                public_key: str | Path | None = None):
    """Verifies the bundle (every file's size and sha256, the manifest's types), then returns a session on `backend`:
    a Session, or for litertlm (Google's engine tokenizes, samples and stops by itself) a LitertLmSession. The torch
    backend runs the float reference checkpoint beside the bundle (../reference), checked against the manifest too.
    The session's `manifest` is the bundle's typed manifest. compute_units: Core ML's (coreml only; default ALL).
    public_key: the bundle must be signed (contract.signing) by this key's private half, or it is refused."""
    check_backend(backend)
    manifest = read_bundle(path)
    if public_key is not None:
        from contract.signing import verify_signature

        verify_signature(manifest.folder, Path(public_key), "--require-signature")
    path = manifest.folder
    needed = BACKEND_TARGETS[backend]
    if needed is not None and manifest.target != needed:
        raise InputError(f"--backend {backend} runs {needed} bundles; {path} is a {manifest.target} bundle")
    if backend == "torch":
        model = reference_model(path, manifest.raw, whole=bool(manifest.encoders))
        session = session_for_model(model, manifest.file(manifest.tokenizer_file), manifest.cache_len,
                                    manifest.prefill_lengths, manifest.image_sizes or None)
        session.stop_ids, session.source = list(manifest.stop_ids), str(path)
    elif backend == "litertlm":
        from runtime_py.litertlm_session import LitertLmSession

        session = LitertLmSession(manifest.file(LITERTLM_FILE), manifest.cache_len, threads)
    elif backend == "executorch-runner":
        from models.multimodal import MediaTokens
        from runtime_py.executorch_runner_session import ExecuTorchRunnerSession

        tokens = MediaTokens(**manifest.encoders["media_tokens"]) if manifest.encoders else None
        session = ExecuTorchRunnerSession(manifest.file(PTE_FILE), manifest.ptd, manifest.file(manifest.tokenizer_file),
                                          manifest.bos_id, manifest.cache_len, tokens, manifest.image_sizes)
    else:
        from runtime_py.executors import load_encoders, load_executor

        executor, per_layer_rows = load_executor(backend, manifest, threads, compute_units)
        session = Session(executor, Tokenizer(manifest.file(manifest.tokenizer_file)), per_layer_rows,
                          manifest.bos_id, list(manifest.stop_ids), manifest.vocab_size,
                          ple_vocab_size=manifest.ple_vocab_size, source=str(path))
        if manifest.encoders:
            from models.multimodal import MediaTokens
            from runtime_py.components.media import MediaTokenRows

            session.encoders = load_encoders(backend, manifest, threads)
            session.media_rows = MediaTokenRows.from_file(manifest.file(manifest.encoders["media_token_embeddings"]["file"]))
            session.media_tokens = MediaTokens(**manifest.encoders["media_tokens"])
    session.manifest = manifest
    return session


def reference_model(bundle: Path, manifest: dict, whole: bool = False):
    """The bundle's reference checkpoint (../reference), checked against the manifest, computing in float32: its text
    decoder, or with whole=True the whole Gemma3n (a text-only checkpoint still gives a TextDecoder). A bf16
    checkpoint (a real-size one) stays bf16 and runs a layer at a time in float32 (models.float32.float32_reference),
    with the float32 model's outputs."""
    from contract.bundle import verify_reference
    from models.checkpoint import load_pretrained, load_text_decoder
    from models.float32 import float32_reference

    ref = verify_reference(bundle, manifest)
    return float32_reference((load_pretrained if whole else load_text_decoder)(ref))
