"""MatFormer slicing: extract a smaller Gemma 3n nested in a larger one (Mix-n-Match), as a Hugging Face checkpoint.

A slice keeps the leading `ffn_widths[i]` neurons of each kept layer's feed-forward (the nested FFNs share their
leading neurons) and drops whole layers. Dropping layer i also drops its block of the per-layer-embedding table and
of the per-layer projection, and its entries in layer_types and activation_sparsity_pattern. KV sharing must survive:
every remaining KV-shared layer must still read the same source layer as before.
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import torch

from models.checkpoint import TEXT_PREFIX, SafetensorsReader, layout_of, write_checkpoint
from models.config import E4B, TextConfig, read_hf_config
from models.errors import CheckpointError, InputError

# The published E2B: every layer at width 8192, layers 20-24 of E4B's 35 dropped.
E2B_SKIP_LAYERS = (20, 21, 22, 23, 24)
E2B_FFN_WIDTH = 8192
COPIED_FILES = ("generation_config.json", "tokenizer.json", "tokenizer.model", "tokenizer_config.json",
                "special_tokens_map.json", "chat_template.jinja", "chat_template.json", "preprocessor_config.json",
                "processor_config.json")


def e2b_plan(cfg: TextConfig) -> tuple[list[int], list[int]]:
    """(ffn widths of the kept layers, skipped layers) of the published E2B slice; the source must be E4B-shaped."""
    if (cfg.num_layers, cfg.num_kv_shared_layers, cfg.layer_types) != (
        E4B.num_layers,
        E4B.num_kv_shared_layers,
        E4B.layer_types,
    ) or min(cfg.ffn_widths) < E2B_FFN_WIDTH:
        raise InputError(
            "--preset e2b needs an E4B-shaped checkpoint (35 layers, 15 KV-shared, FFN width >= 8192); "
            f"this one has {cfg.num_layers} layers, {cfg.num_kv_shared_layers} KV-shared, "
            f"FFN widths {min(cfg.ffn_widths)}..{max(cfg.ffn_widths)}"
        )
    return [E2B_FFN_WIDTH] * (cfg.num_layers - len(E2B_SKIP_LAYERS)), list(E2B_SKIP_LAYERS)


def sliced_config(cfg: TextConfig, ffn_widths: list[int] | None, skip_layers: list[int]) -> tuple[TextConfig, list[int]]:
    """The sliced config and, for each new layer, the index of the source layer it comes from."""
    bad = [i for i in skip_layers if not 0 <= i < cfg.num_layers]
    if bad:
        raise InputError(f"--skip-layers: layer {bad[0]} does not exist (the checkpoint has {cfg.num_layers} layers)")
    if len(set(skip_layers)) != len(skip_layers):
        raise InputError("--skip-layers: a layer is listed twice")
    kept = [i for i in range(cfg.num_layers) if i not in set(skip_layers)]
    if not kept:
        raise InputError("--skip-layers: cannot drop every layer")
    if ffn_widths is None:
        widths = [cfg.ffn_widths[i] for i in kept]
    elif len(ffn_widths) == 1:
        widths = ffn_widths * len(kept)
    elif len(ffn_widths) == len(kept):
        widths = list(ffn_widths)
    else:
        raise InputError(
            f"--ffn-widths: give one width or one per kept layer ({len(kept)}), got {len(ffn_widths)}"
        )
    for new_i, (src, w) in enumerate(zip(kept, widths)):
        if not 0 < w <= cfg.ffn_widths[src]:
            raise InputError(
                f"--ffn-widths: layer {new_i} (source layer {src}) asks for width {w}; "
                f"it must be in 1..{cfg.ffn_widths[src]}"
            )
    num_shared = sum(1 for i in kept if i >= cfg.first_kv_shared_layer)
    try:
        new = replace(
            cfg,
            num_layers=len(kept),
            ffn_widths=tuple(widths),
            layer_types=tuple(cfg.layer_types[i] for i in kept),
            activation_sparsity=tuple(cfg.activation_sparsity[i] for i in kept),
            num_kv_shared_layers=num_shared,
        )
    except CheckpointError as e:
        raise InputError(f"this slice breaks KV sharing: {e}") from None
    for new_i, src in enumerate(kept):
        before, after = cfg.kv_shared_from[src], new.kv_shared_from[new_i]
        if before is not None and kept[after] != before:
            raise InputError(
                f"dropping layer {before} changes the KV source of layer {src}, which reads its keys and values; "
                "keep the last non-shared layer of each attention type"
            )
    return new, kept


def slice_checkpoint(
    src: str | Path,
    dst: str | Path,
    ffn_widths: list[int] | None = None,
    skip_layers: list[int] = (),
    preset: str | None = None,
    progress=None,
    name: str | None = None,
) -> TextConfig:
    """Writes the sliced checkpoint to `dst` in the source's layout; returns its text config. name: the slice's name
    in a MatFormer table (read_matformer_config), recorded with it."""
    src = Path(src)
    hf_config = read_hf_config(src)
    cfg = TextConfig.from_hf_dict(hf_config)
    if preset == "e2b":
        ffn_widths, skip_layers = e2b_plan(cfg)
    elif preset is not None:
        raise InputError(f"--preset: unknown slice preset {preset!r} (e2b)")
    new_cfg, kept = sliced_config(cfg, ffn_widths, list(skip_layers))
    reader = SafetensorsReader.open(src)
    layout = layout_of(hf_config)
    prefix = TEXT_PREFIX[layout]
    new_of_old = {old: new for new, old in enumerate(kept)}
    P = cfg.hidden_size_per_layer_input
    ple_cols = torch.cat([torch.arange(i * P, (i + 1) * P) for i in kept])
    layer_key = re.compile(re.escape(prefix) + r"layers\.(\d+)\.(.*)")

    def sliced_tensors():
        keys = reader.keys()
        for n, (key, t) in enumerate(reader.tensors(keys)):
            if progress:
                progress(n + 1, len(keys))
            m = layer_key.fullmatch(key)
            if m:
                old, rest = int(m.group(1)), m.group(2)
                if old not in new_of_old:
                    continue
                new = new_of_old[old]
                width = new_cfg.ffn_widths[new]
                if rest in ("mlp.gate_proj.weight", "mlp.up_proj.weight"):
                    t = t[:width]
                elif rest == "mlp.down_proj.weight":
                    t = t[:, :width]
                yield f"{prefix}layers.{new}.{rest}", t.contiguous()
            elif key == prefix + "embed_tokens_per_layer.weight":
                yield key, t[:, ple_cols].contiguous()
            elif key == prefix + "per_layer_model_projection.weight":
                yield key, t[ple_cols].contiguous()
            else:
                yield key, t

    out_config = dict(hf_config)
    if layout_of(hf_config) == "Gemma3nForConditionalGeneration":
        out_config["text_config"] = new_cfg.to_hf_text_dict(hf_config["text_config"])
    else:
        out_config = new_cfg.to_hf_text_dict(hf_config)
    out_config["matformer_slice"] = {
        "source_layers": kept,
        "ffn_widths": list(new_cfg.ffn_widths),
        "skipped_layers": sorted(skip_layers),
        "preset": preset,
    } | ({"name": name} if name else {})
    extra = {name: (src / name).read_bytes() for name in COPIED_FILES if (src / name).is_file()}
    write_checkpoint(dst, out_config, sliced_tensors(), extra_files=extra)
    return new_cfg


# Google's MatFormer Lab table (as mistral.rs ships it in matformer_configs/gemma3n.csv): one row per slice, the FFN
# widths one per kept layer written as "[2_048 * 4, ...]", the skipped layers as "[20, 21, ...]" or empty.
MATFORMER_COLUMNS = ("name", "# Layers", "FFN Hidden Dims", "Layers Skipped")
_WIDTH = re.compile(r"\s*(\d[\d_]*)\s*(?:\*\s*(\d[\d_]*))?\s*")


def _bracketed_ints(text: str, where: str) -> list[int]:
    """ "[2_048 * 4, 8192]" -> [8192, 8192]: integers (underscores allowed) or products of two; nothing evaluated."""
    text = text.strip()
    if text in ("", "[]"):
        return []
    if not (text.startswith("[") and text.endswith("]")):
        raise InputError(f"{where}: {text[:40]!r} is not a bracketed list")
    values = []
    for item in text[1:-1].split(","):
        m = _WIDTH.fullmatch(item)
        if not m:
            raise InputError(f"{where}: {item.strip()[:40]!r} is not an integer or a product of two")
        values.append(int(m.group(1).replace("_", "")) * int((m.group(2) or "1").replace("_", "")))
    return values


def read_matformer_config(path: str | Path, name: str) -> tuple[list[int], list[int]]:
    """(FFN widths of the kept layers, skipped layers) of the row `name` of a MatFormer configuration table (CSV
    with the columns of MATFORMER_COLUMNS; others, such as '# Effective Params (B)', are ignored). An unknown name
    is refused listing the table's names."""
    import csv

    path = Path(path)
    if not path.is_file():
        raise InputError(f"--matformer-config: {path}: no such file")
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except (UnicodeDecodeError, csv.Error) as e:
        raise InputError(f"--matformer-config: {path}: not a readable CSV table ({e})") from None
    missing = [c for c in MATFORMER_COLUMNS if not rows or c not in rows[0]]
    if missing:
        raise InputError(f"--matformer-config: {path}: no column {', '.join(repr(c) for c in missing)} (expected "
                         f"{', '.join(MATFORMER_COLUMNS)})")
    names = [(row["name"] or "").strip() for row in rows]
    if name not in names:
        raise InputError(f"--slice-name: {name!r} is not in {path}; its slices: {'; '.join(names)}")
    row = rows[names.index(name)]
    where = f"{path}: {name}"
    widths = _bracketed_ints(row["FFN Hidden Dims"] or "", f"{where}: FFN Hidden Dims")
    skip = _bracketed_ints(row["Layers Skipped"] or "", f"{where}: Layers Skipped")
    layers = (row["# Layers"] or "").strip()
    if not layers.isdigit() or int(layers) != len(widths):
        raise InputError(f"{where}: '# Layers' is {layers!r} but FFN Hidden Dims lists {len(widths)} widths")
    return widths, skip


def parse_int_list(text: str, flag: str) -> list[int]:
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x != ""]
    except ValueError:
        raise InputError(f"{flag}: expected comma-separated integers, got {text!r}") from None
