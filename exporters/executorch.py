"""ExecuTorch target: one XNNPACK `.pte` and the PLE table in a memory-mapped `.ptd`, laid out as ExecuTorch's LLM
runner contract (extension/llm/runner: constants.h, multimodal_prefiller.cpp), so that the stock `MultimodalRunner`
(the runner of ExecuTorch's phone demo apps) generates from it unchanged, and our own executorch backend calls the
same methods. With D = H + L x P (the hidden size, then the L layers' per-layer rows of width P, side by side):

  token_embedding(token_ids [1,T] int64)          -> embeddings [1,T,D]
  text_decoder(embeddings [1,T,D], input_pos [T]) -> logits [1,1,V]    T: 1..cache_len (prefill and decode;
                                                                         every position's logits with --full-prefill)

token_embedding reads the PLE table, the one constant written to `per_layer_embeddings.ptd` (memory-mapped at run
time), and gives a whole model's media ids the embedders' rows; a quantized program (--quant other than none) keeps
the token embedding's rows int8 with a scale per row, as the PLE table's.
text_decoder takes any number of tokens, as the runner
calls it (one call per text, image or audio span, then one per generated token); measured on an E2B-shaped 280M
model (cache 1024), it runs as fast as fixed-shape graphs did: decode 22.2 vs 22.6 ms, a 128-token prefill 106.6 vs
106.2 ms. It writes the KV cache, the model's mutable buffers. Constant methods: those the runner reads
(get_max_seq_len, get_max_context_len, get_bos_id, get_eos_ids, get_vocab_size, use_kv_cache, use_sdpa_with_kv_cache,
enable_dynamic_shape), get_prefill_lengths (the bundle's chunk lengths, for apps that chunk long prompts), and how
the embeddings split: get_hidden_size (H), get_per_layer_shape ([L, P]).

A whole Gemma3n model adds its encoders (models.encoders, each the encoder and its adapter as one graph), whose
outputs carry the per-layer rows of their soft token (the row of id 0, as transformers maps ids beyond the PLE
vocabulary), so that text_decoder takes them as they come:

  vision_encoder_<S>(pixel_values [1,3,S,S] f32 in [0,1]) -> [1,256,D]   for each S of image_sizes
  vision_encoder(pixel_values [1,3,S0,S0])                 -> the same, at the first (default) size S0
  audio_encoder(audio [1,129,2997] f32)                    -> [1,188,D]
  get_image_sizes                                          -> image_sizes (a constant, the default first)

The runner hands its audio encoder one [batch, bins, frames] tensor: the 128 log-mel bins of one 30 s window, then
the padding mask (1.0 = padded frame) as row 128 (models.encoders.runner_audio_input).
The sizes' graphs read one copy of the vision weights: XNNPACK files constants by the hash of their bytes.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from torch import Tensor, nn

from contract.bundle import (
    AUDIO_ENCODER,
    HIDDEN_SIZE,
    PER_LAYER_SHAPE,
    PLE_PTD_TAG,
    PTE_FILE,
    TEXT_DECODER,
    TOKEN_EMBEDDING,
    VISION_ENCODER,
    vision_encoder_name,
)
from exporters.memo import memoized
from exporters.ple import PerLayerEmbedder, RowTable
from exporters.spec import EMBEDDING_BLOCK, ExportSpec, check_target, export_folder, split_model
from exporters.weights import LinearHeadDecoder, decoder_half, float32_copy, release_checkpoint_pages
from models.encoders import (
    AudioEmbedder,
    VisionEmbedder,
    audio_sample_inputs,
    media_token_embeddings,
    runner_audio_input,
    vision_sample_inputs,
)
from models.errors import InputError
from models.float32 import float32_
from models.multimodal import Gemma3n
from models.text import RMSNorm, TextDecoder, in_dtype
from models.vision import Conv2dSame, RMSNorm2d, same_padding


class XnnpackRMSNorm(nn.Module):
    """RMSNorm in ops that XNNPACK takes: the mean over the last dim as a 4-D global average pool, and rsqrt for
    pow(-0.5). XNNPACK refuses both originals, and every norm then split the graph into another delegate
    (222 delegates for the tiny decode graph instead of 92). rsqrt and pow(-0.5) differ by an ulp."""

    def __init__(self, norm: RMSNorm):
        super().__init__()
        self.eps, self.weight = norm.eps, norm.weight

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        squares = (xf * xf).reshape(1, -1, 1, xf.shape[-1])
        mean = squares.mean(dim=(2, 3), keepdim=True).reshape(*xf.shape[:-1], 1)
        out = xf * torch.rsqrt(mean + self.eps)
        if self.weight is not None:
            out = out * self.weight.float()
        return out.type_as(x)


class XnnpackRMSNorm2d(nn.Module):
    """MobileNet-V5's RMSNorm2d ([B, C, H, W], over channels) with the mean of squares as a 1x1 convolution by a
    constant 1/C kernel: XNNPACK's mean takes only the spatial dims and it refuses pow, so each of the original's
    norms would split the vision graph between XNNPACK and the portable kernels (with this one, XNNPACK runs all but
    the MSFA's nearest-neighbour upsampling). The kernel is a buffer, not a parameter, and quantization leaves it in
    float (see quantizable_node)."""

    def __init__(self, norm: RMSNorm2d):
        super().__init__()
        self.eps, self.weight = norm.eps, norm.weight
        channels = norm.weight.shape[0]
        self.register_buffer("mean_kernel", torch.full((1, channels, 1, 1), 1.0 / channels), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        mean_square = F.conv2d(x * x, self.mean_kernel)
        return x * torch.rsqrt(mean_square + self.eps) * self.weight.view(1, -1, 1, 1)


def swap_norms_(module: nn.Module) -> None:
    for parent in module.modules():
        for name, child in parent.named_children():
            if isinstance(child, RMSNorm):
                setattr(parent, name, XnnpackRMSNorm(child))
            elif isinstance(child, RMSNorm2d):
                setattr(parent, name, XnnpackRMSNorm2d(child))


def export_decoder(model: TextDecoder, cache_len: int) -> LinearHeadDecoder:
    """The decoder half of `model` (exporters.weights.decoder_half) with its KV cache set up. Shares the weights'
    storage with `model`: quantization replaces the copy's parameters and never writes into the caller's model."""
    decoder = decoder_half(model)
    decoder.setup_caches(cache_len)
    swap_norms_(decoder)
    clip_altup_coefs_(decoder)
    return decoder.eval()


def clip_altup_coefs_(decoder: TextDecoder) -> None:
    """AltUp's coefficient clip applied to new weight tensors once, so that the coefficient Linears keep static
    weights, which XNNPACK requires of a Linear (clipped in the graph, each is a portable mm between delegates)."""
    for layer in decoder.layers:
        altup = layer.altup
        if altup.coef_clip is None:
            continue
        for linear in (altup.prediction_coefs, altup.correction_coefs):
            linear.weight = nn.Parameter(altup._coefs(linear).detach().clone(), requires_grad=False)
        altup.coef_clip = None


class DecoderStep(nn.Module):
    """forward_embeddings over the mutable-buffer KV cache, on token_embedding's output: embeddings [1, T, H + L*P]
    (the embedding, then the per-layer rows) and positions [T]."""

    def __init__(self, decoder: LinearHeadDecoder, last_position_only: bool):
        super().__init__()
        self.decoder, self.last_position_only = decoder, last_position_only

    def forward(self, embeddings: Tensor, input_pos: Tensor) -> Tensor:
        cfg = self.decoder.config
        H, rows = cfg.hidden_size, (cfg.num_layers, cfg.hidden_size_per_layer_input)
        return self.decoder.forward_embeddings(embeddings[..., :H], embeddings[..., H:].unflatten(-1, rows), input_pos,
                                               self.last_position_only)


def int4_block(width: int, block_size: int) -> int | None:
    """The largest multiple of 32 up to `block_size` that divides `width` (XNNPACK's int4 kernels take multiples of
    32), or None: a width of 64 takes blocks of 64 under a block size of 128 rather than staying float."""
    return next((b for b in range(block_size - block_size % 32, 0, -32) if width % b == 0), None)


def token_storage(quant: str, width: int) -> tuple[str, int]:
    """(RowTable storage, scale groups per row) of the token embedding in a program of scheme `quant`: float32 in a
    float program, int4 in blocks (int4_block up to EMBEDDING_BLOCK) at 8da4w when the width splits so, else int8
    per row."""
    if quant == "none":
        return "fp32", 1
    block = int4_block(width, EMBEDDING_BLOCK) if quant == "8da4w" else None
    return ("int8", 1) if block is None else ("int4", width // block)


class TokenEmbedder(nn.Module):
    """token ids [1, T] -> [1, T, H + L*P]: TextDecoder.embed and the per-layer rows side by side, the one tensor the
    LLM runner passes from token_embedding to text_decoder. A whole model's media ids (the embedders' own
    vocabularies: <end_of_image>, ...) take the embedders' rows (`media`: models.encoders.media_token_embeddings), as
    Gemma3n.embed_prompt embeds them."""

    def __init__(self, model: TextDecoder, per_layer: "PerLayerEmbedder", media: dict[str, Tensor] | None,
                 quant: str = "none"):
        super().__init__()
        self.per_layer = per_layer
        # A quantized program's table is row-quantized as the PLE table: E2B's 2.1 GB float32 table is 0.54 GB in
        # int8, 0.27 GB in int4 blocks of 32 at 8da4w, with bf16 scales (0.03 GB; in float32 they were 0.07 GB).
        table = model.embed_tokens.weight.detach()
        storage, groups = token_storage(quant, table.shape[1])
        self.token = RowTable(table, storage, groups, torch.bfloat16 if storage == "int4" else torch.float32)
        self.scale = in_dtype(model.embed_scale, torch.float32)
        self.media = [] if media is None else [(int(media[f"{name}_first_id"][0]), f"{name}_media_rows")
                                               for name in ("vision", "audio")]
        for first, buffer in self.media:
            self.register_buffer(buffer, media[buffer.replace("_media", "")].float())

    def forward(self, token_ids: Tensor) -> Tensor:
        embeds = self.token(token_ids) * self.scale
        for first, buffer in self.media:
            table = getattr(self, buffer)
            owned = (token_ids >= first) & (token_ids < first + table.shape[0])
            rows = F.embedding(torch.where(owned, token_ids - first, 0), table)
            embeds = torch.where(owned[..., None], rows, embeds)
        return torch.cat([embeds, self.per_layer(token_ids).flatten(-2).to(embeds.dtype)], dim=-1)


class SoftTokenRows(nn.Module):
    """An embedder (VisionEmbedder or AudioEmbedder: [1, N, H]) with the per-layer rows of its soft token beside each
    output position ([1, N, H + L*P]), as text_decoder takes them. The rows are one constant [1, N, L*P]: a broadcast
    would be expanded into N copies on the way to XNNPACK. The audio embedder takes the runner's one tensor
    (models.encoders.runner_audio_input)."""

    def __init__(self, embedder: nn.Module, row: Tensor, positions: int, audio: bool):
        super().__init__()
        self.embedder, self.audio = embedder, audio
        self.register_buffer("soft_token_rows", row.reshape(1, 1, -1).repeat(1, positions, 1).contiguous())

    def forward(self, inputs: Tensor) -> Tensor:
        if self.audio:  # [1, 128 + 1, F]: the log-mel bins, then the padding mask
            out = self.embedder(inputs[:, :-1].transpose(1, 2), inputs[:, -1])
        else:
            out = self.embedder(inputs)
        return torch.cat([out, self.soft_token_rows.to(out.dtype)], dim=-1)


def is_ple_constant(node: torch.fx.Node) -> str | None:
    """external_constants tag: the PLE table (rows and scales) goes to the .ptd, everything else stays in the .pte."""
    return PLE_PTD_TAG if "ple_row" in node.name else None  # PerLayerEmbedder's ple.rows and ple.row_scales


def gelu_tanh(x: Tensor, approximate: str = "none") -> Tensor:
    """GELU's tanh form written out. XNNPACK's GELU ignores `approximate` and computes the erf form, which differs
    from Gemma's gelu_pytorch_tanh by up to ~5e-4 per activation (8e-4 on the tiny model's logits)."""
    if approximate != "tanh":
        return 0.5 * x * (1.0 + torch.erf(x * 0.5**0.5))
    inner = (2.0 / torch.pi) ** 0.5 * (x + 0.044715 * x * x * x)
    return 0.5 * x * (1.0 + torch.tanh(inner))


# --- quantization ----------------------------------------------------------------------------------------------


def float32_quantized_(decoder: LinearHeadDecoder, spec: ExportSpec) -> None:
    """The decoder in float32, quantized for spec.quant, a layer at a time: beside a bf16 checkpoint only one layer
    is ever float32 and unquantized (a whole E2B decoder is 8 GB in float32)."""
    for layer in decoder.layers:
        quantize_decoder_(float32_(layer), spec)
    for name, part in decoder.named_children():
        if name != "layers":
            float32_(part)
    quantize_decoder_(decoder, spec)  # the rest: the layers' Linears are quantized already, and left so


def quantize_decoder_(decoder: nn.Module, spec: ExportSpec) -> None:
    """torchao source transform of the Linears (of the decoder or a part of it: LM head included) for spec.quant."""
    if spec.quant == "none":
        return
    from torchao.quantization import quantize_
    from torchao.quantization.granularity import PerAxis, PerGroup
    from torchao.quantization.quant_api import Int8DynamicActivationIntxWeightConfig

    if spec.recipe == "int8wo":
        _swap_modules(decoder, lambda m, fqn: not fqn.endswith("_coefs"), Int8WeightOnlyLinear)
        return
    if spec.recipe == "8da4w" and spec.block_size < 32:
        raise InputError(f"block_size: XNNPACK's int4 kernels need blocks of a multiple of 32, got {spec.block_size}")

    def group(module: nn.Module, fqn: str) -> int | None:
        """The Linear's int4 block at 8da4w (0 at 8da8w: per channel), None to leave it float: AltUp's coefficient
        matrices are read as weights (clipped), never called as Linears; a grouped scheme leaves a Linear whose
        input divides into no block (PLE dim and LAuReL rank on tiny models) in float."""
        if not isinstance(module, nn.Linear) or fqn.endswith("_coefs") or type(module.weight.detach()) is not Tensor:
            return None
        return int4_block(module.in_features, spec.block_size) if spec.recipe == "8da4w" else 0

    groups = {group(m, fqn) for fqn, m in decoder.named_modules()} - {None}
    for block in sorted(groups):
        weight_dtype, granularity = (torch.int4, PerGroup(block)) if block else (torch.int8, PerAxis(0))
        config = Int8DynamicActivationIntxWeightConfig(weight_dtype=weight_dtype, weight_granularity=granularity)
        quantize_(decoder, config, filter_fn=lambda m, fqn, block=block: group(m, fqn) == block)


class Int8WeightOnlyLinear(nn.Module):
    """A Linear stored as int8 weights with one scale per output channel, dequantized in the graph: ExecuTorch's own
    int8 weight-only form (its Llama example's). torchao's form instead leaves a torchao::dequantize_affine before
    each Linear, which XNNPACK does not take and ExecuTorch 1.5.1 has no kernel for."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach().float()
        scales = w.abs().amax(dim=1).clamp(min=1e-12) / 127
        self.register_buffer("weight", torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scales", scales.to(linear.weight.dtype))
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.nn.functional.linear(x, self.weight.to(x.dtype)) * self.scales
        return out if self.bias is None else out + self.bias


def _swap_modules(root: nn.Module, keep, make, kind: type | tuple = nn.Linear) -> None:
    for fqn, module in list(root.named_modules()):
        if isinstance(module, kind) and keep(module, fqn):
            parent_name, _, name = fqn.rpartition(".")
            setattr(root.get_submodule(parent_name) if parent_name else root, name, make(module))


class Int8WeightOnlyConv(nn.Module):
    """Int8WeightOnlyLinear's form for a Conv1d/Conv2d: int8 weights with one scale per output channel, the scales
    applied to the output. XNNPACK takes a convolution only with a constant float weight (or with dynamically
    quantized activations: 8da8w), so these convolutions run on ExecuTorch's portable kernel."""

    def __init__(self, conv: nn.Conv1d | nn.Conv2d):
        super().__init__()
        w = conv.weight.detach().float()
        scales = w.flatten(1).abs().amax(dim=1).clamp(min=1e-12) / 127
        shape = (-1,) + (1,) * (w.dim() - 1)
        self.register_buffer("weight", torch.round(w / scales.view(shape)).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scales", scales.to(conv.weight.dtype).view(1, -1, *([1] * (w.dim() - 2))))
        self.bias = conv.bias
        self.conv = F.conv2d if w.dim() == 4 else F.conv1d
        self.kernel, self.stride, self.padding = conv.kernel_size, conv.stride, conv.padding
        self.dilation, self.groups = conv.dilation, conv.groups
        self.pads_same = isinstance(conv, Conv2dSame) and conv.stride[0] > 1

    def forward(self, x: Tensor) -> Tensor:
        if self.pads_same:  # Conv2dSame's padding of a strided conv, by the input's static size
            (top, bottom), (left, right) = (same_padding(n, self.kernel[0], self.stride[0]) for n in x.shape[-2:])
            x = F.pad(x, (left, right, top, bottom))
        out = self.conv(x, self.weight.to(x.dtype), None, self.stride, self.padding, self.dilation, self.groups)
        out = out * self.scales
        return out if self.bias is None else out + self.bias.view_as(self.scales)


def quantizable_node(node: torch.fx.Node) -> bool:
    """XNNPACKQuantizer's filter for the encoders: every Linear and convolution it supports (depthwise and
    non-2-D convolutions it skips by itself) except the norms' mean-of-squares convolutions."""
    norm = f"{XnnpackRMSNorm2d.__module__}.{XnnpackRMSNorm2d.__qualname__}"
    types = [t if isinstance(t, str) else f"{t.__module__}.{t.__qualname__}"
             for _, t in node.meta.get("nn_module_stack", {}).values()]
    return norm not in types


def _quantize_8da8w(program: torch.export.ExportedProgram, args: tuple) -> torch.export.ExportedProgram:
    """PT2E with XNNPACK's quantizer: int8 per-channel weights and int8 activations quantized on the fly for the
    Linears and the 2-D, non-depthwise convolutions, which XNNPACK runs as qd8-f32-qc8w. torchao's 8da8w source
    transform covers Linears only, and MobileNet-V5 is mostly 1x1 convolutions."""
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    class DynamicQuantizer(XNNPACKQuantizer):
        def transform_for_annotation(self, model: torch.fx.GraphModule) -> torch.fx.GraphModule:
            # XNNPACKQuantizer turns every scalar operand of add/mul into a float tensor for its static patterns;
            # dynamic quantization has none, and the audio encoder's integer index arithmetic must stay integer.
            return model

    config = get_symmetric_quantization_config(is_per_channel=True, is_dynamic=True)
    quantizer = DynamicQuantizer().set_global(config).set_filter_function(quantizable_node)
    try:
        prepared = prepare_pt2e(program.module(), quantizer)
        prepared(*args)  # the weight observers record each channel's range
        converted = convert_pt2e(prepared)
        drop_unread_parameters_(converted)
        return torch.export.export(converted, args, strict=False)
    finally:
        forget_quantized_modules()


def drop_unread_parameters_(module: torch.fx.GraphModule) -> None:
    """Removes the parameters no node of `module`'s graph reads. convert_pt2e folds each quantized weight into a new
    int8 constant and leaves the float32 one registered, unread; torch.export lifts it into the program all the same,
    and the lowering, the export's peak, holds it: four fifths of the default vision encoder's program's bytes."""
    read = {node.target for node in module.graph.nodes if node.op == "get_attr"}
    for name, _ in list(module.named_parameters(remove_duplicate=False)):
        if name not in read:
            owner, _, leaf = name.rpartition(".")
            delattr(module.get_submodule(owner), leaf)


def forget_quantized_modules() -> None:
    """Empties the caches that keep every module PT2E prepared or converted alive: its device checks (torch.ao's
    assert_and_get_unique_device and torchao's copy of it) are functools caches keyed by the module, which held the
    float32 copies of E2B's encoders (0.98B parameters, 3.9 GB) through the whole export."""
    from torch.ao.quantization.fx import utils as ao_utils
    from torchao import utils as torchao_utils

    for check in (ao_utils.assert_and_get_unique_device, torchao_utils._assert_and_get_unique_device):
        if hasattr(check, "cache_clear"):  # a version that no longer caches them
            check.cache_clear()


def encoder_program(embedder: nn.Module, args: tuple, recipe: str) -> torch.export.ExportedProgram:
    """One encoder (models.encoders' VisionEmbedder or AudioEmbedder) exported for XNNPACK, its weights quantized
    by `recipe` (spec.encoder_recipe: "", "int8wo" or "8da8w"). The caller's model is left as it is."""
    embedder = float32_copy(embedder)
    swap_norms_(embedder)
    if recipe == "int8wo":
        # Depthwise convolutions stay in float: a few percent of the weights, and XNNPACK runs them only so.
        _swap_modules(embedder, lambda m, fqn: True, Int8WeightOnlyLinear)
        _swap_modules(embedder, lambda m, fqn: m.groups == 1, Int8WeightOnlyConv, kind=(nn.Conv1d, nn.Conv2d))
    with torch.no_grad():
        program = torch.export.export(embedder, args, strict=False)
        if recipe == "8da8w":
            program = _quantize_8da8w(program, args)
        return program.run_decompositions({torch.ops.aten.gelu.default: gelu_tanh})


# --- export and lowering ---------------------------------------------------------------------------------------


def decoder_programs(model: TextDecoder, spec: ExportSpec) -> dict[str, torch.export.ExportedProgram]:
    """text_decoder: the decoder over its KV-cache buffers, for 1 to cache_len tokens."""
    cfg = model.config
    decoder = export_decoder(model, spec.cache_len)
    float32_quantized_(decoder, spec)
    width, dtype = cfg.hidden_size + cfg.num_layers * cfg.hidden_size_per_layer_input, torch.float32

    # Traced at 2 tokens (torch.export specialises a sample size of 1); a one-slot cache gets a fixed shape.
    T = min(2, spec.cache_len)
    tokens = torch.export.Dim("tokens", min=1, max=spec.cache_len) if T > 1 else None
    with torch.no_grad():
        program = torch.export.export(DecoderStep(decoder, spec.kv_shared_prefill),
                                      (torch.zeros(1, T, width, dtype=dtype), torch.arange(T)),
                                      dynamic_shapes=({1: tokens}, {0: tokens}) if tokens else None, strict=False)
        return {TEXT_DECODER: program.run_decompositions({torch.ops.aten.gelu.default: gelu_tanh})}


def embedder_programs(model: TextDecoder, spec: ExportSpec, per_layer: PerLayerEmbedder,
                      whole: Gemma3n | None) -> dict[str, torch.export.ExportedProgram]:
    """token_embedding, for 1 to cache_len tokens (the runner embeds a whole prompt span in one call)."""
    media = media_token_embeddings(whole) if whole is not None else None
    longest = spec.cache_len
    ids = torch.zeros(1, min(2, longest), dtype=torch.long)
    dynamic = ({1: torch.export.Dim("tokens", min=1, max=longest)},) if longest > 1 else None
    embedder = TokenEmbedder(model, per_layer, media, spec.quant)
    with torch.no_grad():
        return {TOKEN_EMBEDDING: torch.export.export(embedder, (ids,), dynamic_shapes=dynamic)}


def encoder_programs(model: Gemma3n, spec: ExportSpec,
                     per_layer: PerLayerEmbedder | None = None) -> dict[str, torch.export.ExportedProgram]:
    """vision_encoder_<S> for each image size and audio_encoder, as far as spec.encoders asks for them; per_layer:
    the PLE lookup whose soft-token rows the outputs carry (default: the model's, stored as spec.ple_storage)."""
    programs, tokens = {}, model.config.tokens
    per_layer = per_layer or PerLayerEmbedder(model.language_model, spec.ple_storage)

    def soft_row(token: int) -> Tensor:
        with torch.no_grad():
            return per_layer(torch.tensor([[token]])).reshape(-1)

    if "vision" in spec.encoders:
        vision = SoftTokenRows(VisionEmbedder(model), soft_row(tokens.image), tokens.image_soft_tokens, False).eval()
        for size in spec.image_sizes:
            programs[vision_encoder_name(size)] = encoder_program(vision, vision_sample_inputs(size),
                                                                  spec.encoder_recipe)
    if "audio" in spec.encoders:
        audio = SoftTokenRows(AudioEmbedder(model), soft_row(tokens.audio), tokens.audio_soft_tokens, True).eval()
        sample = (torch.from_numpy(runner_audio_input(*(t.numpy() for t in audio_sample_inputs()))),)
        programs[AUDIO_ENCODER] = encoder_program(audio, sample, spec.encoder_recipe)
    return programs


def delegate_friendly_views():
    """An edge pass that rewrites ops XNNPACK refuses into ops it takes, since each refused op ends a delegate and
    every delegate costs a call at run time and a pass pipeline at lowering (the default text decode graph: 27
    delegates and 125 portable kernels without the last four rewrites; see tests/test_export_executorch.py):
    - select -> slice + view;
    - expand -> nothing where the shape stays (matmul's broadcasts) or a concat of copies (grouped-query
      attention's repeat_interleave);
    - unsqueeze (XNNPACK: trailing dim only) -> view;
    - mean over the last dim of a tensor of rank <= 3 (XNNPACK: 4-D, dims 2 and 3 only) -> a view to [1, N, 1, D],
      the 4-D mean, and a view back;
    - var over the last dim (activation sparsity's std) -> the two-pass mean of squared deviations, as above;
    - pow(x, 0.5) / pow(x, -0.5) (XNNPACK: pow 2 only) -> sqrt / rsqrt."""
    from executorch.exir.dialects._ops import ops as exir_ops
    from executorch.exir.pass_base import ExportPass, ProxyValue

    aten, clone = exir_ops.edge.aten, exir_ops.edge.dim_order_ops._clone_dim_order.default

    class DelegateFriendlyViews(ExportPass):
        def sizes(self, x, meta) -> list:
            """x's sizes as view arguments: ints, and -1 for a dynamic dim (text_decoder's tokens; XNNPACK reshapes
            with one inferred dim, never with a symbolic one)."""
            return [size if isinstance(size, int) else -1 for size in x.to_tensor().shape]

        def mean_last(self, x, keepdim: bool, meta):
            call = super().call_operator
            sizes = self.sizes(x, meta)
            lead = [1] * (3 - len(sizes)) + sizes[:-1]  # [B, T, D] -> [B, T, 1, D]: no product of sizes needed
            pooled = call(aten.mean.dim, (call(aten.view_copy.default, (x, lead[:2] + [1, sizes[-1]]), {}, meta),
                                          [2, 3], True), {}, meta)
            return call(aten.view_copy.default, (pooled, sizes[:-1] + [1] if keepdim else sizes[:-1]), {}, meta)

        def call_operator(self, op, args, kwargs, meta):
            call = super().call_operator
            if op == aten.select_copy.int:
                x, dim, index = args
                sizes = self.sizes(x, meta)
                dim %= len(sizes)
                if isinstance(sizes[dim], int):
                    index %= sizes[dim]
                    sliced = call(aten.slice_copy.Tensor, (x, dim, index, index + 1), {}, meta)
                    return call(aten.view_copy.default, (sliced, sizes[:dim] + sizes[dim + 1 :]), {}, meta)
            if op == aten.expand_copy.default and len(args[1]) == args[0].to_tensor().dim():
                x = out = args[0]
                wanted = [size.data if isinstance(size, ProxyValue) else size for size in args[1]]
                shape = x.to_tensor().shape
                if all(isinstance(size, int) or str(size) == str(old) for size, old in zip(wanted, shape)):
                    for dim, (size, old) in enumerate(zip(wanted, shape)):
                        if isinstance(size, int) and size not in (-1, old):
                            copies = [out] + [call(clone, (out,), {}, meta) for _ in range(size - 1)]
                            out = call(aten.cat.default, (copies, dim), {}, meta)
                    return out
            if op == aten.view_copy.default:  # XNNPACK reshapes with one dynamic dim given as -1, not a symbol
                sizes = [size if isinstance(size, int) else -1 for size in args[1]]
                if sizes.count(-1) == 1:
                    return call(op, (args[0], sizes), kwargs, meta)
            if op == aten.unsqueeze_copy.default:
                x, dim = args
                sizes = self.sizes(x, meta)
                dim %= len(sizes) + 1
                return call(aten.view_copy.default, (x, sizes[:dim] + [1] + sizes[dim:]), {}, meta)
            if op in (aten.mean.dim, aten.var.correction) and _last_dim_only(args, kwargs):
                x, rank = args[0], args[0].to_tensor().dim()
                keepdim = bool(kwargs.get("keepdim", args[2] if len(args) > 2 else False))
                if rank <= 3 and x.to_tensor().dtype == torch.float32 and kwargs.get("dtype") is None:
                    if op == aten.mean.dim:
                        return self.mean_last(x, keepdim, meta)
                    if kwargs.get("correction", 1) == 0:
                        deviation = call(aten.sub.Tensor, (x, self.mean_last(x, True, meta)), {}, meta)
                        squares = call(aten.mul.Tensor, (deviation, deviation), {}, meta)
                        return self.mean_last(squares, keepdim, meta)
            if op == aten.pow.Tensor_Scalar and args[1] in (0.5, -0.5):
                return call(aten.sqrt.default if args[1] > 0 else aten.rsqrt.default, (args[0],), {}, meta)
            return call(op, args, kwargs, meta)

    return DelegateFriendlyViews()


def _last_dim_only(args, kwargs) -> bool:
    """A mean/var call reducing over the last dim alone (dims given as a one-element list)."""
    dims = args[1] if len(args) > 1 else kwargs.get("dim")
    rank = args[0].to_tensor().dim()
    return isinstance(dims, (list, tuple)) and len(dims) == 1 and dims[0] % rank == rank - 1


def runner_metadata(model: TextDecoder, spec: ExportSpec) -> dict:
    cfg = model.config
    return {
        "get_max_seq_len": spec.cache_len,
        "get_max_context_len": spec.cache_len,
        "get_bos_id": cfg.bos_token_id,
        # The runner stops at these: the bundle's stop ids (<end_of_turn> too) where g3n bundle passes them.
        "get_eos_ids": list(spec.extra.get("stop_ids", cfg.eos_token_ids)),
        "get_vocab_size": cfg.vocab_size,
        "use_kv_cache": True,
        "use_sdpa_with_kv_cache": False,
        "enable_dynamic_shape": True,  # token_embedding and text_decoder take 1..cache_len tokens
        "get_prefill_lengths": list(spec.prefill_lengths),
        HIDDEN_SIZE: cfg.hidden_size,
        PER_LAYER_SHAPE: [cfg.num_layers, cfg.hidden_size_per_layer_input],
    } | ({"get_image_sizes": list(spec.image_sizes)} if "vision" in spec.encoders else {})


@contextmanager
def bounded_dynamic_quant_layout():
    """While lowering, XNNPACK's ChannelsLastTaggedReshapePass with its traceback over dynamic quantization bounded.

    ExecuTorch 1.5.1's pass converts a dynamically quantized convolution's input to NHWC ahead of the quantize by
    walking args[0] back from the dequantize, and goes on past the quantize to the first node that has no inputs
    (the graph input): it converts that and rewires its users instead. A convolution fed by anything but the graph
    input then computes garbage, or XNNPACK fails at run time ("Propagating input shapes failed"). Upstream:
    pytorch/executorch#21637. Here the walk stops at the quantized activation, its inputs hidden for the call."""
    import executorch.backends.xnnpack._passes as xnnpack_passes
    from executorch.backends.xnnpack.utils.quant_utils import (
        is_dequant,
        is_dynamic_qdq,
        is_quant,
    )

    original = xnnpack_passes.ChannelsLastTaggedReshapePass

    class BoundedChannelsLastPass(original):
        def input_to_nhwc(self, graph_module, input_node, target_node):
            if not is_dynamic_qdq(input_node):
                return super().input_to_nhwc(graph_module, input_node, target_node)
            activation = input_node
            while is_quant(activation) or is_dequant(activation):
                activation = activation.args[0]
            inputs, activation.args = activation.args, ()
            try:
                return super().input_to_nhwc(graph_module, input_node, target_node)
            finally:
                activation.args = inputs

    xnnpack_passes.ChannelsLastTaggedReshapePass = BoundedChannelsLastPass
    try:
        yield
    finally:
        xnnpack_passes.ChannelsLastTaggedReshapePass = original


def lower(programs: dict, metadata: dict, aliases: dict[str, str] | None = None):
    """One program of `programs` (name -> ExportedProgram), each lowered to XNNPACK, plus `aliases` (name -> the
    name of a lowered method it repeats: the default vision size, lowered once). Empties `programs` once they are
    lowered: the delegates hold their weights as bytes, and the exported programs' own (the encoders' float32 copies)
    would otherwise stay through the planning and serialisation."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import (
        XnnpackPartitioner,
    )
    from executorch.exir import (
        EdgeCompileConfig,
        EdgeProgramManager,
        ExecutorchBackendConfig,
        to_edge_transform_and_lower,
    )
    from executorch.exir.passes import MemoryPlanningPass

    # Table lookups stay on the portable embedding kernel, which reads rows straight from the mapped .ptd.
    partitioners = {name: [] if name.endswith("embedding") else [XnnpackPartitioner()] for name in programs}
    with bounded_dynamic_quant_layout():
        edge = to_edge_transform_and_lower(
            programs, transform_passes=[delegate_friendly_views()], partitioner=partitioners, constant_methods=metadata,
            # The edge dialect's verifier re-checks every node after each step: a seventh of the lowering time, for a
            # check of ExecuTorch's own passes (the programs' outputs are tested against the float model instead).
            compile_config=EdgeCompileConfig(_check_ir_validity=False),
        )
    programs.clear()
    release_delegated_weights_(edge)
    if aliases:
        # A copy per name: to_executorch plans memory in each method's graph in place. The delegate's weights are
        # bytes filed by their hash, so the copy adds a method, not weights.
        lowered = {name: edge.exported_program(name) for name in edge.methods}
        lowered |= {alias: copy.deepcopy(lowered[target]) for alias, target in aliases.items()}
        edge = EdgeProgramManager(lowered, metadata, edge.compile_config)
    canonical_named_data_(edge)
    return edge.to_executorch(
        ExecutorchBackendConfig(
            # Shared: decode reads the cache that prefill wrote. Names: the runtime matches buffers across methods.
            memory_planning_pass=MemoryPlanningPass(share_mutable_buffers=True),
            emit_mutable_buffer_names=True,
            external_constants=is_ple_constant,
        )
    )


def release_delegated_weights_(edge) -> None:
    """Each XNNPACK delegate keeps the program it was lowered from, weights and all, beside the bytes it packed them
    into (ExecuTorch's named data); the emitter reads only that program's graph (debug handles, outputs), and
    to_executorch's passes only its shapes. Its weights become stubs here, so that planning and serialisation hold
    each weight once: on E2B the decoder's int4 values one per byte (2.4 GB) and the encoders' int8 weights."""
    from executorch.exir.lowered_backend_module import LoweredBackendModule

    def stubbed(value):
        if not isinstance(value, Tensor):
            return value
        # One element seen at every index: the shape and dtype that ExecuTorch's passes propagate through the
        # delegate call (with fake tensors, on the CPU as the inputs are), no bytes. A Parameter stays one: the
        # program's verifier checks that.
        stub = torch.zeros((), dtype=value.dtype).expand(value.shape)
        return nn.Parameter(stub, value.requires_grad) if isinstance(value, nn.Parameter) else stub

    for name in edge.methods:
        for module in edge.exported_program(name).graph_module.modules():
            if isinstance(module, LoweredBackendModule):
                original = module.original_module
                original._state_dict = {key: stubbed(value) for key, value in original.state_dict.items()}
                original._constants = {key: stubbed(value) for key, value in original.constants.items()}


def canonical_named_data_(edge) -> None:
    """The delegates' weight blobs (ExecuTorch's named data, keyed by their sha256) written in key order.

    ExecuTorch files them in the order the XNNPACK partitions were serialized, and that order follows sets of fx
    nodes, which iterate by memory address: two processes wrote the default whole model's model.pte with the same
    blobs in other orders (30 of 33 MB differing). The runtime looks blobs up by key, so the order is free."""
    import dataclasses

    from executorch.exir._serialize._named_data_store import NamedDataStoreOutput

    store = edge._named_data_store
    collect = store.get_named_data_store_output

    def canonical() -> NamedDataStoreOutput:
        out = collect()
        buffers, moved = [], {}

        def remap(entries: dict) -> dict:
            result = {}
            for key in sorted(entries):
                entry = entries[key]
                if entry.buffer_index not in moved:
                    moved[entry.buffer_index] = len(buffers)
                    buffers.append(out.buffers[entry.buffer_index])
                result[key] = dataclasses.replace(entry, buffer_index=moved[entry.buffer_index])
            return result

        pte = remap(out.pte_data)
        external = {name: remap(out.external_data[name]) for name in sorted(out.external_data)}
        return NamedDataStoreOutput(buffers, pte, external)

    store.get_named_data_store_output = canonical


def export_executorch(model: TextDecoder | Gemma3n, spec: ExportSpec, out_dir: str | Path) -> Path:
    """Writes out_dir/model.pte and out_dir/per_layer_embeddings.ptd (and export.json); returns the .pte's path.
    `model`: a TextDecoder, or a whole Gemma3n whose encoders (spec.encoders) join the decoder's methods. With the
    conversion memo on (exporters.memo), the same model lowered again at the same spec is a copy of the first
    lowering's files."""
    from executorch.version import __version__

    check_target(spec, "executorch")
    decoder, whole = split_model(model, spec)
    with export_folder(out_dir, spec) as tmp:
        lowered = memoized([("executorch", model, {"spec": spec})], f"executorch {__version__}", tmp / "lowered",
                           lambda path: _lower_into(path, decoder, whole, spec))
        for file in sorted(lowered.iterdir()):
            file.rename(tmp / file.name)
        lowered.rmdir()
    return Path(out_dir) / PTE_FILE


def _lower_into(folder: Path, decoder: TextDecoder, whole: Gemma3n | None, spec: ExportSpec) -> None:
    console = Console(stderr=True)
    folder.mkdir()
    per_layer = PerLayerEmbedder(decoder, spec.ple_storage)
    with console.status("exporting the decoder and embedding methods"):
        programs = decoder_programs(decoder.eval(), spec) | embedder_programs(decoder, spec, per_layer, whole)
    aliases = {}
    if spec.encoders:
        with console.status(f"exporting the {' and '.join(spec.encoders)} encoders"):
            programs |= encoder_programs(whole.eval(), spec, per_layer)
        if "vision" in spec.encoders:
            aliases[VISION_ENCODER] = vision_encoder_name(spec.image_sizes[0])
    # The programs hold every weight they need; the lowering, the export's peak, reads none of the checkpoint's.
    source = whole if whole is not None else decoder
    release_checkpoint_pages(source)
    with console.status("lowering to XNNPACK (minutes: one delegate per supported subgraph)"):
        program = lower(programs, runner_metadata(decoder, spec), aliases)
    with open(folder / PTE_FILE, "wb") as f:
        program.write_to_file(f)
    program.write_tensor_data_to_file(str(folder))
