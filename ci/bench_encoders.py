"""Encoder speed: the vision encoder's images/s at 256, 512 and 768 px and the audio encoder's real-time factor on
each Linux backend, against the eager references on the same weights (timm's `mobilenetv5_300m_enc`, transformers'
`Gemma3nAudioEncoder`), all timed in one run and interleaved so that load on the machine hits every backend alike.

    python ci/bench_encoders.py [--tiny] [--sizes 256,512,768] [--repeats 3] [--threads 2]
                                [--backends torch,litert,executorch] [--json FILE] [--plot FILE.png]

Models. By default the published-size encoders (MobileNet-V5 300M at channel multiplier 1.0, 294M parameters; the
12-layer 1536-wide audio conformer, 681M) with embedders into E2B's text width (2048), every parameter random; the
text decoder beside them is a toy (the exporters always lower one), which no timing includes. --tiny: the default
model's encoders (channel multiplier 1/16, one conformer block).

What is timed, per call (batch 1):
    timm eager          timm's forward_features (what transformers' vision tower runs): the tower alone
    transformers eager  Gemma3nAudioEncoder on one 30 s window of log-mel features: the encoder alone
    torch eager         our encoder alone (models.vision.MobileNetV5 / models.audio.AudioEncoder): like for like with
                        the references; and our whole embedder (models.encoders.VisionEmbedder / AudioEmbedder:
                        the encoder plus the adapter into the text width), which is what every exported backend runs
    litert, executorch  the exported embedder run by the runtime's encoder runner (runtime_py.executors.{litert,executorch}_executor),
                        float weights
Speed-up = the reference's time / the backend's time on the same input (> 1: faster). An exported backend's ratio
includes its adapter, which the reference does not run: the torch rows show what the adapter costs. The audio
real-time factor is compute seconds per second of audio (a 30 s window; log-mel extraction excluded). Each output is
also checked against our float embedder (cosine), so that a fast wrong graph cannot pass as a speed-up.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_kv_shared_prefill import _median_seconds  # noqa: E402

WINDOW_S = 30.0
EXPORTED = ("litert", "executorch")


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
                    threads: int):
    """The model's encoders exported for `backend` (float) and opened by the runtime's encoder runner for that
    backend; returns (runner, conversion seconds)."""
    from exporters import export
    from exporters.spec import ExportSpec
    from runtime_py.engine import DEFAULT_TOKENIZER

    spec = ExportSpec(target=backend, cache_len=64, prefill_lengths=(16,), components=("decoder", *components),
                      image_sizes=tuple(sizes))
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


def open_exported(encoder: str, backends, model, sizes, work: Path, threads: int, log, failures: list) -> dict:
    """backend -> encoder runner for each exported backend asked for; a backend whose export or load fails is left
    out, and the failure kept for the report (a published-size float encoder can exceed what a format holds)."""
    runners = {}
    for backend in backends:
        if backend not in EXPORTED:
            continue
        log(f"{encoder}: exporting to {backend}" + (f" at {', '.join(map(str, sizes))} px" if encoder == "vision" else ""))
        try:
            runners[backend], seconds = exported_runner(backend, model, (encoder,), sizes, work / f"{encoder}-{backend}",
                                                        threads)
        except Exception as e:  # noqa: BLE001 - reported, and the other backends still timed
            message = f"{type(e).__name__}: {e}".splitlines()[0][:300]
            log(f"{encoder}: {backend} failed: {message}")
            failures.append({"encoder": encoder, "backend": backend, "error": message})
            continue
        log(f"{encoder}: {backend} export took {seconds:.0f} s")
    return runners


# --- timing ----------------------------------------------------------------------------------------------------------


def interleaved(fns: dict, repeats: int) -> tuple[dict, dict]:
    """Median seconds of each function, interleaved (bench_kv_shared_prefill._median_seconds), and each one's
    output of its warm-up call, for the correctness check."""
    outputs = {}

    def keeping_output(key, fn):
        def run():
            out = fn()
            if key not in outputs:
                outputs[key] = np.asarray(out)

        return run

    return _median_seconds({key: keeping_output(key, fn) for key, fn in fns.items()}, repeats), outputs


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
def bench_vision(model, sizes, backends, repeats, threads, work: Path, log, failures: list) -> list[dict]:
    from models.encoders import VisionEmbedder, VisionEncoder

    reference, embedder, encoder = timm_tower(model), VisionEmbedder(model).eval(), VisionEncoder(model).eval()
    runners = open_exported("vision", backends, model, sizes, work, threads, log, failures)
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
def bench_audio(model, backends, repeats, threads, work: Path, log, failures: list) -> list[dict]:
    from models.encoders import AudioEmbedder, audio_window_inputs

    reference, embedder = transformers_audio_encoder(model), AudioEmbedder(model).eval()
    runners = open_exported("audio", backends, model, (768,), work, threads, log, failures)
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
    cosines = {key: _cosine(expected[key[1]], out) for key, out in outputs.items()}
    ref = seconds[("transformers eager", "encoder")]
    for (backend, timed), s in seconds.items():
        log(f"audio, {backend} ({timed}): {s:.3g} s per 30 s window, {ref / s:.2f}x, cosine {cosines[(backend, timed)]:.6f}")
    return [{"encoder": "audio", "backend": backend, "timed": timed, "window_s": WINDOW_S, "seconds": s,
             "real_time_factor": s / WINDOW_S, "speedup_vs_reference": ref / s, "cosine_vs_torch": cosines[(backend, timed)]}
            for (backend, timed), s in seconds.items()]


# --- output ----------------------------------------------------------------------------------------------------------


def markdown(result: dict) -> str:
    vision = [r for r in result["rows"] if r["encoder"] == "vision"]
    audio = [r for r in result["rows"] if r["encoder"] == "audio"]
    lines = [f"Encoders: {result['model']}; {result['threads']} threads, median of {result['repeats']} interleaved "
             f"rounds after a warm-up; {result['machine']}.", ""]
    if vision:
        sizes = sorted({r["size"] for r in vision})
        lines += ["Vision encoder, images/s (speed-up against timm's eager tower on the same weights):", "",
                  "| backend | timed | " + " | ".join(f"{s} px" for s in sizes) + " |",
                  "| --- | --- | " + " | ".join("---:" for _ in sizes) + " |"]
        for key in dict.fromkeys((r["backend"], r["timed"]) for r in vision):
            cells = []
            for size in sizes:
                r = next(r for r in vision if (r["backend"], r["timed"], r["size"]) == (*key, size))
                ratio = "reference" if r["backend"] == "timm eager" else f"{r['speedup_vs_reference']:.2f}x"
                cells.append(f"{r['images_per_s']:.3g} ({ratio})")
            lines.append(f"| {key[0]} | {key[1]} | " + " | ".join(cells) + " |")
        lines.append("")
    if audio:
        lines += ["Audio encoder, one 30 s window (real-time factor = compute seconds per second of audio; speed-up "
                  "against transformers' eager Gemma3nAudioEncoder on the same weights):", "",
                  "| backend | timed | seconds per window | real-time factor | speed-up |",
                  "| --- | --- | ---: | ---: | ---: |"]
        for r in audio:
            ratio = "reference" if r["backend"] == "transformers eager" else f"{r['speedup_vs_reference']:.2f}x"
            lines.append(f"| {r['backend']} | {r['timed']} | {r['seconds']:.3g} | {r['real_time_factor']:.3g} | "
                         f"{ratio} |")
        lines.append("")
    worst = min((r["cosine_vs_torch"] for r in result["rows"]), default=1.0)
    lines.append(f"Every timed output against our float embedder or encoder: cosine >= {worst:.6f}.")
    for f in result.get("failures", []):
        lines.append(f"Not timed: {f['encoder']} on {f['backend']} ({f['error']}).")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    """Horizontal bars (log scale): images/s per backend and size, and audio windows/s (1 / seconds per window)."""
    from PIL import Image, ImageDraw, ImageFont

    bars = [(f"vision {r['size']} px, {r['backend']} ({r['timed']})", r["images_per_s"], "images/s")
            for r in result["rows"] if r["encoder"] == "vision"]
    bars += [(f"audio, {r['backend']} ({r['timed']})", 1.0 / r["real_time_factor"], "x real time")
             for r in result["rows"] if r["encoder"] == "audio"]
    row_h, left, right, top = 22, 330, 120, 40
    width, height = 1000, top + row_h * max(len(bars), 1) + 50
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=12)
    draw.text((12, 10), f"encoder speed (log scale): {result['model']}", fill="black", font=font)
    values = [v for _, v, _ in bars if v > 0]
    lo = math.floor(math.log10(min(values))) if values else 0
    hi = max(math.ceil(math.log10(max(values))) if values else 1, lo + 1)
    x0, x1 = left, width - right

    def x_of(v):
        return x0 + (x1 - x0) * (math.log10(max(v, 10.0**lo)) - lo) / (hi - lo)

    for e in range(lo, hi + 1):
        draw.line([x_of(10.0**e), top, x_of(10.0**e), top + row_h * len(bars)], fill=(225, 225, 225))
        draw.text((x_of(10.0**e) - 12, top + row_h * len(bars) + 6), f"1e{e}", fill="black", font=font)
    palette = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189)]
    backends = list(dict.fromkeys(label.split(", ")[-1] for label, _, _ in bars))
    for i, (label, value, unit) in enumerate(bars):
        y = top + row_h * i
        draw.text((12, y + 4), label, fill="black", font=font)
        color = palette[backends.index(label.split(", ")[-1]) % len(palette)]
        draw.rectangle([x0, y + 4, x_of(value), y + row_h - 4], fill=color)
        draw.text((x_of(value) + 4, y + 4), f"{value:.3g} {unit}", fill="black", font=font)
    image.save(path, format="PNG")


def main() -> int:
    import platform

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="the default model's tiny encoders")
    parser.add_argument("--sizes", default="256,512,768", help="vision input sizes")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (after one warm-up round)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--backends", default="torch,litert,executorch")
    parser.add_argument("--encoders", default="vision,audio")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--plot", type=Path)
    args = parser.parse_args()
    from models.matformer import parse_int_list

    sizes = tuple(parse_int_list(args.sizes, "--sizes"))
    backends = [b for b in args.backends.split(",") if b]
    encoders = [e for e in args.encoders.split(",") if e]
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # random weights underflow in places; trained ones rarely do

    def log(message):
        print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    log("building the model")
    model = bench_model(args.tiny)
    vp = sum(p.numel() for p in model.vision_tower.parameters())
    ap = sum(p.numel() for p in model.audio_tower.parameters())
    name = ("tiny encoders (default model)" if args.tiny else "published-size encoders") + \
        f": MobileNet-V5 x{model.config.vision.channel_multiplier:g} ({vp / 1e6:.1f}M), audio conformer " \
        f"{model.config.audio.conf_num_hidden_layers}x{model.config.audio.hidden_size} ({ap / 1e6:.1f}M)"
    rows, failures = [], []
    with tempfile.TemporaryDirectory(prefix="g3n-bench-") as tmp:
        if "vision" in encoders:
            rows += bench_vision(model, sizes, backends, args.repeats, args.threads, Path(tmp), log, failures)
        if "audio" in encoders:
            rows += bench_audio(model, backends, args.repeats, args.threads, Path(tmp), log, failures)
    result = {"model": name, "threads": args.threads, "repeats": args.repeats,
              "machine": f"{platform.machine()}, {_cpu()}", "seconds": round(time.perf_counter() - t0), "rows": rows,
              "failures": failures}
    print(json.dumps(result, indent=2))
    print()
    print(markdown(result), end="")
    print(f"({result['seconds']} s in all, conversions included)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    if args.plot:
        plot(result, args.plot)
    return 0


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "cpu"


if __name__ == "__main__":
    sys.exit(main())
