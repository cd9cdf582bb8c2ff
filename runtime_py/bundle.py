"""Bundles: one self-contained folder per target, ready to copy into an app, each with its manifest.json.

    out/android/      model.litertlm (decoder, embedders, PLE section, tokenizer, metadata), tokenizer.model,
                      chat_template.jinja
    out/ios/          model.mlpackage, per_layer_embeddings.safetensors, embeddings.safetensors, tokenizer.model,
                      chat_template.jinja
    out/executorch/   model.pte, the .ptd holding the PLE table, tokenizer.model, chat_template.jinja
    out/reference/    the float checkpoint (Hugging Face layout) and tokenizer: what the torch backend runs and every
                      target is compared with; not meant for apps

Every target folder also holds golden.safetensors (a fixed chat prompt's token ids, the float model's prefill and
decode logits and greedy tokens; a whole model embeds its media-vocabulary ids with its embedders, as its runtimes
do) for checks on devices. Nothing time- or path-dependent goes into a bundle, so the
same inputs build byte-identical bundles and zips.

A whole Gemma 3n (the default model, or a Gemma3nForConditionalGeneration checkpoint) also brings its vision and audio
encoders, lowered where each target keeps them (the .litertlm's sections, methods of the .pte, vision_encoder and
audio_encoder .mlpackages), plus in every target folder:
    golden_media.safetensors   a fixed image and audio clip, the encoders' exact inputs, the float embeddings
    media_tokens.safetensors   the embedders' hard-token rows (every id of the vision and audio vocabularies)
and the manifest's `encoders` entry (sizes, shapes, media token ids, quantization). Its reference/ checkpoint is the
whole model.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import time
import zipfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from contract.bundle import (
    CHAT_TEMPLATE_FILE,
    GOLDEN_FILE,
    GOLDEN_MEDIA_FILE,
    MANIFEST,
    MEDIA_TOKENS_FILE,
    REFERENCE_DIR,
    SCHEMA_VERSION,
    TARGET_RUNTIMES,
    file_entries,
)
from exporters import export
from exporters.spec import EXPORT_RECORD, ExportSpec
from exporters.weights import release_checkpoint_pages
from models.accounting import count_checkpoint, count_config
from models.checkpoint import save_pretrained
from models.errors import InputError
from models.fileio import atomic_directory, check_new_directory
from models.float32 import float32_reference
from models.generate import prefill_and_decode, prefill_and_decode_embeddings
from models.multimodal import Gemma3n
from models.text import TextDecoder
from runtime_py.components.chat_template import JINJA, render
from runtime_py.components.stop import stop_ids_for
from runtime_py.components.tokenizer import Tokenizer

TARGETS = TARGET_RUNTIMES  # bundle target -> exporter target
# `--quant` levels and the scheme each target uses for them.
QUANT_LEVELS = {
    "none": {"litert": "none", "executorch": "none", "coreml": "none"},
    # ExecuTorch 1.5 cannot lower torchao's int8 weight-only linears (no kernel for dequantize_affine): 8da8w instead.
    # LiteRT: the dynamic recipe. Google's engine evaluates the weight-only recipe's DEQUANTIZE ops once into float32
    # copies: the E2B text decoder ran float32 (23,455 MiB resident, 6.9 tok/s prefill, README "Real scale").
    "int8": {"litert": "int8-dynamic", "executorch": "8da8w", "coreml": "int8-per-channel"},
    "int4": {"litert": "int4-blockwise", "executorch": "8da4w", "coreml": "int4-per-block"},
}
# The encoders take int8 weights at most (MobileNet-V5 is a convnet): every level above none gives them the
# target's int8 scheme (exporters.spec.ENCODER_QUANT_SCHEMES). ExecuTorch: 8da8w, which XNNPACK runs; its
# int8-weight-only convolutions fall back to the portable kernel.
ENCODER_QUANT_LEVELS = {
    "none": {"litert": "none", "executorch": "none", "coreml": "none"},
    "int8": {"litert": "int8-weight-only", "executorch": "8da8w", "coreml": "int8-per-channel"},
    "int4": {"litert": "int8-weight-only", "executorch": "8da8w", "coreml": "int8-per-channel"},
}
# The PLE table's storage at each level: int8 up to the int8 level; int4 at int4, where an int8 table would be half
# of E2B's bundle (2.0 of 3.9 GB for the text alone; Google's int4 E2B .litertlm is 3.66 GB with both encoders).
PLE_LEVELS = {"none": "int8", "int8": "int8", "int4": "int4"}
TEXT_CACHE_LEN = 256
# A prompt with one image (258 tokens and the newlines around them) and one 30 s audio window (190) needs ~460
# positions before any text: multimodal bundles default to 1024, or the model's maximum if smaller (the tiny model:
# 512, which leaves ~50 positions for text and the answer).
MULTIMODAL_CACHE_LEN = 1024
GOLDEN_PROMPT = "Write a short story about a robot who learns to cook."
GOLDEN_STEPS = 8


def golden_vectors(model: TextDecoder | Gemma3n, tokenizer: Tokenizer) -> tuple[dict, dict[str, torch.Tensor]]:
    lm = model.language_model if isinstance(model, Gemma3n) else model
    ids = [lm.config.bos_token_id] + tokenizer.encode(render([{"role": "user", "content": GOLDEN_PROMPT}]))
    prompt, cache_len = torch.tensor([ids]), len(ids) + GOLDEN_STEPS
    if isinstance(model, Gemma3n):
        # A whole model embeds the ids of its media vocabularies with its embedders in text prompts too, as
        # transformers' Gemma3nForConditionalGeneration and the .litertlm's embedder (so Google's engine) do.
        with torch.no_grad():
            embeds, rows = model.embed_prompt(prompt)
        prefill, steps, tokens = prefill_and_decode_embeddings(lm, embeds, rows, GOLDEN_STEPS, cache_len,
                                                               embed=model.embed_prompt)
    else:
        prefill, steps, tokens = prefill_and_decode(lm, prompt, GOLDEN_STEPS, cache_len=cache_len)
    tensors = {
        "prompt_ids": prompt[0],
        "prefill_logits": prefill[0, -1].contiguous(),
        "decode_logits": torch.cat(steps).contiguous(),
        "greedy_tokens": torch.tensor(tokens),
    }
    summary = {"file": GOLDEN_FILE, "prompt": GOLDEN_PROMPT, "prompt_ids": ids, "greedy_tokens": tokens,
               "decode_steps": GOLDEN_STEPS, "dtype": "float32"}
    return summary, tensors


def checkpoint_config(model: Gemma3n) -> dict:
    """The config.json that save_pretrained writes for a whole model: the one it was loaded with, or for the embedded
    default (built in code) the transformers config it corresponds to, so that reference/ loads back the same model."""
    if getattr(model, "hf_config", None):
        return model.hf_config
    from models.checkpoint import CONDITIONAL_GENERATION
    from models.default import tiny_gemma3n_config
    from models.hf_reference import hf_config

    if model.config != tiny_gemma3n_config():
        raise InputError("a whole Gemma3n built in code needs its config.json as `hf_config` to be bundled")
    return hf_config(model.config.text, CONDITIONAL_GENERATION).to_dict()


def default_cache_len(model: TextDecoder | Gemma3n) -> int:
    if isinstance(model, Gemma3n):
        return min(MULTIMODAL_CACHE_LEN, model.config.text.max_position_embeddings)
    return TEXT_CACHE_LEN


def _write_target(target: str, folder: Path, model: TextDecoder | Gemma3n, spec: ExportSpec,
                  tokenizer: Tokenizer) -> None:
    if target == "android":
        export(model, spec, folder, tokenizer_path=tokenizer.path)  # creates `folder` atomically
        for tflite in folder.glob("*.tflite"):  # decoder, embedders and encoders are all sections of the .litertlm
            tflite.unlink()
    else:
        export(model, spec, folder)
    (folder / EXPORT_RECORD).unlink()  # its content moves into the manifest
    # Android apps read the tokenizer inside the .litertlm; the copy serves host-side runtimes.
    shutil.copyfile(tokenizer.path, folder / tokenizer.path.name)
    (folder / CHAT_TEMPLATE_FILE).write_text(JINJA)


def _encoders_entry(model: Gemma3n, spec: ExportSpec, golden_media: dict[str, torch.Tensor]) -> dict:
    """The manifest's account of the encoders: what each takes and gives, the media ids, the golden media."""
    from dataclasses import asdict

    from contract.bundle import AUDIO_WINDOW_FRAMES, AUDIO_WINDOW_SAMPLES
    from models.audio import SAMPLE_RATE

    h, tokens = model.config.text.hidden_size, model.config.tokens
    return {
        "components": list(spec.encoders),
        "image_sizes": list(spec.image_sizes),
        "quantization": {"scheme": spec.encoder_quant, "recipe": spec.encoder_recipe},
        "vision": {
            "inputs": {f"pixel_values_{s}": [1, 3, s, s] for s in spec.image_sizes},
            "output": {"image_embeddings": [1, tokens.image_soft_tokens, h]},
            "pixel_values": "RGB float32 in [0, 1], resized (bilinear, antialiased) to S x S",
        },
        "audio": {
            "inputs": {"features": [1, AUDIO_WINDOW_FRAMES, 128], "padding_mask": [1, AUDIO_WINDOW_FRAMES]},
            "output": {"audio_embeddings": [1, tokens.audio_soft_tokens, h]},
            "window": {"seconds": AUDIO_WINDOW_SAMPLES / SAMPLE_RATE, "sample_rate": SAMPLE_RATE,
                       "features": "log-mel (Gemma3nAudioFeatureExtractor), padding_mask float32 1.0 = padded"},
        },
        "media_tokens": asdict(tokens),
        "media_token_embeddings": {
            "file": MEDIA_TOKENS_FILE,
            "vision": {"first_id": model.embed_vision.vocab_offset, "rows": model.embed_vision.vocab_size},
            "audio": {"first_id": model.embed_audio.vocab_offset, "rows": model.embed_audio.vocab_size},
        },
        "golden_media": {
            "file": GOLDEN_MEDIA_FILE,
            "image": "models.encoders.golden_image(): 600x400 RGB uint8",
            "audio": f"models.encoders.golden_audio(): {golden_media['audio_waveform'].numel()} samples at "
                     f"{SAMPLE_RATE} Hz",
            "tensors": {k: list(v.shape) for k, v in sorted(golden_media.items())},
        },
    }


def build_bundles(
    model: TextDecoder | Gemma3n,
    out: str | Path,
    targets: list[str],
    quant: str = "none",
    tokenizer_path: str | Path | None = None,
    cache_len: int | None = None,
    prefill_lengths: tuple[int, ...] = (32,),
    source: dict | None = None,
    make_zip: bool = False,
    progress=lambda message: None,
    image_sizes: tuple[int, ...] = (768,),
    jobs: int = 1,
    log: Path | None = None,
    sign: Path | None = None,
) -> Path:
    """model: a TextDecoder (text-only bundles) or a whole Gemma3n (the encoders too, at `image_sizes`).
    cache_len: by default TEXT_CACHE_LEN, or for a whole model MULTIMODAL_CACHE_LEN capped at its maximum positions.
    jobs: targets lowered at once, each in a process of its own (see lower_targets). log: where the converters'
    output goes (appended); None leaves it on this process's stdout and stderr. progress: one call per step.
    sign: a private key (PEM) that signs each target folder (contract.signing) before the bundle is complete."""
    from models.encoders import golden_media, media_token_embeddings
    from runtime_py.components.tokenizer import DEFAULT_TOKENIZER

    unknown = [t for t in targets if t not in TARGETS]
    if unknown or not targets:
        raise InputError(f"--targets: unknown target {unknown[0] if unknown else '(none)'} ({', '.join(TARGETS)})")
    if quant not in QUANT_LEVELS:
        raise InputError(f"--quant: {quant!r} is not one of {', '.join(QUANT_LEVELS)}")
    check_new_directory(out)
    if sign is not None:  # refused now, not after minutes of lowering
        from contract.signing import check_private_key, signing_tool

        check_private_key(sign, "--sign"), signing_tool()
    # The model stays in its dtype (a bf16 E2B is 22 GB in float32); the golden outputs come from a float32
    # reference of it, and each lowering casts its own parts.
    model = model.eval()
    whole = model if isinstance(model, Gemma3n) else None
    if whole is not None:
        whole.hf_config = checkpoint_config(whole)
    decoder = whole.language_model if whole is not None else model
    cache_len = default_cache_len(model) if cache_len is None else cache_len
    tokenizer = Tokenizer(tokenizer_path or DEFAULT_TOKENIZER)
    if tokenizer.vocab_size > decoder.config.vocab_size:
        raise InputError(f"{tokenizer.path}: {tokenizer.vocab_size} pieces, more than the model's "
                         f"{decoder.config.vocab_size}")
    components = ("decoder", "vision", "audio") if whole is not None else ("decoder",)
    stop_ids = stop_ids_for(decoder.config.eos_token_ids, tokenizer)
    # Every spec is checked (sizes, lengths) before minutes of golden vectors and lowering.
    specs = {target: ExportSpec(target=TARGETS[target], cache_len=cache_len, prefill_lengths=tuple(prefill_lengths),
                                quant=QUANT_LEVELS[quant][TARGETS[target]], ple_storage=PLE_LEVELS[quant],
                                components=components,
                                image_sizes=tuple(image_sizes),
                                encoder_quant=ENCODER_QUANT_LEVELS[quant][TARGETS[target]] if whole else "none",
                                extra={"stop_ids": stop_ids})
             for target in targets}
    progress("golden vectors and media (the float model)")
    reference = float32_reference(model)
    golden, golden_tensors = golden_vectors(reference, tokenizer)
    media_tensors = golden_media(reference, tuple(image_sizes)) if whole is not None else None
    del reference  # 6.4 GB at E2B, not kept beside the lowerings
    cfg = decoder.config
    with atomic_directory(out) as tmp:
        progress("reference checkpoint")
        save_pretrained(model, tmp / REFERENCE_DIR)
        release_checkpoint_pages(model)  # read for the golden outputs and the copy; the lowerings load their own
        shutil.copyfile(tokenizer.path, tmp / REFERENCE_DIR / tokenizer.path.name)
        parameters = (count_checkpoint(tmp / REFERENCE_DIR) if whole is not None
                      else count_config(cfg, multimodal=False)).as_dict()
        lower_targets(model, tmp, specs, tokenizer, jobs, log, progress)
        for target in targets:
            backend_target, spec = TARGETS[target], specs[target]
            folder = tmp / target
            save_file(golden_tensors, folder / golden["file"])
            manifest = {
                "schema_version": SCHEMA_VERSION,
                "target": target,
                "runtime": backend_target,
                "model": {
                    "architecture": "gemma3n",
                    "config": cfg.to_hf_text_dict(),
                    "parameters": parameters,
                    "matformer_slice": (source or {}).get("matformer_slice"),
                    "source": (source or {}).get("name", "unknown"),
                },
                "quantization": {"level": quant, "scheme": spec.quant, "recipe": spec.recipe},
                "export_spec": spec.as_dict(),
                "tokenizer": {
                    "file": tokenizer.path.name,
                    "vocab_size": tokenizer.vocab_size,
                    "bos_id": cfg.bos_token_id,
                    "stop_ids": stop_ids,
                    "chat_template": CHAT_TEMPLATE_FILE,
                },
                "golden": golden,
                "reference": {"path": f"../{REFERENCE_DIR}", "files": file_entries(tmp / REFERENCE_DIR, exclude=())},
            }
            if whole is not None:
                save_file(media_tensors, folder / GOLDEN_MEDIA_FILE)
                save_file(media_token_embeddings(whole), folder / MEDIA_TOKENS_FILE)
                manifest["encoders"] = _encoders_entry(whole, spec, media_tensors)
            manifest["files"] = file_entries(folder)
            (folder / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
            if sign is not None:
                from contract.signing import sign_bundle

                progress(f"signing {target}")
                sign_bundle(folder, sign)
        if make_zip:
            for target in targets:
                deterministic_zip(tmp / target, tmp / f"{target}.zip")
    return Path(out)


# Lowering cost, most first: the longest lowering starts first when targets are lowered in parallel.
_LOWERING_ORDER = ("executorch", "ios", "android")


def lower_targets(model: TextDecoder | Gemma3n, tmp: Path, specs: dict[str, ExportSpec], tokenizer: Tokenizer,
                  jobs: int, log: Path | None, progress) -> None:
    """Writes tmp/<target> for every spec, each lowered in a fresh spawned process that reloads the float model from
    tmp/reference (written first; bit-exact), `jobs` of them at once.

    A fresh process per target makes a target's bytes independent of what ran before it: litert-torch and
    ExecuTorch name tensors from process-wide counters, so a second conversion in one process writes other names
    (and another size) than the first. And conversion is mostly single-threaded Python, so on 2 cores two lowerings
    at once take about the time of one: the three targets take about ExecuTorch's time alone. Each process needs
    the memory of its own conversion and the model, so the caller chooses jobs (the CLI: 1 for models of a billion
    parameters or more)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    order = sorted(specs, key=_LOWERING_ORDER.index)
    whole = isinstance(model, Gemma3n)
    workers = max(1, min(jobs, len(order)))
    threads = max(1, (os.cpu_count() or 1) // workers)
    started = time.monotonic()
    # spawn, not fork: a forked child of a process whose torch thread pools already ran can deadlock.
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), max_tasks_per_child=1,
                             initializer=_log_to, initargs=(log,)) as pool:
        futures = {}
        try:
            for target in order:
                spec = specs[target]
                encoders = f", encoders {spec.encoder_quant}" if spec.encoders else ""
                progress(f"{target}: lowering to {spec.target} ({spec.quant}{encoders}) queued")
                futures[pool.submit(_lower_from_reference, target, tmp, whole, spec, tokenizer.path, log,
                                    threads)] = target
            for future in as_completed(futures):
                future.result()
                progress(f"{futures[future]}: lowered ({time.monotonic() - started:.0f} s since the first began)")
        except BaseException:
            # A failed target, Ctrl-C or SIGTERM: the other lowerings are stopped, not waited for (minutes) by the
            # pool's exit. The pool has no public way to stop running work.
            for process in list(getattr(pool, "_processes", {}).values()):
                process.terminate()
            pool.shutdown(wait=True, cancel_futures=True)
            raise


def _lower_from_reference(target: str, tmp: Path, whole: bool, spec: ExportSpec, tokenizer_path: Path,
                          log: Path | None, threads: int) -> None:
    """One target's lowering in a worker process (its output already goes to the log: _log_to), from the checkpoint
    that build_bundles wrote first, loaded in its own dtype (the exporters cast a part at a time)."""
    torch.set_num_threads(threads)
    from models.checkpoint import load_pretrained, load_text_decoder

    model = (load_pretrained if whole else load_text_decoder)(tmp / REFERENCE_DIR)
    _write_target(target, tmp / target, model.eval(), spec, Tokenizer(tokenizer_path))


def _log_to(log: Path | None) -> None:
    """A lowering worker's stdout and stderr, from its start (the converters' import-time warnings included),
    appended to `log` at the file-descriptor level; None leaves them where they go."""
    if log is not None:
        with open(log, "ab") as f:
            os.dup2(f.fileno(), 1)
            os.dup2(f.fileno(), 2)


@contextlib.contextmanager
def output_to(log: Path | None):
    """_log_to for a while, in this process: the converters' output (C++ and absl logs, litert-torch's progress tree,
    warnings) goes to `log` until the block ends. Yields a text stream on the terminal's stderr, for the caller's
    own progress lines."""
    if log is None:
        yield sys.stderr
        return
    sys.stdout.flush()
    sys.stderr.flush()
    log.parent.mkdir(parents=True, exist_ok=True)
    saved = os.dup(1), os.dup(2)
    terminal = os.fdopen(os.dup(saved[1]), "w", buffering=1)
    try:
        _log_to(log)
        yield terminal
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)
        terminal.close()


def deterministic_zip(folder: Path, path: Path) -> None:
    """Sorted entries, fixed timestamps and permissions: the same folder always gives the same bytes."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=6) as zf:
        for file in sorted(p for p in folder.rglob("*") if p.is_file()):
            info = zipfile.ZipInfo(f"{folder.name}/{file.relative_to(folder).as_posix()}", date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, file.read_bytes())
