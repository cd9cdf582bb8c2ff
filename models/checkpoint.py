"""Hugging Face checkpoint I/O: config.json plus safetensors (single file or sharded index). Never unpickles.

Two layouts are read and written: `Gemma3nForCausalLM` (text weights under `model.`) and
`Gemma3nForConditionalGeneration` (text weights under `model.language_model.`, next to the audio and vision towers).
The text decoder is loaded into our `TextDecoder`; tensors of the other components are carried through unchanged
so that saving writes the same layout back.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch
from safetensors import SafetensorError, safe_open

from models.config import TextConfig, read_hf_config
from models.errors import CheckpointError
from models.fileio import atomic_directory
from models.text import TextDecoder

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
CAUSAL_LM, CONDITIONAL_GENERATION = "Gemma3nForCausalLM", "Gemma3nForConditionalGeneration"
TEXT_PREFIX = {CAUSAL_LM: "model.", CONDITIONAL_GENERATION: "model.language_model."}
# Components of the multimodal checkpoint that the text decoder does not own.
MULTIMODAL_PREFIXES = ("model.audio_tower.", "model.vision_tower.", "model.embed_audio.", "model.embed_vision.")
# Our parameter names differ from Hugging Face's only here.
RENAMES = {"per_layer_embedding.weight": "embed_tokens_per_layer.weight"}
# Older checkpoints (the published ones among them) still carry k/v weights for KV-shared layers, which never use them.
UNUSED_SHARED_KV = ("self_attn.k_proj.", "self_attn.v_proj.", "self_attn.k_norm.", "self_attn.v_norm.")


def layout_of(hf_config: dict) -> str:
    return CONDITIONAL_GENERATION if hf_config.get("model_type") == "gemma3n" else CAUSAL_LM


@dataclass
class SafetensorsReader:
    """Lazy access to the tensors of a checkpoint directory: tensors are read one at a time, on request."""

    directory: Path
    file_of: dict[str, str] = field(default_factory=dict)
    header: dict[str, tuple[tuple[int, ...], str]] = field(default_factory=dict)  # key -> (shape, dtype)

    @classmethod
    def open(cls, directory: Path) -> "SafetensorsReader":
        directory = Path(directory)
        index, single = directory / INDEX_FILE, directory / SINGLE_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index}: not a safetensors index ({e})") from None
            files = set(weight_map.values())
        elif single.is_file():
            files, weight_map = {SINGLE_FILE}, None
        else:
            pickles = [p.name for p in directory.glob("*.bin")] + [p.name for p in directory.glob("*.pt*")]
            hint = f" (found {', '.join(sorted(pickles))}: pickle files are never loaded)" if pickles else ""
            raise CheckpointError(f"{directory}: no {SINGLE_FILE} or {INDEX_FILE}{hint}")
        reader = cls(directory)
        for name in sorted(files):
            path = directory / name
            if not path.is_file():
                raise CheckpointError(f"{path}: listed in {INDEX_FILE} but missing")
            header = reader._headers_of(path)
            reader.header.update(header)
            for key in header:
                if weight_map is not None and weight_map.get(key) != name:
                    raise CheckpointError(f"{path}: holds {key}, which {INDEX_FILE} places elsewhere")
                reader.file_of[key] = name
        if weight_map is not None:
            missing = sorted(set(weight_map) - set(reader.file_of))
            if missing:
                raise CheckpointError(f"{directory}: {INDEX_FILE} lists tensors no shard holds: {_few(missing)}")
        return reader

    @staticmethod
    def _headers_of(path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
        """key -> (shape, dtype), parsed from the file's header as safetensors lays it out (a little-endian u64
        length, then JSON) and checked against the file's size; read directly rather than through safe_open, which
        maps the whole file (and fails on a file larger than the machine's memory)."""
        try:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                n = int.from_bytes(f.read(8), "little")
                if not 2 <= n <= min(size - 8, 100 << 20):
                    raise ValueError(f"header length {n} in a {size}-byte file")
                header = json.loads(f.read(n))
            header.pop("__metadata__", None)
            out, end = {}, 0
            for key, entry in header.items():
                shape, dtype, (begin, stop) = tuple(entry["shape"]), entry["dtype"], entry["data_offsets"]
                if not (isinstance(dtype, str) and all(isinstance(d, int) and d >= 0 for d in shape)
                        and 0 <= begin <= stop):
                    raise ValueError(f"bad entry for {key}")
                out[key], end = (shape, dtype), max(end, stop)
            if end != size - 8 - n:
                raise ValueError(f"the header spans {end} bytes of data, the file holds {size - 8 - n}")
            return out
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None

    def keys(self) -> list[str]:
        return list(self.file_of)

    def shape(self, key: str) -> tuple[int, ...]:
        return self.header[key][0]

    def dtype_of(self, key: str) -> str:
        return self.header[key][1]

    def numel(self, key: str) -> int:
        n = 1
        for d in self.shape(key):
            n *= d
        return n

    def tensors(self, keys: list[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        wanted = self.keys() if keys is None else keys
        by_file: dict[str, list[str]] = {}
        for key in wanted:
            by_file.setdefault(self.file_of[key], []).append(key)
        for name, file_keys in by_file.items():
            path = self.directory / name
            try:
                with safe_open(path, framework="pt") as f:
                    for key in file_keys:
                        yield key, f.get_tensor(key)
            except (SafetensorError, OSError, ValueError, RuntimeError) as e:  # RuntimeError: torch's mmap
                raise CheckpointError(f"{path}: cannot read tensor data ({e})") from None


def _few(items: list[str], n: int = 5) -> str:
    return ", ".join(items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")


def hf_name(ours: str, prefix: str) -> str:
    return prefix + RENAMES.get(ours, ours)


def load_pretrained(path: str | os.PathLike, dtype: torch.dtype | None = None):
    """Reads a Hugging Face Gemma 3n checkpoint directory (eval mode): a Gemma3nForConditionalGeneration checkpoint
    becomes our whole `Gemma3n` (text decoder, audio and vision towers, their embedders), a Gemma3nForCausalLM one our
    `TextDecoder`. dtype: the parameters' dtype; by default the checkpoint's own."""
    path = Path(path)
    if layout_of(read_hf_config(path)) == CAUSAL_LM:
        return load_text_decoder(path, dtype)
    return _load_gemma3n(path, dtype)


def load_text_decoder(path: str | os.PathLike, dtype: torch.dtype | None = None) -> TextDecoder:
    """Reads the text decoder of a Gemma 3n checkpoint (either layout) into our TextDecoder (eval mode); the tensors
    of the audio and vision parts of a multimodal checkpoint are carried along, so that saving writes them back.

    dtype: the parameters' dtype; by default the checkpoint's own. Every text-decoder key must be present with the
    expected shape, and no unknown key may appear: either is an error that names the keys.
    """
    path = Path(path)
    hf_config = read_hf_config(path)
    cfg = TextConfig.from_hf_dict(hf_config)
    layout = layout_of(hf_config)
    prefix = TEXT_PREFIX[layout]
    reader = SafetensorsReader.open(path)
    check_fits_in_memory(path, reader, dtype, MULTIMODAL_PREFIXES)

    with torch.device("meta"):
        model = TextDecoder(cfg)
    expected = {hf_name(k, prefix): (k, tuple(v.shape)) for k, v in model.state_dict().items()}

    carried, unexpected = [], []
    for key in reader.keys():
        if key in expected:
            continue
        if key == "lm_head.weight":  # tied to the token embedding; the reference ignores the stored copy too
            continue
        if layout == CONDITIONAL_GENERATION and key.startswith(MULTIMODAL_PREFIXES):
            carried.append(key)
        elif _is_unused_shared_kv(key, prefix, cfg):
            continue
        else:
            unexpected.append(key)
    _check_keys_and_shapes(path, reader, expected, unexpected)
    _assign_tensors(model, reader, expected, dtype, prefix)
    model.init_buffers()
    model.hf_config = hf_config
    model.carried_tensors = {k: t for k, t in reader.tensors(carried)} if carried else {}
    return model.eval()


def _assign_tensors(model, reader: SafetensorsReader, expected: dict, dtype: torch.dtype | None, prefix: str) -> None:
    """Reads every expected tensor (in `dtype`, by default the checkpoint's own) into a meta-device model."""
    if dtype is None:
        dtype = _torch_dtype(reader.dtype_of(hf_name("embed_tokens.weight", prefix)))
    state = {expected[k][0]: t.to(dtype) for k, t in reader.tensors(list(expected))}
    model.load_state_dict(state, strict=True, assign=True)


# Our Gemma3n's submodules and where transformers keeps them (timm's model sits one level down in the vision tower).
TOWER_PREFIXES = {"vision_tower.": "model.vision_tower.timm_model.", "audio_tower.": "model.audio_tower.",
                  "embed_vision.": "model.embed_vision.", "embed_audio.": "model.embed_audio."}


def gemma3n_hf_name(ours: str) -> str:
    if ours.startswith("language_model."):
        return hf_name(ours[len("language_model."):], TEXT_PREFIX[CONDITIONAL_GENERATION])
    for prefix, hf_prefix in TOWER_PREFIXES.items():
        if ours.startswith(prefix):
            return hf_prefix + ours[len(prefix):]
    raise KeyError(ours)


def _load_gemma3n(path: Path, dtype: torch.dtype | None):
    from models.multimodal import Gemma3n, Gemma3nConfig

    hf_config = read_hf_config(path)
    cfg = Gemma3nConfig.from_hf_dict(hf_config)
    reader = SafetensorsReader.open(path)
    check_fits_in_memory(path, reader, dtype)
    prefix = TEXT_PREFIX[CONDITIONAL_GENERATION]
    # Built on the meta device and assigned the checkpoint's tensors (the PLE table alone is 2B parameters on E2B);
    # the towers hold no buffers, the text decoder re-creates its RoPE tables.
    with torch.device("meta"):
        model = Gemma3n(cfg)
    expected = {gemma3n_hf_name(k): (k, tuple(v.shape)) for k, v in model.state_dict().items()}
    unexpected = [k for k in reader.keys() if k not in expected and k != "lm_head.weight"
                  and not _is_unused_shared_kv(k, prefix, cfg.text)]
    _check_keys_and_shapes(path, reader, expected, unexpected)
    _assign_tensors(model, reader, expected, dtype, prefix)
    model.language_model.init_buffers()
    model.hf_config = hf_config
    return model.eval()


def machine_memory_bytes() -> int:
    """Physical memory, or the cgroup's limit where one is set below it (a container's)."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
    except OSError:
        return total
    return min(total, int(limit)) if limit.isdigit() else total


def check_fits_in_memory(path: Path, reader: SafetensorsReader, dtype: torch.dtype | None,
                         own_dtype: tuple[str, ...] = ()) -> None:
    """Refuses, from the shards' headers alone, a checkpoint whose tensors, loaded in `dtype` (those under the
    `own_dtype` prefixes, and all where dtype is None, in their own), exceed this machine's memory: loading would only
    end in the kernel's out-of-memory kill, part-way through."""
    need = 0
    for key in reader.keys():
        if key != "lm_head.weight":  # tied: never loaded
            cast = dtype is not None and not key.startswith(own_dtype)
            need += reader.numel(key) * (dtype if cast else _torch_dtype(reader.dtype_of(key))).itemsize
    have = machine_memory_bytes()
    if need > have:
        where = path / (INDEX_FILE if (path / INDEX_FILE).is_file() else SINGLE_FILE)
        as_ = f" as {str(dtype).removeprefix('torch.')}" if dtype is not None else ""
        raise CheckpointError(f"{where}: its tensors take {need / 1e9:.1f} GB loaded{as_}, more than this "
                              f"machine's {have / 1e9:.1f} GB of memory")


def _check_keys_and_shapes(path: Path, reader: SafetensorsReader, expected: dict, unexpected: list[str]) -> None:
    missing = sorted(set(expected) - set(reader.keys()))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys: {_few(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_few(sorted(unexpected))}")
        raise CheckpointError(f"{path}: does not match its config.json ({'; '.join(parts)})")
    for key, (_, shape) in expected.items():
        got = reader.shape(key)
        if got != shape:
            raise CheckpointError(f"{path}: {key} has shape {list(got)}, config.json implies {list(shape)}")


def _is_unused_shared_kv(key: str, prefix: str, cfg: TextConfig) -> bool:
    if not key.startswith(prefix + "layers."):
        return False
    rest = key[len(prefix + "layers.") :]
    idx, _, name = rest.partition(".")
    return idx.isdigit() and cfg.kv_shared_from[int(idx)] is not None and name.startswith(UNUSED_SHARED_KV)


def _torch_dtype(safetensors_dtype: str) -> torch.dtype:
    table = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
    if safetensors_dtype not in table:
        raise CheckpointError(f"unsupported weight dtype {safetensors_dtype} (F32, BF16 or F16)")
    return table[safetensors_dtype]


def save_pretrained(model, path: str | os.PathLike, max_shard_bytes: int = 4 << 30) -> None:
    """Writes `model` (a TextDecoder or a whole Gemma3n) in the layout it was loaded from (Gemma3nForCausalLM for a
    TextDecoder built from a config, Gemma3nForConditionalGeneration for a Gemma3n)."""
    if not isinstance(model, TextDecoder):
        return _save_gemma3n(model, path, max_shard_bytes)
    hf_config = dict(getattr(model, "hf_config", None) or {"model_type": "gemma3n_text"})
    layout = layout_of(hf_config)
    prefix = TEXT_PREFIX[layout]
    if layout == CONDITIONAL_GENERATION:
        hf_config["text_config"] = model.config.to_hf_text_dict(hf_config.get("text_config"))
    else:
        hf_config = model.config.to_hf_text_dict(hf_config)
    hf_config["architectures"] = [layout]
    hf_config["dtype"] = str(model.embed_tokens.weight.dtype).removeprefix("torch.")
    tensors = {hf_name(k, prefix): v for k, v in model.state_dict().items()}
    tensors.update(getattr(model, "carried_tensors", {}))
    write_checkpoint(path, hf_config, tensors.items(), max_shard_bytes)


def _save_gemma3n(model, path, max_shard_bytes: int) -> None:
    hf_config = dict(getattr(model, "hf_config", None) or {"model_type": "gemma3n"})
    hf_config["text_config"] = model.config.text.to_hf_text_dict(hf_config.get("text_config"))
    hf_config["architectures"] = [CONDITIONAL_GENERATION]
    hf_config["dtype"] = str(model.language_model.embed_tokens.weight.dtype).removeprefix("torch.")
    tensors = ((gemma3n_hf_name(k), v) for k, v in model.state_dict().items())
    write_checkpoint(path, hf_config, tensors, max_shard_bytes)


def write_checkpoint(
    path: str | os.PathLike,
    hf_config: dict,
    tensors,
    max_shard_bytes: int = 4 << 30,
    extra_files: dict[str, bytes] | None = None,
) -> None:
    """Writes config.json and safetensors shards into a temporary directory, then renames it to `path`, so a failure
    never leaves a half-written checkpoint. `tensors` is an iterable of (name, tensor) and may be a generator: each
    tensor is written as it comes and not kept (_ShardWriter), so a generator that makes one tensor at a time writes a
    model larger than memory."""
    with atomic_directory(path) as tmp:
        weight_map: dict[str, int] = {}
        written: list[Path] = []
        shard = _ShardWriter(tmp / "shard-00001.tmp")
        for name, tensor in tensors:
            if name in weight_map:
                raise CheckpointError(f"{name}: written twice")
            nbytes = tensor.numel() * tensor.element_size()
            if shard.entries and shard.size + nbytes > max_shard_bytes:
                written.append(shard.finish())
                shard = _ShardWriter(tmp / f"shard-{len(written) + 1:05d}.tmp")
            shard.add(name, tensor)
            weight_map[name] = len(written) + 1
        written.append(shard.finish())

        total = len(written)
        if total == 1:
            os.replace(written[0], tmp / SINGLE_FILE)
        else:
            names = {i + 1: f"model-{i + 1:05d}-of-{total:05d}.safetensors" for i in range(total)}
            for i, tmp_name in enumerate(written):
                os.replace(tmp_name, tmp / names[i + 1])
            index = {
                "metadata": {"total_size": sum((tmp / n).stat().st_size for n in names.values())},
                "weight_map": {k: names[v] for k, v in sorted(weight_map.items())},
            }
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
        for name, data in (extra_files or {}).items():
            (tmp / name).write_bytes(data)


SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.int64: "I64",
                      torch.int32: "I32", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}


class _ShardWriter:
    """One safetensors file written tensor by tensor: the data goes to a side file as each tensor arrives, and
    finish() writes the header (known only when the shard is complete) followed by that data. safetensors' own
    save_file needs the whole shard in memory and copies it once more into bytes: 2x the shard, and a 4.7 GB PLE
    table alone in its shard at E4B size."""

    def __init__(self, path: Path):
        self.path, self.data = path, path.with_suffix(".data")
        self.file = open(self.data, "wb")
        self.entries: dict[str, dict] = {}
        self.size = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        t = tensor.detach().contiguous()
        if t.dtype not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"{name}: dtype {t.dtype} cannot be written to safetensors")
        nbytes = t.numel() * t.element_size()
        self.entries[name] = {"dtype": SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape),
                              "data_offsets": [self.size, self.size + nbytes]}
        if nbytes:
            self.file.write(t.reshape(-1).view(torch.uint8).numpy().data)
        self.size += nbytes

    def finish(self) -> Path:
        import shutil
        import struct

        self.file.close()
        header = json.dumps({"__metadata__": {"format": "pt"}, **self.entries}, separators=(",", ":")).encode()
        header += b" " * (-len(header) % 8)  # the data starts 8-byte aligned, as safetensors writes it
        with open(self.path, "wb") as out, open(self.data, "rb") as data:
            out.write(struct.pack("<Q", len(header)) + header)
            shutil.copyfileobj(data, out, 64 << 20)
        self.data.unlink()
        return self.path
