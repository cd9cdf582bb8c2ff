"""The coreml backends: the bundle's multifunction .mlpackage, prefill_<T> and decode sharing one KV-cache state; token
embeddings from embeddings.safetensors and PLE rows from per_layer_embeddings.safetensors, as an iOS app reads them;
CoreMLEncoders runs the encoder packages beside it.

Two ways to run a package's functions, behind one interface (predict with a state, make_state):
  coreml      Core ML itself, through coremltools (macOS only: coremltools cannot predict elsewhere);
  coreml-mil  the saved MIL program executed op by op in torch (runtime_py.executors.mil): the same package, on any
              platform, numerics only (fp16 storage between ops as Core ML's GPU path computes; no Core ML timing).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from contract.bundle import (
    AUDIO_ENCODER,
    AUDIO_PACKAGE,
    COREML_PACKAGE,
    DECODE,
    EMBEDDINGS_FILE,
    VISION_PACKAGE,
    prefill_name,
    vision_encoder_name,
)
from contract.ple import PleTable
from models.errors import InputError
from runtime_py.executors.base import check_image_size


def coreml_can_predict() -> bool:
    """True where coremltools can load and run packages: macOS with its native runtime binding."""
    if sys.platform != "darwin":
        return False
    try:
        import coremltools.libcoremlpython  # noqa: F401  (the Core ML runtime binding, built on macOS only)
    except ImportError:
        return False
    return True


MIL_BACKEND = "coreml-mil"


def function_loader(backend: str, compute_units: str | None = None):
    """(package, function name) -> a runnable function (predict(inputs, state=), make_state()) for `backend`: a
    coremltools MLModel (coreml), or a MilFunction of the package's program, loaded once per package (coreml-mil).
    compute_units: a coremltools ComputeUnit name (CPU_ONLY, CPU_AND_GPU, CPU_AND_NE, ALL; None: ALL), coreml only."""
    if backend == MIL_BACKEND:
        from runtime_py.executors.mil import MilPackage

        packages = {}

        def load_mil(package: Path, function: str):
            if package not in packages:
                packages[package] = MilPackage(package)
            return packages[package].function(function)

        return load_mil
    if sys.platform != "darwin":
        raise InputError(f"the coreml backend needs macOS (coremltools cannot run Core ML models on {sys.platform}); "
                         f"--backend {MIL_BACKEND} runs the same packages' MIL programs here")
    import coremltools as ct

    units = getattr(ct.ComputeUnit, compute_units or "ALL")
    return lambda package, function: ct.models.MLModel(str(package), function_name=function, compute_units=units)


class CoreMLExecutor:
    def __init__(self, bundle: Path, cache_len: int, prefill_lengths: tuple[int, ...],
                 compute_units: str | None = None, backend: str = "coreml"):
        """backend: coreml or coreml-mil (function_loader)."""
        load = function_loader(backend, compute_units)
        self.name, package = backend, Path(bundle) / COREML_PACKAGE
        self.functions = {name: load(package, name) for name in [prefill_name(t) for t in prefill_lengths] + [DECODE]}
        self.table = PleTable(Path(bundle) / EMBEDDINGS_FILE)  # the token table, in the PLE asset's format
        self.cache_len, self.prefill_lengths = cache_len, tuple(prefill_lengths)
        self.reset()

    def embed(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids).reshape(-1)
        return self.table.rows(ids).reshape(len(ids), -1)[None]

    def _run(self, function: str, embeds, rows, start: int) -> np.ndarray:
        T = embeds.shape[1]
        inputs = {"inputs_embeds": embeds.astype(np.float32), "per_layer_rows": rows.astype(np.float32),
                  "input_pos": np.arange(start, start + T, dtype=np.int32)}
        return self.functions[function].predict(inputs, state=self.state)["logits"][0, -1].astype(np.float32)

    def prefill(self, embeds, rows, start: int) -> np.ndarray:
        return self._run(prefill_name(embeds.shape[1]), embeds, rows, start)

    def decode(self, embeds, rows, pos: int) -> np.ndarray:
        return self._run(DECODE, embeds, rows, pos)

    def reset(self) -> None:
        self.state = self.functions[DECODE].make_state()  # one state, shared by every function


class CoreMLEncoders:
    """The bundle's encoder packages (exporters.coreml): vision_encoder.mlpackage, one function vision_encoder_<S> per
    image size, and audio_encoder.mlpackage. The interface of runtime_py.executors.base.EncoderRunner.

    The bundle is checked on construction (packages and functions, read from their specs: that works anywhere); a
    function is loaded on its first use, since loading compiles the package (and running Core ML needs macOS). Core
    ML picks its own threads and compute units (ALL)."""

    def __init__(self, bundle: Path, components: tuple[str, ...], image_sizes: tuple[int, ...],
                 backend: str = "coreml"):
        """components, image_sizes: what the bundle lists; each must be a package function. backend: coreml or
        coreml-mil (function_loader)."""
        self.name = backend
        self.has_vision, self.has_audio = "vision" in components, "audio" in components
        self.image_sizes = tuple(image_sizes) if self.has_vision else ()
        self.vision_package, self.audio_package = Path(bundle) / VISION_PACKAGE, Path(bundle) / AUDIO_PACKAGE
        self.vision_functions = {size: vision_encoder_name(size) for size in self.image_sizes}
        self.audio_function = AUDIO_ENCODER
        if self.has_vision:
            check_functions(self.vision_package, list(self.vision_functions.values()))
        if self.has_audio:
            check_functions(self.audio_package, [self.audio_function])
        self.loaded, self.loader = {}, None

    def run(self, package: Path, function: str, inputs: dict[str, np.ndarray], output: str) -> np.ndarray:
        if (package, function) not in self.loaded:
            if self.loader is None:
                self.loader = function_loader(self.name)
            self.loaded[package, function] = self.loader(package, function)
        return np.asarray(self.loaded[package, function].predict(inputs)[output], dtype=np.float32)

    def image(self, pixel_values: np.ndarray) -> np.ndarray:
        if not self.has_vision:
            raise InputError(f"{self.vision_package.parent}: the bundle has no vision encoder")
        size = check_image_size(pixel_values, self.image_sizes, str(self.vision_package))
        inputs = {"pixel_values": np.ascontiguousarray(pixel_values, np.float32)}
        return self.run(self.vision_package, self.vision_functions[size], inputs, "image_embeddings")

    def audio(self, features: np.ndarray, padding_mask: np.ndarray) -> np.ndarray:
        if not self.has_audio:
            raise InputError(f"{self.audio_package.parent}: the bundle has no audio encoder")
        inputs = {"features": np.ascontiguousarray(features, np.float32),
                  "padding_mask": np.ascontiguousarray(padding_mask, np.float32)}
        return self.run(self.audio_package, self.audio_function, inputs, "audio_embeddings")


def check_functions(package: Path, functions: list[str]) -> None:
    """InputError unless `package` exists and has every one of `functions` (read from its spec: no Core ML runtime
    needed)."""
    import coremltools as ct

    if not (package / "Manifest.json").is_file():
        raise InputError(f"{package}: missing (the bundle's export_spec lists this encoder)")
    found = [f.name for f in ct.utils.load_spec(str(package)).description.functions]
    missing = [f for f in functions if f not in found]
    if missing:
        raise InputError(f"{package}: has no function {', '.join(missing)} (it has {', '.join(found) or 'none'})")
