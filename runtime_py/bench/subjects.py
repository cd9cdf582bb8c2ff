"""What the bench measures: its models (presets written as random checkpoints, or the user's checkpoint) and the
exports of them that every row shares, each made once per work folder and reused by later runs."""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import dataclass, replace
from pathlib import Path

from models.config import E2B, E4B, TINY_4_LAYERS, TextConfig
from models.errors import InputError
from runtime_py.bench.measure import run_measured

PYTHON = sys.executable
CHILD = [PYTHON, "-m", "runtime_py.bench.children"]


def _scaled(cfg: TextConfig, ffn: int) -> TextConfig:
    """The speed issue's scale of a published shape: its layers, KV sharing and attention pattern, at hidden 512."""
    return replace(cfg, vocab_size=65536, vocab_size_per_layer_input=65536, hidden_size=512,
                   hidden_size_per_layer_input=64, ffn_widths=(ffn,) * cfg.num_layers, num_heads=8, num_kv_heads=2,
                   head_dim=64, laurel_rank=64, sliding_window=512)


@dataclass(frozen=True)
class Preset:
    """A bench model: its config, its E4B-shaped twin and the slice of the twin that gives its shape back (the
    MatFormer row), and the prompt, decode and cache lengths it is measured at."""

    config: TextConfig
    description: str
    twin: TextConfig | None  # None: the model itself
    slice_ffn: int
    slice_skip: tuple[int, ...]
    prefill: int = 128
    decode: int = 64
    cache: int = 1024
    ttft_prompts: tuple[int, ...] = (16, 64, 256)
    ple_prompt: int = 256


PRESETS = {
    # 30 layers of which 10 KV-shared, hidden 512, FFN 2048, 8 heads / 2 KV heads of 64, PLE width 64, vocabulary
    # 65,536, window 512: about 280M parameters. Its twin is E4B at the same scale (FFN 4096, 35 layers).
    "scaled-e2b": Preset(_scaled(E2B, 2048), "E2B-shaped, scaled (hidden 512, FFN 2048, vocab 65,536)",
                         _scaled(E4B, 4096), 2048, (20, 21, 22, 23, 24)),
    # --quick: the tiny preset cut to 4 layers (2 KV-shared), sliced to half its FFN width without its last layer.
    "tiny": Preset(replace(TINY_4_LAYERS, max_position_embeddings=1024), "tiny preset, 4 layers (hidden 64)", None,
                   64, (3,), prefill=32, decode=8, cache=320, ttft_prompts=(8, 64), ple_prompt=64),
}


def write_checkpoint(cfg: TextConfig, path: Path, seed: int = 0) -> None:
    """A Gemma3nForCausalLM checkpoint of cfg, every parameter random, bf16, with a SentencePiece tokenizer covering
    every id (models.random_init.widened_tokenizer), written whole or not at all."""
    import torch

    from models.checkpoint import save_pretrained
    from models.random_init import randomise_, widened_tokenizer
    from models.text import TextDecoder

    model = TextDecoder(cfg)
    randomise_(model, seed=seed)
    staging = path.with_name(f".{path.name}.partial")  # save_pretrained writes a new folder; renamed when whole
    shutil.rmtree(staging, ignore_errors=True)
    save_pretrained(model.to(torch.bfloat16), staging)
    (staging / "tokenizer.model").write_bytes(widened_tokenizer(cfg.vocab_size))
    staging.rename(path)


class Work:
    """The work folder: checkpoints and exports, each made once (a step interrupted leaves nothing behind: the
    next run makes it again), with the export's wall time, process-tree peak RSS and bytes kept beside it."""

    def __init__(self, folder: Path, preset: Preset, checkpoint: Path | None, progress):
        self.folder, self.preset, self.progress = folder, preset, progress
        folder.mkdir(parents=True, exist_ok=True)
        self.user_checkpoint = checkpoint

    def checkpoint(self, name: str = "model") -> Path:
        """name: "model" (the user's checkpoint, or the preset's), "twin" (the E4B-shaped one: the model itself for a
        user's checkpoint or a preset without one), "slice" (the twin's slice)."""
        if name == "twin" and (self.preset.twin is None or self.user_checkpoint is not None):
            name = "model"
        if name == "model" and self.user_checkpoint is not None:
            return self.user_checkpoint
        path = self.folder / f"checkpoint-{name}"
        if not path.exists():
            if name == "slice":
                from models.matformer import slice_checkpoint

                self.progress("slicing the twin")
                twin = self.checkpoint("twin")
                staging = path.with_name(f".{path.name}.partial")
                shutil.rmtree(staging, ignore_errors=True)
                if self.user_checkpoint is not None:  # the published E2B slice of an E4B-shaped checkpoint
                    slice_checkpoint(twin, staging, preset="e2b")
                else:
                    slice_checkpoint(twin, staging, [self.preset.slice_ffn], list(self.preset.slice_skip))
                shutil.copy(twin / "tokenizer.model", staging / "tokenizer.model")
                staging.rename(path)
            else:
                self.progress(f"writing the {name} checkpoint")
                write_checkpoint(self.preset.config if name == "model" else self.preset.twin, path)
        return path

    def export(self, who: str, target: str, quant: str, checkpoint: str = "model", kv_shared: bool = True) -> dict:
        """who: "ours" (g3n export, text only) or "export_hf" (litert-torch's own). Returns the folder, the model
        file, export seconds, peak RSS (MiB) and bytes."""
        p = self.preset
        if checkpoint == "twin" and self.checkpoint("twin") == self.checkpoint("model"):
            checkpoint = "model"
        name = f"{who}-{target}-{quant}-{checkpoint}" + ("" if kv_shared else "-full-prefill")
        out, record = self.folder / name, self.folder / f"{name}.json"
        if not record.exists():
            source = self.checkpoint(checkpoint)
            shutil.rmtree(out, ignore_errors=True)
            if who == "ours":
                cmd = [PYTHON, "-m", "runtime_py.cli", "export", "--checkpoint", str(source), "--target", target,
                       "--quant", quant, "--text-only", "--cache-len", str(p.cache), "--prefill-lengths",
                       str(p.prefill), "--out", str(out), "--verbose"] + ([] if kv_shared else ["--full-prefill"])
            else:
                cmd = CHILD + ["export_hf", str(source), str(out), quant, str(p.prefill), str(p.cache)]
            self.progress(f"exporting {name}")
            # --verbose: the converters' output joins the export's stderr in the work folder's log, below
            measured = run_measured(cmd, self.folder / f"{name}.log")
            files = sorted(out.rglob("*.litertlm")) + sorted(out.rglob("*.pte"))
            if not files:
                raise InputError(f"{out}: the export wrote no model file; see {self.folder / f'{name}.log'}")
            record.write_text(json.dumps({"seconds": measured["seconds"], "peak_rss_mib": measured["peak_rss_mib"],
                                          "model": str(files[0])}))
        # What an app ships: the .litertlm, or the .pte and its .ptd (our exporter also leaves the sections' .tflite).
        shipped = sum(f.stat().st_size for f in out.iterdir() if f.suffix in (".litertlm", ".pte", ".ptd"))
        return json.loads(record.read_text()) | {"folder": str(out), "bytes": shipped}
