"""LiteRT target: our TextDecoder lowered with litert-torch and packed into a .litertlm that Google's LiteRT-LM runs.

What LiteRT-LM expects of a Gemma 3n model (its CPU executor, and litert-torch's own Gemma 3n export whose output it
runs), and what this module writes:

- `decoder.tflite` (section TFLiteModel/prefill_decode): signatures `prefill_<T>` (one per spec.prefill_lengths) and
  `decode`. Inputs `embeddings [1,T,H]`, `per_layer_embeddings [1,T,L,P]`, `input_pos [T] int32`,
  `mask [1,1,T,C]` and per cache-owning layer i `kv_cache_k_<i> [1,K,C,D]`, `kv_cache_v_<i> [1,K,D,C]` (V stored
  transposed); outputs the updated caches under the same names and `logits` ([1,1,V]; a prefill without the
  KV-shared optimisation returns [1,T,V]).
- `embedder.tflite` (signature `embedder`) and `per_layer_embedder.tflite` (signature `per_layer_embedder`): the two
  table lookups, `token_ids [1,1] int32 -> embeddings`, which the engine runs per token on the CPU. The PLE table
  lives only there; spec.ple_storage "int8" stores it int8 per row (weight-only), anything else as float32.
- the tokenizer (SentencePiece) and LlmMetadata (model type gemma3n, BOS as start token, stop tokens, context length).

export_litert keeps the three .tflite files next to model.litertlm: tests and our own runtime run them directly.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

import torch
from torch import Tensor, nn

from exporters.spec import ExportSpec
from models.errors import InputError
from models.text import TextDecoder

DECODER_FILE = "decoder.tflite"
EMBEDDER_FILE = "embedder.tflite"
PER_LAYER_EMBEDDER_FILE = "per_layer_embedder.tflite"
LITERTLM_FILE = "model.litertlm"
CHAT_STOP_MARKER = "<end_of_turn>"


class LiteRtLmDecoder(nn.Module):
    """forward_embeddings over the functional KV cache, with LiteRT-LM's tensor names and cache layouts.

    Two deliberate differences from the runtime's view:
    - The cache is written at input_pos[0] + arange(T), not at input_pos itself. LiteRT-LM pads a short prompt chunk
      and sets the padded rows' positions to 0; contiguous positions send the padding to future slots (which later
      tokens overwrite before anything attends to them) instead of over position 0. The lowered scatter drops writes
      past the cache end, as StableHLO scatter does with out-of-bounds updates.
    - `mask` is accepted (LiteRT-LM recognises the signature by it) but not read: the runtime fills it causally,
      which is exactly the global mask the model builds from the positions, and the model also needs the sliding-window
      mask, which it builds the same way.
    """

    def __init__(self, model: TextDecoder, last_position_only: bool):
        super().__init__()
        self.model = model
        self.last_position_only = last_position_only
        self.owners = model.config.cache_owning_layers

    def forward(self, embeddings: Tensor, per_layer_embeddings: Tensor, input_pos: Tensor, mask: Tensor, **kv: Tensor):
        positions = input_pos[:1].long() + torch.arange(embeddings.shape[1])
        cache = [(kv[f"kv_cache_k_{i}"], kv[f"kv_cache_v_{i}"].transpose(2, 3)) for i in self.owners]
        logits, cache = self.model.forward_embeddings(
            embeddings, per_layer_embeddings, positions, self.last_position_only, kv_cache=cache
        )
        out = {}
        for i, (k, v) in zip(self.owners, cache):
            out[f"kv_cache_k_{i}"], out[f"kv_cache_v_{i}"] = k, v.transpose(2, 3)
        out["logits"] = logits
        return out


class TableLookup(nn.Module):
    """One token id -> its scaled row of one of the model's lookup tables (`embed` or `per_layer_embedding`)."""

    def __init__(self, model: TextDecoder, table: str):
        super().__init__()
        self.model, self.table = model, table

    def forward(self, token_ids: Tensor):
        ids = token_ids.clamp(min=0).long()  # the engine may pass -1 for an empty slot
        return {"embeddings": getattr(self.model, self.table)(ids)}


def decoder_sample_inputs(model: TextDecoder, tokens: int, cache_len: int) -> dict[str, Tensor]:
    """Zero inputs of one signature, in LiteRT-LM's names and shapes."""
    cfg = model.config
    inputs = {
        "embeddings": torch.zeros(1, tokens, cfg.hidden_size),
        "per_layer_embeddings": torch.zeros(1, tokens, cfg.num_layers, cfg.hidden_size_per_layer_input),
        "input_pos": torch.arange(tokens, dtype=torch.int32),
        "mask": torch.zeros(1, 1, tokens, cache_len),
    }
    for i in cfg.cache_owning_layers:
        inputs[f"kv_cache_k_{i}"] = torch.zeros(1, cfg.num_kv_heads, cache_len, cfg.head_dim)
        inputs[f"kv_cache_v_{i}"] = torch.zeros(1, cfg.num_kv_heads, cfg.head_dim, cache_len)
    return inputs


def convert_decoder(model: TextDecoder, spec: ExportSpec, path: Path) -> Path:
    import litert_torch

    converter = litert_torch.Converter()
    for tokens in spec.prefill_lengths:
        prefill = LiteRtLmDecoder(model, last_position_only=spec.kv_shared_prefill)
        converter.signature(f"prefill_{tokens}", prefill, sample_kwargs=decoder_sample_inputs(model, tokens, spec.cache_len))
    decode = LiteRtLmDecoder(model, last_position_only=False)
    converter.signature("decode", decode, sample_kwargs=decoder_sample_inputs(model, 1, spec.cache_len))
    converter.convert().export(str(path))
    return path


def convert_lookup(module: nn.Module, signature: str, path: Path) -> Path:
    import litert_torch

    sample = {"token_ids": torch.zeros(1, 1, dtype=torch.int32)}
    litert_torch.signature(signature, module, sample_kwargs=sample).convert().export(str(path))
    return path


# --- quantization (ai-edge-quantizer) --------------------------------------------------------------------------------


def quantize(path: Path, recipe_name: str, block_size: int = 32) -> Path:
    """Quantizes a .tflite in place with the named ai-edge-quantizer recipe. Blockwise recipes leave the ops whose
    weights do not divide into blocks (Gemma 3n's AltUp coefficients, [A*A, A]) at int8 per channel."""
    from ai_edge_quantizer import quantizer, recipe

    q = quantizer.Quantizer(str(path))
    q.load_quantization_recipe(getattr(recipe, recipe_name)())
    if re.search(r"b\d+_", recipe_name):
        for scope in _scopes_not_dividing(path, block_size):
            q.add_dynamic_config(regex=re.escape(scope), operation_name="*", num_bits=8)
    data = q.quantize().quantized_model
    tmp = path.with_name(path.name + ".q")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return path


def _scopes_not_dividing(path: Path, block_size: int) -> set[str]:
    """Scopes (ai-edge-quantizer's op names) of the ops with a constant float weight whose last dim is not a multiple
    of the block size."""
    from ai_edge_quantizer.utils import tfl_flatbuffer_utils as tfl

    model = tfl.read_model(str(path))
    scopes = set()
    for subgraph in model.subgraphs:
        for op in subgraph.operators:
            for index in op.inputs:
                tensor = subgraph.tensors[index] if index >= 0 else None
                if tensor is None or model.buffers[tensor.buffer].data is None:
                    continue
                shape = list(tensor.shape)
                if len(shape) >= 2 and shape[-1] % block_size:
                    scopes.add(tfl.get_op_scope(op, subgraph.tensors))
    return scopes


# --- LLM metadata and packing ------------------------------------------------------------------------------------


def llm_metadata(model: TextDecoder, spec: ExportSpec, tokenizer_path: Path):
    """LlmMetadata: Gemma 3n model type, BOS as start token, the config's EOS ids and the tokenizer's <end_of_turn>
    as stop tokens, Gemma's turn markers as prompt templates, the cache length as the context length."""
    import sentencepiece as spm
    from litert_lm_builder.runtime.proto import llm_metadata_pb2, llm_model_type_pb2

    cfg = model.config
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_path))
    meta = llm_metadata_pb2.LlmMetadata()
    meta.start_token.token_ids.ids.append(cfg.bos_token_id)
    stops = list(cfg.eos_token_ids)
    marker = sp.piece_to_id(CHAT_STOP_MARKER)
    if marker != sp.unk_id() and marker not in stops:
        stops.append(marker)
    for token in stops:
        meta.stop_tokens.add().token_ids.ids.append(token)
    meta.max_num_tokens = spec.cache_len
    meta.llm_model_type.CopyFrom(llm_model_type_pb2.LlmModelType(gemma3n=llm_model_type_pb2.Gemma3N()))
    for role, name in ((meta.prompt_templates.user, "user"), (meta.prompt_templates.model, "model")):
        role.prefix, role.suffix = f"<start_of_turn>{name}\n", "<end_of_turn>\n"
    return meta


def pack_litertlm(work: Path, metadata, tokenizer_path: Path, out: Path) -> Path:
    import litert_lm_builder as lb

    meta_path = work / "llm_metadata.pb"
    meta_path.write_bytes(metadata.SerializeToString())
    builder = lb.LitertLmFileBuilder()
    builder.add_system_metadata(lb.Metadata(key="Authors", value="gemma3n-mobile", dtype=lb.DType.STRING))
    builder.add_llm_metadata(str(meta_path))
    builder.add_sentencepiece_tokenizer(str(tokenizer_path))
    builder.add_tflite_model(str(work / DECODER_FILE), lb.TfLiteModelType.PREFILL_DECODE)
    builder.add_tflite_model(str(work / EMBEDDER_FILE), lb.TfLiteModelType.EMBEDDER)
    builder.add_tflite_model(str(work / PER_LAYER_EMBEDDER_FILE), lb.TfLiteModelType.PER_LAYER_EMBEDDER)
    with open(out, "wb") as f:
        builder.build(f)
    make_reproducible(out)
    return out


def make_reproducible(path: Path) -> None:
    """litert_lm_builder stamps every file with a random uuid and the current time; replace both, in place and at the
    same length, with values derived from the file's content, so the same model always gives the same bytes."""
    import hashlib
    import io
    import uuid

    from litert_lm_builder import litertlm_peek

    data = path.read_bytes()
    header = litertlm_peek.read_litertlm_header(str(path), io.StringIO())
    stamps = {}
    for i in range(header.SystemMetadata().EntriesLength()):
        entry = litertlm_peek.kvp_to_dict(header.SystemMetadata().Entries(i))
        if entry["key"] in ("uuid", "creation_timestamp"):
            stamps[entry["key"]] = str(entry["value"])
    for value in stamps.values():
        data = data.replace(value.encode(), b"\0" * len(value), 1)
    digest = hashlib.sha256(data).hexdigest()
    fixed = {"uuid": str(uuid.uuid5(uuid.NAMESPACE_OID, digest))}
    for key, value in stamps.items():
        new = fixed[key] if key == "uuid" else _same_length_time(value)
        data = data.replace(b"\0" * len(value), new.encode(), 1)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _same_length_time(value: str) -> str:
    """The epoch of reproducible builds (1980-01-01, as in zip files) in the original's ISO format and length."""
    fixed = "1980-01-01T00:00:00.000000+00:00" if "." in value else "1980-01-01T00:00:00+00:00"
    if len(fixed) != len(value):
        raise ValueError(f"unexpected creation_timestamp format {value!r}")
    return fixed


# --- the target ----------------------------------------------------------------------------------------------------


def export_litert(model: TextDecoder, spec: ExportSpec, out_dir: str | Path, tokenizer_path: str | Path) -> Path:
    """Writes out_dir/model.litertlm (and the decoder, embedder and per-layer embedder .tflite files beside it);
    returns the .litertlm path. Everything is built in a temporary folder inside out_dir and moved at the end."""
    tokenizer_path = Path(tokenizer_path)
    if spec.target != "litert":
        raise InputError(f"export spec: target is {spec.target!r}, expected 'litert'")
    if tokenizer_path.suffix != ".model" or not tokenizer_path.is_file():
        raise InputError(f"{tokenizer_path}: expected a SentencePiece tokenizer.model file")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = model.eval().float()
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".litert-") as tmp, torch.no_grad():
        work = Path(tmp)
        convert_decoder(model, spec, work / DECODER_FILE)
        convert_lookup(TableLookup(model, "embed"), "embedder", work / EMBEDDER_FILE)
        convert_lookup(TableLookup(model, "per_layer_embedding"), "per_layer_embedder", work / PER_LAYER_EMBEDDER_FILE)
        if spec.recipe:
            quantize(work / DECODER_FILE, spec.recipe, spec.block_size)
            quantize(work / EMBEDDER_FILE, spec.recipe, spec.block_size)
        if spec.ple_storage == "int8":
            quantize(work / PER_LAYER_EMBEDDER_FILE, "weight_only_wi8_afp32")
        pack_litertlm(work, llm_metadata(model, spec, tokenizer_path), tokenizer_path, work / LITERTLM_FILE)
        for name in (DECODER_FILE, EMBEDDER_FILE, PER_LAYER_EMBEDDER_FILE, LITERTLM_FILE):
            os.replace(work / name, out_dir / name)
    return out_dir / LITERTLM_FILE
