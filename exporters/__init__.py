"""Lowering of the models/ definition to LiteRT, ExecuTorch and Core ML, all from one ExportSpec.

`export(model, spec, out_dir)` writes one target's files into a temporary folder beside `out_dir` and renames it at
the end, so a failure never leaves a half-written export. The PLE table goes where each target reads it: the
per_layer_embedder section of the .litertlm, the .ptd beside the .pte, and for Core ML the standalone memory-mappable
asset per_layer_embeddings.safetensors that apps read directly. export.json records the spec and every file's size.
"""

from __future__ import annotations

import json
from pathlib import Path

from exporters.provenance import shared_provenance
from exporters.spec import ExportSpec
from models.fileio import atomic_directory
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
    either, and lowers the encoders next to the decoder)."""
    from exporters.spec import split_model
    from exporters.ple import write_ple_asset

    decoder, _ = split_model(model, spec)

    with atomic_directory(out_dir) as tmp, shared_provenance():
        if spec.target == "executorch":  # it writes a folder of its own: move its files up
            _target_fn(spec.target)(model, spec, tmp / "executorch", **target_kwargs)
            for file in (tmp / "executorch").iterdir():
                file.rename(tmp / file.name)
            (tmp / "executorch").rmdir()
        else:
            _target_fn(spec.target)(model, spec, tmp, **target_kwargs)
        if spec.target == "coreml":  # LiteRT and ExecuTorch carry the table in their own files (.litertlm, .ptd)
            write_ple_asset(decoder, tmp, spec.ple_storage)
        files = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
        (tmp / "export.json").write_text(json.dumps({"spec": spec.as_dict(), "files": files}, indent=2) + "\n")
    return Path(out_dir)
