"""Lowering of the models/ definition to LiteRT, ExecuTorch and Core ML, all from one ExportSpec.

`export(model, spec, out_dir)` calls the target's `export_<target>`; each writes its files by one rule
(exporters.spec.export_folder: a temporary folder beside `out_dir`, export.json recording the spec and every file's
size, renamed at the end, so a failure never leaves a half-written export). The PLE table goes where each target
reads it: the per_layer_embedder section of the .litertlm, the .ptd beside the .pte, and for Core ML the standalone
memory-mappable asset per_layer_embeddings.safetensors that apps read directly.

Every exporter takes the model in its checkpoint's dtype (a bf16 E2B is 22 GB in float32, this machine has 24) and
casts to float32 a part at a time, each for as long as its conversion needs it (exporters.weights).
"""

from __future__ import annotations

from pathlib import Path

from exporters.spec import ExportSpec
from models.multimodal import Gemma3n
from models.text import TextDecoder


def _target_fn(target: str):
    if target == "litert":
        from exporters.litert import export_litert

        return export_litert
    if target == "executorch":
        from exporters.executorch import export_executorch

        return export_executorch
    from exporters.coreml import export_coreml

    return export_coreml


def export(model: TextDecoder | Gemma3n, spec: ExportSpec, out_dir: str | Path, **target_kwargs) -> Path:
    """model: a TextDecoder, or a whole Gemma3n when spec.components holds encoders (each target function takes
    either, and lowers the encoders next to the decoder). Returns out_dir."""
    _target_fn(spec.target)(model, spec, out_dir, **target_kwargs)
    return Path(out_dir)
