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
  lives only there; spec.ple_storage "int8" / "int4" stores it so (PleLookup: converted as int8 bytes, never as a
  float table), anything else as float32.
- the tokenizer (SentencePiece) and LlmMetadata (model type gemma3n, BOS as start token, stop tokens, context length).

A whole Gemma 3n (spec.encoders) adds its encoders as the sections LiteRT-LM's vision and audio executors load, in
the layouts they feed (read from LiteRT-LM's runtime/executor/{vision,audio}_litert_compiled_model_executor.cc,
runtime/conversation/model_data_processor/gemma3_data_processor.cc, runtime/components/preprocessor/
stb_image_preprocessor.cc and embedding_lookup/, and litert-torch's export_hf/model_ext/gemma3n/vision_exportable.py):

- `vision_encoder.tflite` (vision_encoder): signature `vision_<S>`, `images [1,S,S,3]` float32 RGB in [0, 1],
  channels LAST (the engine resizes the decoded image to the input's H x W with stb and divides by 255) ->
  `features [1,256,2048]` (the soft tokens, scaled by sqrt(2048)). Exactly one signature: the engine's vision
  executor takes signature 0 and aborts (SIGILL) on a multi-signature encoder, and the metadata's image size is the
  spec's first. Further spec.image_sizes go to `vision_encoder_sizes.tflite` (signatures `vision_<S>`, weights shared
  between them), packed as an earlier vision_encoder section: the engine keeps the LAST section of a type (observed
  with litert-lm-api 0.18.1: the other order crashes it), our runtime reads them all.
- `vision_adapter.tflite` (vision_adapter): `vision_adapter`, `soft_tokens [1,256,2048]` -> `mm_embedding
  [1,257,H]`: the 256 image embeddings and then the <end_of_image> row, as litert-torch's Gemma 3n adapter appends it
  (the engine writes all adapter rows after <start_of_image> and has no end-of-image model for Gemma 3n). Our row is
  the vision embedder's hard-token embedding of eoi, as transformers computes it (litert-torch takes the text table's).
- `audio_encoder.tflite` (audio_encoder_hw, the engine's "static" encoder): `audio_encoder`, `src_inputs [1,F,128]`
  float32 log-mel, `mask [1,F]` bool (True = valid frame) -> `features [1,188,D]`, `mask [1,188]` bool (True =
  valid). F = 3008 = 16 x 188, not our 2997: the engine cuts the spectrogram into F-frame chunks and requires F to be
  a multiple of the adapter's token count. The conformer is causal (conv stem, cumulative norm, left-context
  attention, causal light conv), so the 11 extra frames change no token; our runtime pads 2997 -> 3008 with zeros.
- `audio_adapter.tflite` (audio_adapter): `audio_adapter`, `features [1,188,D]`, `mask [1,188]` bool ->
  `audio_embeddings [1,188,H]`; masked tokens take the embedding of the audio vocabulary's last id, as
  models.encoders.AudioAdapter (the engine reads the valid rows only).
- `end_of_audio.tflite` (end_of_audio): `end_of_audio`, no inputs -> `embeddings [1,1,H]`, the <end_of_audio> row
  the engine writes after an audio clip.
- The metadata's Gemma3N fields: start/end of image and audio as the tokenizer's pieces for the model's media ids,
  image_tensor_height/width the first image size.
- `embedder.tflite` of a whole model gives the ids of the embedders' own vocabularies (<end_of_image>, ...) their
  hard-token rows, as Gemma3n.embed_prompt does: the engine embeds every prompt and generated id through it.

Checked with Google's engine (tests/test_export_litert_encoders.py): a conversation with an image gives exactly the
greedy tokens of our torch model on the sequence the engine builds (text, '\n\n' + <start_of_image>, the adapter's
257 rows, '\n\n', text; placeholders read PLE row 0, as media ids do in transformers); an audio clip takes as many
tokens as our encoder's mask marks valid, then the end_of_audio row. More image sizes cost a second copy of the
vision weights (the sizes section), since a section cannot share another's weights here.

LiteRT-LM's audio executor also has a stateful streaming encoder (inputs segment_values, segment_mask, prev_mask,
feature_state_*), which its comments name as Gemma 3n's; ours is the static one, which it runs as well. What the
engine accepts through its Python API (litert_lm 0.18.1): images and audio as files or bytes in a Conversation's
messages (Engine(vision_backend=..., audio_backend=...)); Session.run_prefill takes text only. It computes its own
log-mel spectrogram (USM settings: input x 32768, mel 125-7500 Hz, floor 1e-6, normalised; not transformers'
feature extractor, so its audio tokens are not ours) and gives a clip as many tokens as the encoder's mask marks
valid (no padding tokens, unlike transformers' 188 per window).

export_litert keeps every .tflite next to model.litertlm: tests and our own runtime run them directly.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from contract.bundle import (
    DECODE,
    LITERT_AUDIO_FRAMES,
    LITERTLM_FILE,
    prefill_name,
    vision_signature,
)
from exporters.memo import memoized
from exporters.ple import QUANTIZED, PerLayerEmbedder
from exporters.spec import EMBEDDING_BLOCK, ExportSpec, check_target, export_folder, split_model
from exporters.weights import decoder_half, float32_copy, release_checkpoint_pages
from models.encoders import AudioAdapter, AudioEncoder, VisionAdapter, VisionEncoder
from models.errors import InputError
from models.float32 import float32_
from models.multimodal import Gemma3n
from models.text import CacheOps, TextDecoder, in_dtype

DECODER_FILE = "decoder.tflite"
EMBEDDER_FILE = "embedder.tflite"
PER_LAYER_EMBEDDER_FILE = "per_layer_embedder.tflite"
VISION_ENCODER_FILE = "vision_encoder.tflite"  # the first image size: what LiteRT-LM runs
VISION_ENCODER_SIZES_FILE = "vision_encoder_sizes.tflite"  # the other image sizes, for our runtime
VISION_ADAPTER_FILE = "vision_adapter.tflite"
AUDIO_ENCODER_FILE = "audio_encoder.tflite"
AUDIO_ADAPTER_FILE = "audio_adapter.tflite"
END_OF_AUDIO_FILE = "end_of_audio.tflite"
CHAT_STOP_MARKER = "<end_of_turn>"


def dynamic_update_slice(cache: Tensor, new: Tensor, start: Tensor, dim: int) -> Tensor:
    """models.text.write_rows as TFLite's DYNAMIC_UPDATE_SLICE (litert-torch's custom op, as its own export_hf
    writes caches)."""
    from litert_torch.generative.custom_ops.dynamic_update_slice import (
        dynamic_update_slice as update,
    )

    zero = torch.zeros((), dtype=torch.int32)
    return update(cache, new, [start.to(torch.int32) if d == dim else zero for d in range(cache.ndim)])


def batch_matmul_nt(a: Tensor, b: Tensor) -> Tensor:
    """models.text.matmul_nt as one BATCH_MATMUL with adj_y (litert-torch's bmm_4d): no TRANSPOSE of the cache."""
    from litert_torch.generative.custom_ops.bmm_4d import bmm_4d

    return bmm_4d(a, b)


# Measured on the speed issue's E2B-shaped model (prefill 128, cache 1024, int8, 2 threads, ai_edge_litert's
# Interpreter): 140 ms a prefill call with index_copy caches (STABLEHLO_SCATTER, outside XNNPACK, copying the cache)
# and whole-cache transposes of V, 55 ms with these two.
LITERT_CACHE_OPS = CacheOps(write=dynamic_update_slice, matmul_nt=batch_matmul_nt)


class LiteRtLmDecoder(nn.Module):
    """forward_embeddings over the functional KV cache, with LiteRT-LM's tensor names and cache layouts (V stored
    transposed, as the model's functional cache keeps it).

    Two deliberate differences from the runtime's view:
    - The cache is written at input_pos[0] + arange(T), not at input_pos itself. LiteRT-LM pads a short prompt chunk
      and sets the padded rows' positions to 0; contiguous positions send the padding to future slots (which later
      tokens overwrite before anything attends to them) instead of over position 0. As in litert-torch's own export,
      a chunk that would run past the cache end is written at C - T instead (DYNAMIC_UPDATE_SLICE clamps its start);
      our runtime never sends one.
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
        cache = [(kv[f"kv_cache_k_{i}"], kv[f"kv_cache_v_{i}"]) for i in self.owners]
        logits, cache = self.model.forward_embeddings(
            embeddings, per_layer_embeddings, positions, self.last_position_only, kv_cache=cache,
            cache_ops=LITERT_CACHE_OPS,
        )
        out = {}
        for i, (k, v) in zip(self.owners, cache):
            out[f"kv_cache_k_{i}"], out[f"kv_cache_v_{i}"] = k, v
        out["logits"] = logits
        return out


class TableLookup(nn.Module):
    """One token id -> its scaled row of the token embedding, in float32 (the caller's model keeps its dtype).

    media_embedders: a whole Gemma 3n's vision and audio embedders. The ids of their own small vocabularies
    (<end_of_image>, <end_of_audio>, ...) take the embedders' hard-token embeddings instead of the text table's rows,
    as Gemma3n.embed_prompt and transformers embed them: the engine looks up every text id, prompt or generated,
    through this one model. Those rows depend on the id alone, so they are computed here once, a constant table."""

    def __init__(self, model: TextDecoder, media_embedders: tuple[nn.Module, ...] = ()):
        super().__init__()
        # Scaled before the lookup, the product each gathered row had: only the table is a constant of the graph.
        scale = in_dtype(model.embed_scale, torch.float32)
        self.register_buffer("rows", model.embed_tokens.weight.detach().float() * scale)
        self.media_ranges = [(e.vocab_offset, e.vocab_size) for e in media_embedders]
        with torch.no_grad():
            for i, e in enumerate(media_embedders):
                ids = torch.arange(e.vocab_offset, e.vocab_offset + e.vocab_size)[None]
                self.register_buffer(f"media_rows_{i}", float32_copy(e).embed_ids(ids)[0].contiguous())

    def forward(self, token_ids: Tensor):
        ids = token_ids.clamp(min=0).long()  # the engine may pass -1 for an empty slot
        rows = F.embedding(ids, self.rows)
        for i, (offset, size) in enumerate(self.media_ranges):
            owned = (ids >= offset) & (ids < offset + size)
            media = F.embedding((ids - offset).clamp(0, size - 1), getattr(self, f"media_rows_{i}"))
            rows = torch.where(owned.unsqueeze(-1), media, rows)
        return {"embeddings": rows}


class PleLookup(nn.Module):
    """One token id -> its per-layer rows [1, 1, L, P], from the PLE table as exporters.ple.PerLayerEmbedder stores
    it: "int8" and "int4" convert straight to int8 bytes and scales (an int8 EMBEDDING_LOOKUP, a CAST and the scale
    row's MUL, int4's unpacking between them; the same numbers as the asset and the .ptd), so that no float32 copy of
    the table (8 GB on E2B, past TFLite's 2 GB flatbuffer) is ever made; any other storage is float32."""

    def __init__(self, model: TextDecoder, storage: str):
        super().__init__()
        self.rows = PerLayerEmbedder(model, storage if storage in QUANTIZED else "fp32")

    def forward(self, token_ids: Tensor):
        return {"embeddings": self.rows(token_ids)}


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


def convert(signatures: list[tuple[str, nn.Module, dict]], path: Path, lightweight: bool = False) -> Path:
    """One .tflite holding the given (name, module, sample kwargs) signatures (exporters.memo: a repeat is a copy).

    lightweight: the converter reads the large float32 weights where they are instead of copying each into its IR
    and again into the flatbuffer. Measured on an 8-layer decoder of E2B's widths (0.59B parameters): 0.8 GB over
    the model's own memory, against 5.1 GB; a whole E2B decoder the other way needs 3x its 9.5 GB. But it folds no
    constant expression over such a weight: the encoders' layer scales stayed runtime MULs over float32 weights,
    which the quantizer then left float (183 MB of E2B's vision encoder), and 3x3 kernels runtime TRANSPOSEs, so
    only the decoder, whose weights reach its Linears as they are, takes it. Its runtime constant folding, which
    would fold those, writes boolean constants (the audio encoder's masks) with no data: off."""
    import litert_torch

    def run(out: Path) -> None:
        converter = litert_torch.Converter()
        for name, module, sample in signatures:
            converter.signature(name, module.eval(), sample_kwargs=sample)
        options = {"lightweight_conversion": True, "runtime_constant_folding": False} if lightweight else {}
        converter.convert(**options).export(str(out))

    # From which size lightweight conversion keeps a weight in place: litert_torch's setting (1 MB; tests lower it
    # so that the tiny model's weights take the path a real model's do), part of what a conversion is.
    threshold = f" in place from {litert_torch.config.resource_constant_numel_threshold} B" if lightweight else ""
    return memoized(signatures, f"litert_torch {litert_torch.__version__}{threshold}", path, run)


def convert_decoder(model: TextDecoder, spec: ExportSpec, path: Path) -> Path:
    """The decoder's signatures over a float32 copy of its half (exporters.weights.decoder_half, scales folded),
    which lives for this call only."""
    source, model = model, float32_(decoder_half(model, fold_scales=True))
    release_checkpoint_pages(source)
    signatures = [(prefill_name(tokens), LiteRtLmDecoder(model, last_position_only=spec.kv_shared_prefill),
                   decoder_sample_inputs(model, tokens, spec.cache_len)) for tokens in spec.prefill_lengths]
    decode = LiteRtLmDecoder(model, last_position_only=False)
    return convert([*signatures, (DECODE, decode, decoder_sample_inputs(model, 1, spec.cache_len))], path,
                   lightweight=True)


def convert_lookup(module: nn.Module, signature: str, path: Path) -> Path:
    return convert([(signature, module, {"token_ids": torch.zeros(1, 1, dtype=torch.int32)})], path)


# --- the encoders, in LiteRT-LM's layouts (see the module docstring) --------------------------------------------------


class LiteRtLmVisionEncoder(nn.Module):
    """images [1, S, S, 3] (channels last, in [0, 1]) -> features [1, 256, C]: models.encoders.VisionEncoder."""

    def __init__(self, model: Gemma3n):
        super().__init__()
        self.encoder = VisionEncoder(model)

    def forward(self, images: Tensor):
        return {"features": self.encoder(images.permute(0, 3, 1, 2))}


class LiteRtLmVisionAdapter(nn.Module):
    """soft_tokens [1, 256, C] -> mm_embedding [1, 257, H]: the image's embeddings, then the <end_of_image> row."""

    def __init__(self, model: Gemma3n):
        super().__init__()
        self.adapter = VisionAdapter(model)
        self.eoi = model.config.tokens.eoi

    def forward(self, soft_tokens: Tensor):
        eoi = self.adapter.embedder.embed_ids(torch.full((1, 1), self.eoi, dtype=torch.long))
        return {"mm_embedding": torch.cat([self.adapter(soft_tokens), eoi], dim=1)}


class LiteRtLmAudioEncoder(nn.Module):
    """src_inputs [1, F, 128], mask [1, F] bool (True = valid) -> features [1, N, D], mask [1, N] bool (True = valid):
    models.encoders.AudioEncoder with LiteRT-LM's names and mask polarity."""

    def __init__(self, model: Gemma3n):
        super().__init__()
        self.encoder = AudioEncoder(model)

    def forward(self, src_inputs: Tensor, mask: Tensor):
        features, padded = self.encoder.tower(src_inputs, ~mask)
        return {"features": features, "mask": ~padded}


class LiteRtLmAudioAdapter(nn.Module):
    """features [1, N, D], mask [1, N] bool (True = valid) -> audio_embeddings [1, 188, H]:
    models.encoders.AudioAdapter."""

    def __init__(self, model: Gemma3n):
        super().__init__()
        self.adapter = AudioAdapter(model)

    def forward(self, features: Tensor, mask: Tensor):
        return {"audio_embeddings": self.adapter(features, (~mask).to(features.dtype))}


class EndOfMedia(nn.Module):
    """No inputs -> embeddings [1, 1, H]: an embedder's hard-token row (LiteRT-LM's end_of_audio model), computed
    once here in float32 and written as a constant: the embedder's table and projection converted to give it were
    12.6 MB of E2B's .litertlm."""

    def __init__(self, embedder: nn.Module, token_id: int):
        super().__init__()
        ids = torch.full((1, 1), token_id, dtype=torch.long)
        with torch.no_grad():
            self.register_buffer("row", float32_copy(embedder).embed_ids(ids).contiguous())

    def forward(self):
        return {"embeddings": self.row}


def convert_vision_encoder(model: Gemma3n, sizes: tuple[int, ...], path: Path) -> Path:
    encoder = float32_copy(LiteRtLmVisionEncoder(model))
    return convert([(vision_signature(size), encoder, {"images": torch.zeros(1, size, size, 3)}) for size in sizes],
                   path)


def convert_encoders(model: Gemma3n, spec: ExportSpec, work: Path) -> list[tuple[str, str]]:
    """Lowers the encoders spec.encoders names; returns (file, LiteRT-LM model type) in packing order."""

    def convert_one(module: nn.Module, signature: str, sample: dict, file: str) -> str:
        convert([(signature, float32_copy(module), sample)], work / file)
        return file

    sections = []
    if "vision" in spec.encoders:
        first, *others = spec.image_sizes
        if others:  # before the first size's section: the engine keeps the last section of a type
            convert_vision_encoder(model, tuple(others), work / VISION_ENCODER_SIZES_FILE)
            sections.append((VISION_ENCODER_SIZES_FILE, "VISION_ENCODER"))
        convert_vision_encoder(model, (first,), work / VISION_ENCODER_FILE)
        sections.append((VISION_ENCODER_FILE, "VISION_ENCODER"))
        soft = torch.zeros(1, model.config.tokens.image_soft_tokens, model.config.vision_embedder.hidden_size)
        sections.append((convert_one(LiteRtLmVisionAdapter(model), "vision_adapter", {"soft_tokens": soft},
                                 VISION_ADAPTER_FILE), "VISION_ADAPTER"))
    if "audio" in spec.encoders:
        frames = torch.ones(1, LITERT_AUDIO_FRAMES, dtype=torch.bool)
        features = torch.zeros(1, LITERT_AUDIO_FRAMES, model.config.audio.input_feat_size)
        sample = {"src_inputs": features, "mask": frames}
        sections.append((convert_one(LiteRtLmAudioEncoder(model), "audio_encoder", sample, AUDIO_ENCODER_FILE),
                         "AUDIO_ENCODER_HW"))
        tokens = model.config.tokens.audio_soft_tokens
        sample = {"features": torch.zeros(1, tokens, model.config.audio.hidden_size),
                  "mask": torch.ones(1, tokens, dtype=torch.bool)}
        sections.append((convert_one(LiteRtLmAudioAdapter(model), "audio_adapter", sample, AUDIO_ADAPTER_FILE),
                         "AUDIO_ADAPTER"))
        sections.append((convert_one(EndOfMedia(model.embed_audio, model.config.tokens.eoa), "end_of_audio", {},
                                 END_OF_AUDIO_FILE), "END_OF_AUDIO"))
    return sections


# --- quantization (ai-edge-quantizer) --------------------------------------------------------------------------------


# The token embedder's table in int8 (the PLE table is converted int8 directly: PleLookup): with the dynamic recipe
# EMBEDDING_LOOKUP reads the int8 rows and scales the rows it gathers; the weight-only recipe adds a DEQUANTIZE that the
# runtime evaluates once into a float32 copy of the whole table (E2B-shaped model, 126 MB int8 PLE table: 600 MB
# resident instead of 6 MB). Same values either way: per-row int8, no activation to quantize.
LOOKUP_RECIPE = "dynamic_wi8_afp32"


def quantize(path: Path, recipe_name: str) -> Path:
    """Quantizes a .tflite in place with the named ai-edge-quantizer recipe. Blockwise recipes (`..._wi4b64_...`:
    blocks of 64) leave the ops whose weights do not divide into blocks (Gemma 3n's AltUp coefficients, [A*A, A]) at
    int8 per channel."""
    from ai_edge_quantizer import quantizer, recipe

    q = quantizer.Quantizer(str(path))
    q.load_quantization_recipe(getattr(recipe, recipe_name)())
    blockwise = re.search(r"b(\d+)_", recipe_name)
    if blockwise:
        for scope in _scopes_not_dividing(path, int(blockwise.group(1))):
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


def llm_metadata(model: TextDecoder, spec: ExportSpec, tokenizer_path: Path, whole: Gemma3n | None = None):
    """LlmMetadata: Gemma 3n model type, BOS as start token, the config's EOS ids and the tokenizer's <end_of_turn>
    as stop tokens, Gemma's turn markers as prompt templates, the cache length as the context length. With encoders
    (`whole`), the Gemma3N media fields: the media tokens as the tokenizer spells them, the first image size."""
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
    if whole is not None and spec.encoders:
        _media_metadata(meta.llm_model_type.gemma3n, whole, spec, sp, tokenizer_path)
    return meta


def _media_metadata(gemma3n, whole: Gemma3n, spec: ExportSpec, sp, tokenizer_path: Path) -> None:
    """The engine's data processor inserts these strings as text around each image and audio clip (the published
    tokenizer spells them <start_of_image>, ...); it resizes images to image_tensor_height x width."""
    tokens = whole.config.tokens
    fields = {"vision": (("start_of_image_token", tokens.boi), ("end_of_image_token", tokens.eoi)),
              "audio": (("start_of_audio_token", tokens.boa), ("end_of_audio_token", tokens.eoa))}
    for component in spec.encoders:
        for name, token in fields[component]:
            if not 0 <= token < sp.get_piece_size():
                raise InputError(f"{tokenizer_path}: has no piece for the {name.removesuffix('_token')} id {token} "
                                 f"({sp.get_piece_size()} pieces)")
            getattr(gemma3n, name).token_str = sp.id_to_piece(token)
    if "vision" in spec.encoders:
        gemma3n.image_tensor_height = gemma3n.image_tensor_width = spec.image_sizes[0]


def pack_litertlm(work: Path, metadata, tokenizer_path: Path, out: Path,
                  encoder_sections: list[tuple[str, str]] = ()) -> Path:
    """encoder_sections: (file in `work`, TfLiteModelType name) of each encoder, in order."""
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
    for file, model_type in encoder_sections:
        builder.add_tflite_model(str(work / file), lb.TfLiteModelType[model_type])
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


def export_litert(model: TextDecoder | Gemma3n, spec: ExportSpec, out_dir: str | Path,
                  tokenizer_path: str | Path) -> Path:
    """Writes out_dir/model.litertlm (and every .tflite it packs beside it); returns the .litertlm path. A Gemma3n
    brings the encoders spec.encoders names. Everything is built in a temporary folder inside out_dir and moved at
    the end."""
    tokenizer_path = Path(tokenizer_path)
    check_target(spec, "litert")
    if tokenizer_path.suffix != ".model" or not tokenizer_path.is_file():
        raise InputError(f"{tokenizer_path}: expected a SentencePiece tokenizer.model file")
    # The model stays in its own dtype; each conversion casts its part to float32 for as long as it runs.
    decoder, whole = split_model(model, spec)
    metadata = llm_metadata(decoder, spec, tokenizer_path, whole)  # a tokenizer it refuses stops here, not at the end
    with export_folder(out_dir, spec) as out, torch.no_grad(), tempfile.TemporaryDirectory(dir=out) as tmp:
        work = Path(tmp)
        convert_decoder(decoder, spec, work / DECODER_FILE)
        media = (whole.embed_vision, whole.embed_audio) if whole is not None else ()
        convert_lookup(TableLookup(decoder, media), "embedder", work / EMBEDDER_FILE)
        convert_lookup(PleLookup(decoder, spec.ple_storage), "per_layer_embedder", work / PER_LAYER_EMBEDDER_FILE)
        release_checkpoint_pages(decoder)  # the two tables were read into the lookups' own rows
        if spec.recipe:
            quantize(work / DECODER_FILE, spec.recipe)
            quantize(work / EMBEDDER_FILE,
                     LOOKUP_RECIPE if "wi8" in spec.recipe else spec.recipe_in_blocks(EMBEDDING_BLOCK))
        encoder_sections = convert_encoders(whole, spec, work) if spec.encoders else []
        if spec.encoder_recipe:
            for file, model_type in encoder_sections:
                if model_type != "END_OF_AUDIO":  # one constant row: nothing to gain
                    quantize(work / file, spec.encoder_recipe)
        pack_litertlm(work, metadata, tokenizer_path, work / LITERTLM_FILE, encoder_sections)
        for name in (DECODER_FILE, EMBEDDER_FILE, PER_LAYER_EMBEDDER_FILE, *(f for f, _ in encoder_sections),
                     LITERTLM_FILE):
            os.replace(work / name, out / name)
    return Path(out_dir) / LITERTLM_FILE
