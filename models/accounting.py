"""Parameter accounting: where a Gemma 3n's parameters live, and which must sit in accelerator memory.

Core = everything but the PLE table (memory-mapped, read row by row), the token-embedding table (looked up on the
CPU; the LM head reuses it), and the audio and vision encoders. For E2B that is ~1.9B of ~5.4B.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from models.checkpoint import SafetensorsReader
from models.config import TextConfig, read_hf_config
from models.text import TextDecoder


@dataclass
class ParameterCounts:
    total: int
    ple_table: int
    text_embedding: int
    audio: int
    vision: int
    core: int
    unused_shared_kv: int = 0  # k/v weights that older checkpoints keep for KV-shared layers, which never use them

    def as_dict(self) -> dict:
        return asdict(self)

    def markdown(self) -> str:
        rows = [
            ("total", self.total, "every parameter"),
            ("PLE table", self.ple_table, "per-layer embeddings: memory-mapped, read row by row"),
            ("text embedding", self.text_embedding, "token embeddings (tied LM head)"),
            ("audio", self.audio, "audio encoder + audio embedder"),
            ("vision", self.vision, "vision encoder + vision embedder"),
            ("core", self.core, "decoder layers: must live in accelerator memory"),
        ]
        if self.unused_shared_kv:
            rows.append(("unused shared k/v", self.unused_shared_kv, "stored for KV-shared layers, never read"))
        lines = ["| part | parameters | billions | note |", "| --- | ---: | ---: | --- |"]
        lines += [f"| {name} | {n:,} | {n / 1e9:.2f}B | {note} |" for name, n, note in rows]
        return "\n".join(lines)


def _category(key: str) -> str:
    if "embed_tokens_per_layer" in key:
        return "ple_table"
    if key.startswith(("model.audio_tower.", "model.embed_audio.")):
        return "audio"
    if key.startswith(("model.vision_tower.", "model.embed_vision.")):
        return "vision"
    if key.endswith("embed_tokens.weight"):
        return "text_embedding"
    return "core"


def _counts(numels: dict[str, int], unused: int = 0) -> ParameterCounts:
    by = {"ple_table": 0, "audio": 0, "vision": 0, "text_embedding": 0, "core": 0}
    for key, n in numels.items():
        by[_category(key)] += n
    return ParameterCounts(total=sum(by.values()) + unused, unused_shared_kv=unused, **by)


def count_checkpoint(path: str | Path) -> ParameterCounts:
    """Counts from the safetensors headers alone: no tensor data is read."""
    from models.checkpoint import TEXT_PREFIX, _is_unused_shared_kv, layout_of

    hf_config = read_hf_config(Path(path))
    cfg = TextConfig.from_hf_dict(hf_config)
    prefix = TEXT_PREFIX[layout_of(hf_config)]
    reader = SafetensorsReader.open(Path(path))
    numels, unused = {}, 0
    for key in reader.keys():
        if key == "lm_head.weight":  # tied to the token embedding
            continue
        if _is_unused_shared_kv(key, prefix, cfg):
            unused += reader.numel(key)
        else:
            numels[key] = reader.numel(key)
    return _counts(numels, unused)


def count_config(cfg: TextConfig, multimodal: bool = True) -> ParameterCounts:
    """Counts for a config without allocating weights (modules built on the meta device). The audio and vision
    encoders are the published ones, built by transformers and timm on the meta device."""
    with torch.device("meta"):
        text = TextDecoder(cfg)
    numels = {"model.language_model." + k.replace("per_layer_embedding", "embed_tokens_per_layer"): p.numel()
              for k, p in text.named_parameters()}
    if multimodal:
        numels.update(_published_encoder_numels(cfg))
    return _counts(numels)


def _published_encoder_numels(cfg: TextConfig) -> dict[str, int]:
    from transformers import AutoModel, Gemma3nAudioConfig, Gemma3nTextConfig, Gemma3nVisionConfig
    from transformers.models.gemma3n.modeling_gemma3n import Gemma3nMultimodalEmbedder

    text_config = Gemma3nTextConfig(hidden_size=cfg.hidden_size, rms_norm_eps=cfg.rms_norm_eps)
    audio_config, vision_config = Gemma3nAudioConfig(), Gemma3nVisionConfig()
    numels = {}
    with torch.device("meta"):
        parts = {
            "model.audio_tower.": AutoModel.from_config(audio_config),
            "model.vision_tower.": AutoModel.from_config(vision_config),
            "model.embed_audio.": Gemma3nMultimodalEmbedder(audio_config, text_config),
            "model.embed_vision.": Gemma3nMultimodalEmbedder(vision_config, text_config),
        }
    for prefix, module in parts.items():
        for k, p in module.named_parameters():
            numels[prefix + k] = p.numel()
    return numels
