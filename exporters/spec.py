"""The export spec: every decision the three targets share, made once.

Each target module (litert, executorch, coreml) reads an ExportSpec; none keeps its own copy of cache length,
prefill lengths, quantization or PLE storage.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

from models.errors import InputError
from models.fileio import atomic_directory

TARGETS = ("litert", "executorch", "coreml")

# Quantization schemes by target, named for what they do. Each maps to the target's own recipe or config name.
QUANT_SCHEMES: dict[str, dict[str, str]] = {
    "litert": {
        "none": "",
        "int8-dynamic": "dynamic_wi8_afp32",  # int8 weights, activations quantized on the fly
        "int8-weight-only": "weight_only_wi8_afp32",  # int8 weights dequantized to float at run time
        # int4 weights in blocks of ExportSpec.block_size (int8 where a dim does not divide)
        "int4-blockwise": "dynamic_wi4b{block}_afp32",
    },
    "executorch": {
        "none": "",
        "8da4w": "8da4w",  # int8 dynamic activations, int4 grouped weights (torchao)
        "8da8w": "8da8w",  # int8 dynamic activations, int8 per-channel weights
        "int8-weight-only": "int8wo",
    },
    "coreml": {
        "none": "",
        "int8-per-channel": "linear_quantize_int8_per_channel",
        "int4-per-block": "linear_quantize_int4_per_block",
        "palettize-4bit": "palettize_4bit",
    },
}

# The encoders' schemes: int8 weights at most. MobileNet-V5 is a convnet whose int4 weights lose the image; every
# `--quant` level above none gives the encoders their target's int8 scheme (runtime_py.bundle.QUANT_LEVELS).
ENCODER_QUANT_SCHEMES: dict[str, dict[str, str]] = {
    "litert": {"none": "", "int8-weight-only": "weight_only_wi8_afp32", "int8-dynamic": "dynamic_wi8_afp32"},
    "executorch": {"none": "", "int8-weight-only": "int8wo", "8da8w": "8da8w"},
    "coreml": {"none": "", "int8-per-channel": "linear_quantize_int8_per_channel"},
}

# The largest int4 block of each target's grouped scheme's Linears. ExecuTorch: 128, its own Llama recipe's; at 32
# the bf16 scales XNNPACK keeps were 0.15 GB of E2B's int4 program (a scale per 32 weights), and the whole int4 E2B
# export 89.5 MB over Google's .litertlm. LiteRT: 64 (ai-edge-quantizer has recipes for 32 and 64); at 32 its fp16
# scales were 0.15 GB of E2B's int4 .litertlm, 35 MB over Google's. On a 4-layer decoder of E2B's widths scaled
# down (ci/int4_blocks.py), blocks of 64 against 32 moved the logits' mean relative error from 0.439 to 0.442.
# Core ML: 64 too; at 32 its fp16 scales were 0.15 GB of E2B's int4 ios bundle, 45 MB over Google's .litertlm.
DEFAULT_BLOCK_SIZE = {"litert": 64, "executorch": 128, "coreml": 64}
BLOCK_SIZES = {"litert": (32, 64), "executorch": None, "coreml": None}  # None: any
# The token embedding's int4 block on every target, as in ExecuTorch's Llama recipe (Linears in blocks of 128, the
# embedding in blocks of 32): its error counts more than the Linears' (same script, Linears at 128: the embedding at
# 128 too took the logits' error from 0.465 to 0.495).
EMBEDDING_BLOCK = 32

PLE_STORAGE = ("int8", "int4", "fp16", "bf16", "fp32")
COMPONENTS = ("decoder", "vision", "audio")  # the encoders need a whole Gemma3n model
IMAGE_SIZES = (256, 512, 768)


@dataclass(frozen=True)
class ExportSpec:
    """cache_len: static KV-cache length (the longest prompt plus generated tokens).
    prefill_lengths: fixed prompt-chunk lengths, one prefill signature/method/function each.
    quant: a scheme name of QUANT_SCHEMES[target]. ple_storage: how the PLE table is stored in its asset.
    kv_shared_prefill: run the KV-shared upper layers on the last prompt position only (they write no cache).
    components: what to lower ("decoder", and "vision" / "audio" for a whole Gemma3n model).
    image_sizes: the vision encoder's input sizes, one graph (signature, method or function) each; the first is the
    default. encoder_quant: a scheme of ENCODER_QUANT_SCHEMES[target] for both encoders."""

    target: str
    cache_len: int = 256
    prefill_lengths: tuple[int, ...] = (32,)
    quant: str = "none"
    ple_storage: str = "int8"
    components: tuple[str, ...] = ("decoder",)
    kv_shared_prefill: bool = True
    block_size: int | None = None  # blockwise/grouped int4 schemes' largest block; None: DEFAULT_BLOCK_SIZE
    image_sizes: tuple[int, ...] = (768,)
    encoder_quant: str = "none"
    extra: dict = field(default_factory=dict, compare=False)

    def __post_init__(self):
        if self.target not in TARGETS:
            raise InputError(f"--target: unknown target {self.target!r} ({', '.join(TARGETS)})")
        if self.block_size is None:
            object.__setattr__(self, "block_size", DEFAULT_BLOCK_SIZE[self.target])
        if BLOCK_SIZES[self.target] and self.block_size not in BLOCK_SIZES[self.target]:
            raise InputError(f"block_size: {self.target} quantizes in blocks of "
                             f"{' or '.join(map(str, BLOCK_SIZES[self.target]))}, got {self.block_size}")
        schemes = QUANT_SCHEMES[self.target]
        if self.quant not in schemes:
            raise InputError(f"--quant: {self.target} has no scheme {self.quant!r} ({', '.join(schemes)})")
        if self.ple_storage not in PLE_STORAGE:
            raise InputError(f"--ple-storage: {self.ple_storage!r} is not one of {', '.join(PLE_STORAGE)}")
        if not self.prefill_lengths or any(t < 1 for t in self.prefill_lengths):
            raise InputError("prefill lengths must be positive")
        if max(self.prefill_lengths) > self.cache_len:
            raise InputError(f"a prefill length ({max(self.prefill_lengths)}) exceeds the cache length ({self.cache_len})")
        unknown = set(self.components) - set(COMPONENTS)
        if unknown:
            raise InputError(f"unknown components {sorted(unknown)} (available: {', '.join(COMPONENTS)})")
        if "decoder" not in self.components:
            raise InputError("components: the decoder is always exported")
        if not self.image_sizes or any(s not in IMAGE_SIZES for s in self.image_sizes):
            raise InputError(f"--image-sizes: {list(self.image_sizes)}; each must be one of "
                             f"{', '.join(map(str, IMAGE_SIZES))}")
        encoder_schemes = ENCODER_QUANT_SCHEMES[self.target]
        if self.encoder_quant not in encoder_schemes:
            raise InputError(f"--encoder-quant: {self.target} has no encoder scheme {self.encoder_quant!r} "
                             f"({', '.join(encoder_schemes)})")

    @property
    def recipe(self) -> str:
        return self.recipe_in_blocks(self.block_size)

    def recipe_in_blocks(self, block: int) -> str:
        """The target's recipe name for spec.quant, a blockwise one in blocks of `block`."""
        return QUANT_SCHEMES[self.target][self.quant].format(block=block)

    @property
    def encoder_recipe(self) -> str:
        return ENCODER_QUANT_SCHEMES[self.target][self.encoder_quant]

    @property
    def encoders(self) -> tuple[str, ...]:
        return tuple(c for c in self.components if c != "decoder")

    def as_dict(self) -> dict:
        d = asdict(self)
        d.pop("extra")
        return d


def split_model(model, spec) -> tuple:
    """(text decoder, whole model or None) of a TextDecoder or Gemma3n; a spec asking for encoders needs the whole
    model."""
    from models.multimodal import Gemma3n

    if isinstance(model, Gemma3n):
        return model.language_model, model
    if spec.encoders:
        raise InputError(f"components {list(spec.encoders)}: a text-only checkpoint has no encoders "
                         "(a Gemma3nForConditionalGeneration checkpoint has)")
    return model, None


def check_target(spec: ExportSpec, target: str) -> None:
    if spec.target != target:
        raise InputError(f"--target: the {target} exporter needs a {target} spec, got {spec.target!r}")


EXPORT_RECORD = "export.json"


@contextmanager
def export_folder(out_dir: str | Path, spec: ExportSpec) -> Iterator[Path]:
    """The output rule of every target: its files are written into a temporary folder beside out_dir (which must not
    exist), export.json then records the spec and every file's size, and the folder is renamed to out_dir at the end,
    so a failure never leaves a half-written export. FX provenance is shared while converting
    (exporters.provenance)."""
    from exporters.provenance import shared_provenance

    with atomic_directory(out_dir) as tmp, shared_provenance():
        yield tmp
        files = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
        (tmp / EXPORT_RECORD).write_text(json.dumps({"spec": spec.as_dict(), "files": files}, indent=2) + "\n")
