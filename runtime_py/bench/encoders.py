"""The encoder rows: the vision encoder's images/s at 256, 512 and 768 px and the audio encoder's real-time factor on
each Linux backend, float and int8, against the eager references on the same weights (timm's `mobilenetv5_300m_enc`,
transformers' `Gemma3nAudioEncoder`), all timed in one run and interleaved.

Models. The published-size encoders (MobileNet-V5 300M at channel multiplier 1.0, 294M parameters; the 12-layer
1536-wide audio conformer, 681M) with embedders into E2B's text width (2048), every parameter random; the text decoder
beside them is a toy (the exporters always lower one), which no timing includes. tiny: the default model's encoders.

What is timed, per call (batch 1):
    timm eager          timm's forward_features (what transformers' vision tower runs): the tower alone
    transformers eager  Gemma3nAudioEncoder on one 30 s window of log-mel features: the encoder alone
    torch eager         our encoder alone (models.vision.MobileNetV5 / models.audio.AudioEncoder), like for like with
                        the references, and our whole embedder (encoder plus the adapter into the text width)
    litert, executorch  the exported embedder run by the runtime's encoder runner, float or int8 weights (the
                        encoders' int8 scheme of each target: ExportSpec.encoder_quant)
Speed-up = the reference's time / the backend's time on the same input. An exported backend's ratio includes its
adapter, which the reference does not run: the torch rows show what the adapter costs. Each output is checked against
our float embedder (cosine), so that a fast wrong graph cannot pass as a speed-up.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

from runtime_py.bench.measure import interleaved

WINDOW_S = 30.0
EXPORTED = ("litert", "executorch")
# The encoders' int8 scheme per target (ExportSpec.encoder_quant): int8 weights, activations quantized on the fly.
INT8 = {"litert": "int8-dynamic", "executorch": "8da8w"}


# --- the models ----------------------------------------------------------------------------------------------------


def bench_model(tiny: bool, seed: int = 0):
    """A whole Gemma3n with every parameter random: the default model's (--tiny), or the published-size encoders
    with embedders into E2B's width (2048) beside a toy text decoder of that width."""
    from models.audio import AudioConfig
    from models.config import TINY
    from models.default import default_gemma3n
    from models.hf_reference import media_token_ids
    from models.multimodal import EmbedderConfig, Gemma3n, Gemma3nConfig, MediaTokens
    from models.random_init import randomise_
    from models.vision import VisionConfig

    if tiny:
        return default_gemma3n()
    text = replace(TINY, hidden_size=2048)
    ids = media_token_ids(text)
    audio = AudioConfig(vocab_size=ids["media_vocab_size"], vocab_offset=ids["audio_vocab_offset"])
    cfg = Gemma3nConfig(
        text=text, vision=VisionConfig(), audio=audio,
        vision_embedder=EmbedderConfig(2048, ids["vision_vocab_offset"], ids["media_vocab_size"]),
        audio_embedder=EmbedderConfig(audio.hidden_size, ids["audio_vocab_offset"], ids["media_vocab_size"]),
        tokens=MediaTokens(boi=ids["boi_token_id"], image=ids["image_token_id"], eoi=ids["eoi_token_id"],
                           boa=ids["boa_token_id"], audio=ids["audio_token_id"], eoa=ids["eoa_token_id"]))
    model = Gemma3n(cfg)
    randomise_(model, seed)
    return model.eval()


def timm_tower(model):
    """timm's mobilenetv5_300m_enc at the model's channel multiplier, holding our tower's weights (strict: the keys
    are timm's)."""
    import timm

    from models.vision import ARCHITECTURE

    reference = timm.create_model(ARCHITECTURE, pretrained=False, **model.config.vision.model_args).eval()
    reference.load_state_dict(model.vision_tower.state_dict(), strict=True)
    return reference


def transformers_audio_encoder(model):
    """transformers' Gemma3nAudioEncoder on the model's audio config, holding our encoder's weights (strict)."""
    from transformers import Gemma3nAudioConfig, Gemma3nAudioEncoder

    fields = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(model.config.audio).items()}
    reference = Gemma3nAudioEncoder(Gemma3nAudioConfig(**fields)).eval()
    reference.load_state_dict(model.audio_tower.state_dict(), strict=True)
    return reference


def exported_runner(backend: str, model, components: tuple[str, ...], sizes: tuple[int, ...], folder: Path,
                    threads: int, quant: str = "none"):
    """The model's encoders exported for `backend` (quant: "none" or "int8") and opened by the runtime's encoder
    runner for that backend; returns (runner, conversion seconds)."""
    from exporters import export
    from exporters.spec import ExportSpec
    from runtime_py.engine import DEFAULT_TOKENIZER

    # The decoder is exported (an export always has one) but not timed: its spec is the LiteRT encoder tests' (cache
    # 320, prefill 16, fp32 PLE: tests/test_export_litert_encoders.py), so that with a conversion memo the quick
    # bench's sections of the default model are all copies of theirs.
    spec = ExportSpec(target=backend, cache_len=320, prefill_lengths=(16,), ple_storage="fp32",
                      components=("decoder", *components), image_sizes=tuple(sizes),
                      encoder_quant=INT8[backend] if quant == "int8" else "none")
    shutil.rmtree(folder, ignore_errors=True)  # an earlier run's (the export writes a new folder)
    t = time.perf_counter()
    export(model, spec, folder, **({"tokenizer_path": DEFAULT_TOKENIZER} if backend == "litert" else {}))
    seconds = time.perf_counter() - t
    return encoder_runner(backend, folder, spec, threads), seconds


def encoder_runner(backend: str, folder: Path, spec, threads: int):
    """The runtime's encoder runner over an export folder (a bundle's target folder without the manifest)."""
    from contract.bundle import LITERTLM_FILE, PTD_FILE, PTE_FILE

    if backend == "litert":
        from runtime_py.executors.litert_executor import LiteRtEncoders

        return LiteRtEncoders(folder / LITERTLM_FILE, spec.components, threads)
    from runtime_py.executors.executorch_executor import ExecuTorchEncoders

    return ExecuTorchEncoders(folder / PTE_FILE, folder / PTD_FILE, spec.components, spec.image_sizes)


def open_exported(encoders: tuple[str, ...], backends, model, sizes, work: Path, threads: int, log, failures: list,
                  quants=("none", "int8")) -> dict:
    """"backend" and "backend int8" -> encoder runner (both encoders in one export) for each exported backend asked
    for; an export or load that fails is left out, and the failure kept for the report (a published-size float
    encoder can exceed what a format holds)."""
    runners = {}
    for backend in [b for b in backends if b in EXPORTED]:
        for quant in quants:
            key = backend if quant == "none" else f"{backend} int8"
            log(f"{'+'.join(encoders)}: exporting to {key}" + (f" at {', '.join(map(str, sizes))} px"
                                                               if "vision" in encoders else ""))
            try:
                folder = work / f"{'+'.join(encoders)}-{backend}-{quant}"
                runners[key], seconds = exported_runner(backend, model, encoders, sizes, folder, threads, quant)
            except Exception as e:  # noqa: BLE001 - reported, and the other backends still timed
                message = f"{type(e).__name__}: {e}".splitlines()[0][:300]
                log(f"{key} failed: {message}")
                failures.extend({"encoder": encoder, "backend": key, "error": message} for encoder in encoders)
                continue
            log(f"{key} export took {seconds:.0f} s")
    return runners


# --- timing ----------------------------------------------------------------------------------------------------------


def _soft_tokens(features: np.ndarray) -> np.ndarray:
    """A tower's output [1, C, 16, 16] -> VisionEncoder's soft tokens [1, 256, C] (flattened, scaled by sqrt(C));
    already tokens pass through."""
    if features.ndim == 3:
        return features
    n, c = features.shape[:2]
    return features.reshape(n, c, -1).transpose(0, 2, 1) * c**0.5


def _cosine(a, b) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@torch.no_grad()
def bench_vision(model, sizes, backends, repeats, runners: dict, log) -> list[dict]:
    from models.encoders import VisionEmbedder, VisionEncoder

    reference, embedder, encoder = timm_tower(model), VisionEmbedder(model).eval(), VisionEncoder(model).eval()
    rows = []
    for size in sizes:
        pixels = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(size))
        x = pixels.numpy()
        # Towers' outputs are compared as VisionEncoder's soft tokens (flattened, scaled by sqrt(C)); the scaling is
        # outside the timed call.
        fns = {("timm eager", "tower"): lambda: reference.forward_features(pixels)}
        if "torch" in backends:
            fns[("torch eager", "tower")] = lambda: model.vision_tower(pixels)
            fns[("torch eager", "embedder")] = lambda: embedder(pixels)
        for backend, runner in runners.items():
            towers = getattr(runner, "_vision", {})  # LiteRtEncoders: the vision_encoder section per size, alone
            if size in towers:
                nhwc = np.ascontiguousarray(x.transpose(0, 2, 3, 1))  # the section's layout (LiteRT-LM's)
                fns[(backend, "tower")] = lambda t=towers[size], nhwc=nhwc: t(images=nhwc)["features"]
            fns[(backend, "embedder")] = lambda r=runner: r.image(x)
        expected = {"tower": encoder(pixels).numpy(), "embedder": embedder(pixels).numpy()}
        log(f"vision {size} px: timing {len(fns)} paths, {repeats} rounds")
        seconds, outputs = interleaved(fns, repeats)
        outputs = {key: np.asarray(out) for key, out in outputs.items()}
        cosines = {key: _cosine(expected[key[1]], _soft_tokens(out) if key[1] == "tower" else out)
                   for key, out in outputs.items()}
        ref = seconds[("timm eager", "tower")]
        for (backend, timed), s in seconds.items():
            rows.append({"encoder": "vision", "backend": backend, "timed": timed, "size": size, "seconds": s,
                         "images_per_s": 1.0 / s, "speedup_vs_reference": ref / s,
                         "cosine_vs_torch": cosines[(backend, timed)]})
            log(f"vision {size} px, {backend} ({timed}): {1.0 / s:.3g} images/s, {ref / s:.2f}x, "
                f"cosine {cosines[(backend, timed)]:.6f}")
    return rows


@torch.no_grad()
def bench_audio(model, backends, repeats, runners: dict, log) -> list[dict]:
    from models.encoders import AudioEmbedder, audio_window_inputs

    reference, embedder = transformers_audio_encoder(model), AudioEmbedder(model).eval()
    waveform = np.random.default_rng(0).standard_normal(int(WINDOW_S * 16_000)).astype(np.float32) * 0.1
    features, padding = audio_window_inputs(waveform)  # a full window: nothing padded
    f, p = torch.from_numpy(features), torch.from_numpy(padding)
    fns = {("transformers eager", "encoder"): lambda: reference(f, p > 0.5).last_hidden_state}
    if "torch" in backends:
        fns[("torch eager", "encoder")] = lambda: model.audio_tower(f, p > 0.5)[0]
        fns[("torch eager", "embedder")] = lambda: embedder(f, p)
    for backend, runner in runners.items():
        fns[(backend, "embedder")] = lambda r=runner: r.audio(features, padding)
    expected = {"encoder": model.audio_tower(f, p > 0.5)[0].numpy(), "embedder": embedder(f, p).numpy()}
    log(f"audio: timing {len(fns)} paths, {repeats} rounds")
    seconds, outputs = interleaved(fns, repeats)
    cosines = {key: _cosine(expected[key[1]], np.asarray(out)) for key, out in outputs.items()}
    ref = seconds[("transformers eager", "encoder")]
    for (backend, timed), s in seconds.items():
        log(f"audio, {backend} ({timed}): {s:.3g} s per 30 s window, {ref / s:.2f}x, "
            f"cosine {cosines[(backend, timed)]:.6f}")
    return [{"encoder": "audio", "backend": backend, "timed": timed, "window_s": WINDOW_S, "seconds": s,
             "real_time_factor": s / WINDOW_S, "speedup_vs_reference": ref / s,
             "cosine_vs_torch": cosines[(backend, timed)]} for (backend, timed), s in seconds.items()]


