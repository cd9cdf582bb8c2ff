"""Bundles: one self-contained folder per target, ready to copy into an app, each with its manifest.json.

    out/android/      model.litertlm (decoder, embedders, PLE section, tokenizer, metadata), tokenizer.model,
                      chat_template.jinja
    out/ios/          model.mlpackage, per_layer_embeddings.safetensors, embeddings.safetensors, tokenizer.model,
                      chat_template.jinja
    out/executorch/   model.pte, the .ptd holding the PLE table, tokenizer.model, chat_template.jinja
    out/reference/    the float checkpoint (Hugging Face layout) and tokenizer: what the torch backend runs and every
                      target is compared with; not meant for apps

Every target folder also holds golden.safetensors (a fixed chat prompt's token ids, the float model's prefill and
decode logits and greedy tokens) for checks on devices. Nothing time- or path-dependent goes into a bundle, so the
same inputs build byte-identical bundles and zips.
"""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from exporters import export
from exporters.spec import ExportSpec
from models.accounting import count_config
from models.checkpoint import save_pretrained
from models.errors import InputError
from models.fileio import atomic_directory
from models.generate import prefill_and_decode
from models.text import TextDecoder
from runtime_py.components.chat_template import JINJA, render
from runtime_py.components.stop import stop_ids_for
from runtime_py.components.tokenizer import Tokenizer
from runtime_py.manifest import MANIFEST, SCHEMA_VERSION, file_entries

TARGETS = {"android": "litert", "ios": "coreml", "executorch": "executorch"}
# `--quant` levels and the scheme each target uses for them.
QUANT_LEVELS = {
    "none": {"litert": "none", "executorch": "none", "coreml": "none"},
    # ExecuTorch 1.5 cannot lower torchao's int8 weight-only linears (no kernel for dequantize_affine): 8da8w instead.
    "int8": {"litert": "int8-weight-only", "executorch": "8da8w", "coreml": "int8-per-channel"},
    "int4": {"litert": "int4-blockwise", "executorch": "8da4w", "coreml": "int4-per-block"},
}
GOLDEN_PROMPT = "Write a short story about a robot who learns to cook."
GOLDEN_STEPS = 8


def golden_vectors(model: TextDecoder, tokenizer: Tokenizer) -> tuple[dict, dict[str, torch.Tensor]]:
    ids = [model.config.bos_token_id] + tokenizer.encode(render([{"role": "user", "content": GOLDEN_PROMPT}]))
    prompt = torch.tensor([ids])
    prefill, steps, tokens = prefill_and_decode(model, prompt, GOLDEN_STEPS, cache_len=len(ids) + GOLDEN_STEPS)
    tensors = {
        "prompt_ids": prompt[0],
        "prefill_logits": prefill[0, -1].contiguous(),
        "decode_logits": torch.cat(steps).contiguous(),
        "greedy_tokens": torch.tensor(tokens),
    }
    summary = {"file": "golden.safetensors", "prompt": GOLDEN_PROMPT, "prompt_ids": ids, "greedy_tokens": tokens,
               "decode_steps": GOLDEN_STEPS, "dtype": "float32"}
    return summary, tensors


def _token_embeddings(model: TextDecoder) -> dict[str, torch.Tensor]:
    """The token-embedding table for apps whose graph takes embeddings (Core ML), already scaled by sqrt(H)."""
    return {"weight": (model.embed_tokens.weight.detach().float() * model.embed_scale).half().contiguous()}


def _write_target(target: str, folder: Path, model: TextDecoder, spec: ExportSpec, tokenizer: Tokenizer) -> None:
    if target == "android":
        from exporters.litert import DECODER_FILE, EMBEDDER_FILE, PER_LAYER_EMBEDDER_FILE

        export(model, spec, folder, tokenizer_path=tokenizer.path)  # creates `folder` atomically
        for name in (DECODER_FILE, EMBEDDER_FILE, PER_LAYER_EMBEDDER_FILE):  # all three are inside the .litertlm
            (folder / name).unlink()
    else:
        export(model, spec, folder)
    (folder / "export.json").unlink()  # its content moves into the manifest
    if target == "ios":
        save_file(_token_embeddings(model), folder / "embeddings.safetensors", metadata={"scaled": "sqrt(hidden)"})
    # Android apps read the tokenizer inside the .litertlm; the copy serves host-side runtimes.
    shutil.copyfile(tokenizer.path, folder / tokenizer.path.name)
    (folder / "chat_template.jinja").write_text(JINJA)


def build_bundles(
    model: TextDecoder,
    out: str | Path,
    targets: list[str],
    quant: str = "none",
    tokenizer_path: str | Path | None = None,
    cache_len: int = 256,
    prefill_lengths: tuple[int, ...] = (32,),
    source: dict | None = None,
    make_zip: bool = False,
    progress=lambda message: None,
) -> Path:
    from runtime_py.engine import DEFAULT_TOKENIZER

    unknown = [t for t in targets if t not in TARGETS]
    if unknown or not targets:
        raise InputError(f"--targets: unknown target {unknown[0] if unknown else '(none)'} ({', '.join(TARGETS)})")
    if quant not in QUANT_LEVELS:
        raise InputError(f"--quant: {quant!r} is not one of {', '.join(QUANT_LEVELS)}")
    tokenizer = Tokenizer(tokenizer_path or DEFAULT_TOKENIZER)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise InputError(f"{tokenizer.path}: {tokenizer.vocab_size} pieces, more than the model's {model.config.vocab_size}")
    model = model.float().eval()
    golden, golden_tensors = golden_vectors(model, tokenizer)
    cfg = model.config
    with atomic_directory(out) as tmp:
        progress("reference checkpoint")
        save_pretrained(model, tmp / "reference")
        shutil.copyfile(tokenizer.path, tmp / "reference" / tokenizer.path.name)
        for target in targets:
            backend_target = TARGETS[target]
            spec = ExportSpec(target=backend_target, cache_len=cache_len, prefill_lengths=tuple(prefill_lengths),
                              quant=QUANT_LEVELS[quant][backend_target])
            progress(f"{target}: lowering to {backend_target} ({spec.quant})")
            folder = tmp / target
            _write_target(target, folder, model, spec, tokenizer)
            save_file(golden_tensors, folder / golden["file"])
            manifest = {
                "schema_version": SCHEMA_VERSION,
                "target": target,
                "runtime": backend_target,
                "model": {
                    "architecture": "gemma3n",
                    "config": cfg.to_hf_text_dict(),
                    "parameters": count_config(cfg, multimodal=False).as_dict(),
                    "matformer_slice": (source or {}).get("matformer_slice"),
                    "source": (source or {}).get("name", "unknown"),
                },
                "quantization": {"level": quant, "scheme": spec.quant, "recipe": spec.recipe},
                "export_spec": spec.as_dict(),
                "tokenizer": {
                    "file": tokenizer.path.name,
                    "vocab_size": tokenizer.vocab_size,
                    "bos_id": cfg.bos_token_id,
                    "stop_ids": stop_ids_for(cfg.eos_token_ids, tokenizer),
                    "chat_template": "chat_template.jinja",
                },
                "golden": golden,
                "reference": {"path": "../reference", "files": file_entries(tmp / "reference", exclude=())},
                "files": file_entries(folder),
            }
            (folder / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        if make_zip:
            for target in targets:
                deterministic_zip(tmp / target, tmp / f"{target}.zip")
    return Path(out)


def deterministic_zip(folder: Path, path: Path) -> None:
    """Sorted entries, fixed timestamps and permissions: the same folder always gives the same bytes."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=6) as zf:
        for file in sorted(p for p in folder.rglob("*") if p.is_file()):
            info = zipfile.ZipInfo(f"{folder.name}/{file.relative_to(folder).as_posix()}", date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, file.read_bytes())
