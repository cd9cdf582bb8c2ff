"""The bad-input catalogue: every `g3n` entry point against every kind of bad input a careless or hostile user hands
it (missing and corrupt files, foreign formats, lying headers, decompression bombs, malformed and out-of-range
flags, conflicting flags, wrong bundles for a backend, bad keys), each answered with exactly one `error:` line that
names the file, key or flag, exit code 2, and the file system left as it was (nothing written, nothing half
written, the inputs unchanged).

More specific cases live beside the code they test (manifest edits: test_bundle.py; signatures: test_signing.py;
media decoders: test_audio.py, test_vision.py); this table is the one place that walks the CLI as a user does."""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import soundfile
from conftest import assert_one_error_line, run_cli


@dataclass(frozen=True)
class Inputs:
    """What the catalogue's command lines point at: good inputs to break, bad files, and an empty folder whose
    emptiness is checked after every command (`out`: where outputs would go)."""

    checkpoint: Path  # a tiny text checkpoint
    text: Path  # g3n bundle --out of the default text model: android, executorch, ios, reference
    whole: Path  # g3n bundle --out of the default whole model (vision, audio): android, executorch, reference
    bad: Path  # bad files, made by _bad_files
    out: Path


def _bad_files(folder: Path) -> Path:
    folder.mkdir()
    rng = np.random.default_rng(0)
    (folder / "noise.png").write_bytes(rng.integers(0, 256, 512, dtype=np.uint8).tobytes())
    (folder / "text.wav").write_text("not audio\n")
    from PIL import Image

    Image.new("1", (10_000, 10_000)).save(folder / "bomb.png")  # past PIL's pixel limit, where PIL only warns
    soundfile.write(folder / "empty.wav", np.zeros(0, np.float32), 16_000)
    wave = (np.sin(np.arange(16_000) / 7.0) * 20_000).astype(np.int16)
    soundfile.write(folder / "liar.wav", wave, 16_000, subtype="PCM_16")
    data = bytearray((folder / "liar.wav").read_bytes())  # header claims 2 GB: decoded block by block
    data[4:8] = struct.pack("<I", 0x7FFFFFF0)
    data[data.index(b"data") + 4: data.index(b"data") + 8] = struct.pack("<I", 0x7FFFFF00)
    (folder / "liar.wav").write_bytes(bytes(data))
    soundfile.write(folder / "nan.wav", np.full(1600, np.nan, np.float32), 16_000, subtype="FLOAT")
    (folder / "frames").mkdir()
    (folder / "not-json.json").write_text("{ not json")
    (folder / "list.json").write_text("[1, 2]")
    (folder / "key.txt").write_text("not a key\n")
    # Checkpoints: no config, config not JSON, a pickle only (never unpickled), truncated safetensors.
    (folder / "no-config").mkdir()
    (folder / "no-config" / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    (folder / "bad-config").mkdir()
    (folder / "bad-config" / "config.json").write_text("{ nope")
    (folder / "pickle").mkdir()
    (folder / "pickle" / "config.json").write_text(json.dumps({"model_type": "gemma3n_text"}))
    (folder / "pickle" / "pytorch_model.bin").write_bytes(b"\x80\x04K\x01.")
    (folder / "no-manifest").mkdir()
    return folder


def _truncated_checkpoint(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        data = f.read_bytes()
        (dst / f.name).write_bytes(data[: len(data) // 2] if f.suffix == ".safetensors" else data)
    return dst


def _oversized_checkpoint(src: Path, dst: Path) -> Path:
    """The tiny config beside a model.safetensors whose header declares a 550 GB embedding table (a sparse file:
    nothing of it is on disk): larger than any machine this runs on."""
    dst.mkdir()
    (dst / "config.json").write_bytes((src / "config.json").read_bytes())
    rows, width = 1 << 27, 2048
    header = json.dumps({"model.embed_tokens.weight": {"dtype": "BF16", "shape": [rows, width],
                                                       "data_offsets": [0, rows * width * 2]}}).encode()
    with open(dst / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
        f.truncate(8 + len(header) + rows * width * 2)
    return dst


def _thresholds(i: Inputs, text: str) -> Path:
    return i.bad / text


# (id, argv from Inputs, fragments the one error line must name). Grouped by entry point.
CATALOGUE = [
    # --- every command: argparse's errors, shortened to one line
    ("no-command", lambda i: [], ["the following arguments are required: COMMAND"]),
    ("unknown-command", lambda i: ["frobnicate"], ["invalid choice: 'frobnicate'"]),
    ("unknown-flag", lambda i: ["info", "--frobnicate"], ["unrecognized arguments: --frobnicate"]),
    # --- info
    ("info-missing-checkpoint", lambda i: ["info", "--checkpoint", i.bad / "nowhere"], ["nowhere"]),
    ("info-checkpoint-and-preset", lambda i: ["info", "--checkpoint", i.checkpoint, "--preset", "e2b"],
     ["--checkpoint or --preset"]),
    ("info-config-not-json", lambda i: ["info", "--checkpoint", i.bad / "bad-config"], ["config.json"]),
    ("info-no-config", lambda i: ["info", "--checkpoint", i.bad / "no-config"], ["config.json"]),
    ("info-bundle-without-manifest", lambda i: ["info", "--bundle", i.bad / "no-manifest"], ["manifest.json"]),
    ("info-bundle-is-a-file", lambda i: ["info", "--bundle", i.bad / "noise.png"], ["noise.png"]),
    ("info-bad-preset", lambda i: ["info", "--preset", "e9b"], ["--preset", "invalid choice: 'e9b'"]),
    # --- slice
    ("slice-nothing-to-do", lambda i: ["slice", "--checkpoint", i.checkpoint, "--out", i.out / "s"],
     ["--preset e2b", "--ffn-widths"]),
    ("slice-bad-widths", lambda i: ["slice", "--checkpoint", i.checkpoint, "--out", i.out / "s", "--ffn-widths",
                                    "a,b"], ["--ffn-widths"]),
    ("slice-too-wide", lambda i: ["slice", "--checkpoint", i.checkpoint, "--out", i.out / "s", "--ffn-widths",
                                  "99999"], ["99999"]),
    ("slice-skip-beyond-layers", lambda i: ["slice", "--checkpoint", i.checkpoint, "--out", i.out / "s",
                                            "--skip-layers", "40"], ["--skip-layers", "40"]),
    ("slice-out-exists", lambda i: ["slice", "--checkpoint", i.checkpoint, "--out", i.checkpoint, "--ffn-widths",
                                    "8"], ["already exists"]),
    ("slice-pickle-checkpoint", lambda i: ["slice", "--checkpoint", i.bad / "pickle", "--out", i.out / "s",
                                           "--ffn-widths", "8"], ["pickle"]),
    # --- random-checkpoint
    ("random-checkpoint-out-exists", lambda i: ["random-checkpoint", "--preset", "tiny", "--out", i.checkpoint],
     ["already exists"]),
    ("random-checkpoint-bad-preset", lambda i: ["random-checkpoint", "--preset", "e9b", "--out", i.out / "c"],
     ["--preset", "invalid choice: 'e9b'"]),
    # --- bench
    ("bench-unknown-row", lambda i: ["bench", "--report", i.out / "r", "--only", "frobnicate"],
     ["--only", "frobnicate"]),
    ("bench-report-exists", lambda i: ["bench", "--report", i.checkpoint, "--quick"], ["already exists"]),
    # --- generate: flags
    ("generate-no-bundle", lambda i: ["generate", "hi"], ["--bundle"]),
    ("generate-no-prompt", lambda i: ["generate", "--bundle", i.text / "executorch"], ["prompt"]),
    ("generate-zero-tokens", lambda i: ["generate", "--max-new-tokens", "0", "hi"], ["--max-new-tokens"]),
    ("generate-negative-tokens", lambda i: ["generate", "--max-new-tokens", "-3", "hi"], ["--max-new-tokens"]),
    ("generate-nan-temperature", lambda i: ["generate", "--temperature", "nan", "hi"], ["--temperature"]),
    ("generate-inf-temperature", lambda i: ["generate", "--temperature", "inf", "hi"], ["--temperature"]),
    ("generate-negative-temperature", lambda i: ["generate", "--temperature", "-1", "hi"], ["--temperature"]),
    ("generate-top-p", lambda i: ["generate", "--top-p", "1.5", "hi"], ["--top-p"]),
    ("generate-unknown-backend", lambda i: ["generate", "--bundle", i.text / "executorch", "--backend", "tpu",
                                            "hi"], ["--backend", "tpu"]),
    ("generate-backend-of-another-target", lambda i: ["generate", "--bundle", i.text / "executorch", "--backend",
                                                      "litert", "hi"], ["--backend litert", "executorch bundle"]),
    ("generate-coreml-on-linux", lambda i: ["generate", "--bundle", i.text / "ios", "--backend", "coreml", "hi"],
     ["macOS"]),
    ("generate-bundle-missing", lambda i: ["generate", "--bundle", i.bad / "nowhere", "hi"], ["nowhere"]),
    ("generate-not-utf8", lambda i: ["generate", "--bundle", i.text / "executorch", "caf\udce9"], ["UTF-8"]),
    ("generate-prompt-past-cache", lambda i: ["generate", "--bundle", i.text / "android", "--backend", "litertlm",
                                              "word " * 400], ["cache"]),
    ("generate-token-ids-not-ints", lambda i: ["generate", "--token-ids", "2,x"], ["--token-ids"]),
    ("generate-token-id-beyond-vocab", lambda i: ["generate", "--bundle", i.text / "executorch", "--token-ids",
                                                  "2,99999999"], ["99999999"]),
    ("generate-token-ids-on-litertlm", lambda i: ["generate", "--bundle", i.text / "android", "--backend",
                                                  "litertlm", "--token-ids", "2,3"], ["--token-ids", "litertlm"]),
    ("generate-backend-without-bundle", lambda i: ["generate", "--backend", "litert", "--token-ids", "2,3"],
     ["needs --bundle"]),
    ("generate-require-signature-unsigned", lambda i: ["generate", "--bundle", i.text / "executorch",
                                                       "--require-signature", i.bad / "key.txt", "hi"],
     ["--require-signature", "not a PEM key"]),
    # --- generate: media
    ("image-missing", lambda i: ["generate", "--bundle", i.whole / "executorch", "--image", i.bad / "no.png", "hi"],
     ["no.png"]),
    ("image-noise", lambda i: ["generate", "--bundle", i.whole / "executorch", "--image", i.bad / "noise.png",
                               "hi"], ["noise.png", "not a readable image"]),
    ("image-bomb", lambda i: ["generate", "--bundle", i.whole / "executorch", "--image", i.bad / "bomb.png", "hi"],
     ["bomb.png", "decompression bomb"]),
    ("image-size-unsupported", lambda i: ["generate", "--bundle", i.whole / "executorch", "--image",
                                          i.bad / "noise.png", "--image-size", "300", "hi"], ["300"]),
    ("image-on-text-bundle", lambda i: ["generate", "--bundle", i.text / "executorch", "--image",
                                        i.bad / "noise.png", "hi"], ["encoders"]),
    ("image-on-litertlm-text-bundle", lambda i: ["generate", "--bundle", i.text / "android", "--backend",
                                                 "litertlm", "--image", i.bad / "noise.png", "hi"], ["encoders"]),
    ("video-missing", lambda i: ["generate", "--bundle", i.whole / "executorch", "--video", i.bad / "novideo",
                                 "hi"], ["--video", "novideo"]),
    ("video-empty", lambda i: ["generate", "--bundle", i.whole / "executorch", "--video", i.bad / "frames", "hi"],
     ["--video", "no frames"]),
    ("audio-text-file", lambda i: ["generate", "--bundle", i.whole / "executorch", "--audio", i.bad / "text.wav",
                                   "hi"], ["text.wav"]),
    ("audio-empty", lambda i: ["generate", "--bundle", i.whole / "executorch", "--audio", i.bad / "empty.wav",
                               "hi"], ["empty.wav", "empty"]),
    ("audio-nan", lambda i: ["generate", "--bundle", i.whole / "executorch", "--audio", i.bad / "nan.wav", "hi"],
     ["nan.wav"]),
    ("audio-missing", lambda i: ["generate", "--bundle", i.whole / "android", "--backend", "litert", "--audio",
                                 i.bad / "no.wav", "hi"], ["no.wav"]),
    # --- bundle and export
    ("bundle-unknown-target", lambda i: ["bundle", "--targets", "windows", "--out", i.out / "b"], ["windows"]),
    ("bundle-unknown-quant", lambda i: ["bundle", "--quant", "int3", "--out", i.out / "b"], ["--quant", "int3"]),
    ("bundle-bad-prefill", lambda i: ["bundle", "--prefill-lengths", "0", "--out", i.out / "b"],
     ["prefill"]),
    ("bundle-prefill-not-int", lambda i: ["bundle", "--prefill-lengths", "a", "--out", i.out / "b"],
     ["--prefill-lengths"]),
    ("bundle-prefill-past-cache", lambda i: ["bundle", "--text-only", "--cache-len", "64", "--prefill-lengths",
                                             "128", "--out", i.out / "b"], ["cache"]),
    ("bundle-image-size", lambda i: ["bundle", "--image-sizes", "300", "--out", i.out / "b"], ["300"]),
    ("bundle-missing-checkpoint", lambda i: ["bundle", "--checkpoint", i.bad / "nowhere", "--out", i.out / "b"],
     ["nowhere"]),
    ("bundle-truncated-checkpoint", lambda i: ["bundle", "--checkpoint", i.bad / "truncated", "--out",
                                               i.out / "b"], ["truncated"]),
    ("bundle-checkpoint-past-memory", lambda i: ["bundle", "--checkpoint", i.bad / "oversized", "--out",
                                                 i.out / "b"], ["oversized/model.safetensors", "GB of memory"]),
    ("export-checkpoint-past-memory", lambda i: ["export", "--target", "executorch", "--checkpoint",
                                                 i.bad / "oversized", "--out", i.out / "e"],
     ["oversized/model.safetensors", "GB of memory"]),
    ("bundle-missing-tokenizer", lambda i: ["bundle", "--tokenizer", i.bad / "tok.model", "--out", i.out / "b"],
     ["tok.model"]),
    ("bundle-foreign-tokenizer", lambda i: ["bundle", "--tokenizer", i.bad / "noise.png", "--out", i.out / "b"],
     ["noise.png"]),
    ("bundle-out-exists", lambda i: ["bundle", "--text-only", "--out", i.checkpoint], ["already exists"]),
    ("bundle-bad-sign-key", lambda i: ["bundle", "--sign", i.bad / "key.txt", "--out", i.out / "b"],
     ["--sign", "not a PEM key"]),
    ("bundle-slice-and-widths", lambda i: ["bundle", "--slice", "e2b", "--ffn-widths", "8", "--out", i.out / "b"],
     ["--slice, --ffn-widths/--skip-layers", "not several"]),
    ("export-unknown-quant", lambda i: ["export", "--target", "litert", "--quant", "int3", "--out", i.out / "e"],
     ["int3"]),
    ("export-unknown-ple-storage", lambda i: ["export", "--target", "executorch", "--ple-storage", "int3",
                                              "--out", i.out / "e"], ["int3"]),
    ("export-unknown-target", lambda i: ["export", "--target", "tflite", "--out", i.out / "e"], ["--target"]),
    ("export-pickle-checkpoint", lambda i: ["export", "--target", "litert", "--checkpoint", i.bad / "pickle",
                                            "--out", i.out / "e"], ["pickle"]),
    # --- parity, compare, harness
    ("parity-missing-checkpoint", lambda i: ["parity", "--checkpoint", i.bad / "nowhere"], ["nowhere"]),
    ("compare-bundle-missing", lambda i: ["compare", "--bundle", i.bad / "nowhere", "--report", i.out / "r"],
     ["nowhere"]),
    ("compare-thresholds-not-json", lambda i: ["compare", "--bundle", i.text / "executorch", "--thresholds",
                                               i.bad / "not-json.json", "--report", i.out / "r"], ["not-json.json"]),
    ("compare-thresholds-a-list", lambda i: ["compare", "--bundle", i.text / "executorch", "--thresholds",
                                             i.bad / "list.json", "--report", i.out / "r"], ["list.json"]),
    ("compare-unknown-quant", lambda i: ["compare", "--quant", "int3", "--report", i.out / "r"], ["int3"]),
    ("harness-bundle-missing", lambda i: ["harness", "run", "--device", "host", "--bundle", i.bad / "nowhere"],
     ["nowhere"]),
    ("harness-unknown-device", lambda i: ["harness", "run", "--device", "toaster", "--bundle", i.text / "android"],
     ["--device"]),
    # --- sign and verify
    ("sign-missing-key", lambda i: ["sign", "--bundle", i.text, "--key", i.bad / "no.pem"], ["--key", "no.pem"]),
    ("verify-not-a-bundle", lambda i: ["verify", "--bundle", i.bad / "no-manifest"], ["manifest.json"]),
    ("verify-unsigned-with-key", lambda i: ["verify", "--bundle", i.text / "android", "--key", i.bad / "key.txt"],
     ["--key", "not a PEM key"]),
]


def _state(*roots: Path) -> dict[str, tuple[int, int]]:
    """Every path below the roots with its size and modification time: what a command must leave as it was."""
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for root in roots for p in sorted(root.rglob("*"))}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_checkpoint, default_bundles, multimodal_bundles):
    bad = _bad_files(tmp_path_factory.mktemp("catalogue") / "bad")
    _truncated_checkpoint(tiny_checkpoint, bad / "truncated")
    _oversized_checkpoint(tiny_checkpoint, bad / "oversized")
    return Inputs(tiny_checkpoint, default_bundles, multimodal_bundles, bad, tmp_path_factory.mktemp("out"))


@pytest.mark.parametrize("argv, fragments", [(argv, fragments) for _, argv, fragments in CATALOGUE],
                         ids=[name for name, _, _ in CATALOGUE])
def test_one_line_exit_2_nothing_written(capsys, inputs, monkeypatch, argv, fragments):
    monkeypatch.chdir(inputs.out)  # a relative default output would land here, and be seen
    before = _state(inputs.checkpoint, inputs.text, inputs.whole, inputs.bad, inputs.out)
    code, _, err = run_cli(capsys, *argv(inputs))
    assert_one_error_line(code, err, *[str(f) for f in fragments])
    assert _state(inputs.checkpoint, inputs.text, inputs.whole, inputs.bad, inputs.out) == before
    assert not list(Path(inputs.out).iterdir())


def test_the_catalogue_covers_every_command():
    from runtime_py.cli import COMMANDS

    named = {command for command in COMMANDS for name, _, _ in CATALOGUE if name.startswith(command + "-")}
    assert set(COMMANDS) - named == set()
    assert len(CATALOGUE) == len({name for name, _, _ in CATALOGUE})


def test_native_runtime_lines_stay_off_the_terminal(multimodal_bundles, tmp_path):
    """ExecuTorch's CPU probing, TFLite's XNNPACK INFO line and torch's import-time warnings go to the runtime log
    (G3N_RUNTIME_LOG), in a fresh process where they are printed: stderr holds only our timing line."""
    import subprocess
    import sys

    g3n = Path(sys.executable).with_name("g3n")
    log = tmp_path / "runtime.log"
    env = dict(os.environ, G3N_RUNTIME_LOG=str(log))
    env.pop("G3N_DEBUG", None)
    image = Path(__file__).parents[1] / "models" / "assets" / "sample.png"
    for backend, target in (("executorch", "executorch"), ("litert", "android")):
        done = subprocess.run([str(g3n), "generate", "--bundle", str(multimodal_bundles / target), "--backend",
                               backend, "--image", str(image), "--max-new-tokens", "2", "Describe this."],
                              capture_output=True, text=True, env=env, cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"[{backend}] ttft"), done.stderr
    logged = log.read_text()
    assert "cpuinfo" in logged and "XNNPACK delegate" in logged, logged[-2000:]
