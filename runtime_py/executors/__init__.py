"""Executors and encoder runners: one per backend (interfaces in runtime_py.executors.base), made here from a
verified bundle's typed manifest (contract.bundle.BundleManifest)."""

from __future__ import annotations

from contract.bundle import (
    BACKENDS,
    LITERTLM_FILE,
    PLE_ASSET_FILE,
    PTE_FILE,
    BundleManifest,
)
from models.errors import InputError

__all__ = ["BACKENDS", "load_executor", "load_encoders"]

def load_executor(backend: str, manifest: BundleManifest, threads: int = 2, compute_units: str | None = None):
    """(executor, per_layer_rows lookup) for a verified bundle. compute_units: Core ML's (coreml only; coreml-mil
    runs the packages' MIL programs instead, on any platform)."""
    bundle, cache_len, prefill_lengths = manifest.folder, manifest.cache_len, manifest.prefill_lengths
    if backend == "litert":
        from runtime_py.executors.litert_executor import LiteRtExecutor

        executor = LiteRtExecutor(bundle / LITERTLM_FILE, cache_len, prefill_lengths, threads)
        return executor, executor.per_layer_rows
    if backend == "executorch":
        from runtime_py.executors.executorch_executor import ExecuTorchExecutor

        executor = ExecuTorchExecutor(bundle / PTE_FILE, manifest.ptd, cache_len, prefill_lengths)
        return executor, executor.per_layer_rows
    if backend in ("coreml", "coreml-mil"):
        from contract.ple import PleTable
        from runtime_py.executors.coreml_executor import CoreMLExecutor

        executor = CoreMLExecutor(bundle, cache_len, prefill_lengths, compute_units, backend)
        return executor, PleTable(bundle / PLE_ASSET_FILE).rows
    raise InputError(f"--backend {backend}: not an executor backend")


def load_encoders(backend: str, manifest: BundleManifest, threads: int = 2):
    """The encoder runner of a verified bundle for `backend` (not torch: the engine builds TorchEncoders from the
    reference model). None when the bundle has no encoders."""
    if not manifest.has_encoders:
        return None
    if backend == "litert":
        from runtime_py.executors.litert_executor import LiteRtEncoders

        return LiteRtEncoders(manifest.file(LITERTLM_FILE), manifest.components, threads)
    if backend == "executorch":
        from runtime_py.executors.executorch_executor import ExecuTorchEncoders

        return ExecuTorchEncoders(manifest.file(PTE_FILE), manifest.ptd, manifest.components, manifest.image_sizes)
    if backend in ("coreml", "coreml-mil"):
        from runtime_py.executors.coreml_executor import CoreMLEncoders

        return CoreMLEncoders(manifest.folder, manifest.components, manifest.image_sizes, backend)
    raise InputError(f"--backend {backend}: runs no encoders")
