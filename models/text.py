"""The Gemma 3n text decoder, written to be lowered: static shapes, a static KV cache, no data-dependent control flow.

Shapes: B batch, T new tokens, C cache length, H hidden size, A AltUp streams, L layers, P per-layer-input size,
N query heads, K key/value heads, D head dim. Names follow the Gemma 3n papers and Hugging Face's parameter names,
so that loading a checkpoint is a rename, not a reshuffle.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.config import GLOBAL, SLIDING, TextConfig

# Additive mask value for disallowed positions; a finite value (not -inf) keeps every runtime's softmax free of NaN.
MASKED = torch.finfo(torch.float32).min


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in fp32. Gemma 3n scales by `weight` itself (not 1 + weight) and v_norm has none."""

    def __init__(self, dim: int, eps: float, with_scale: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if with_scale else None

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        # pow(-0.5) rather than rsqrt: the reference implementation does the same, and the two round differently.
        out = xf * torch.pow(xf.pow(2).mean(-1, keepdim=True) + self.eps, -0.5)
        if self.weight is not None:
            out = out * self.weight.float()
        return out.type_as(x)


class KVCache(nn.Module):
    """A fixed-length cache [B, K, C, D] written at `input_pos`, so prefill (T > 1) and decode (T = 1) share one graph shape."""

    def __init__(self, batch: int, num_kv_heads: int, cache_len: int, head_dim: int, dtype: torch.dtype):
        super().__init__()
        shape = (batch, num_kv_heads, cache_len, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype), persistent=False)

    def update(self, input_pos: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        self.k_cache[:, :, input_pos] = k
        self.v_cache[:, :, input_pos] = v
        return self.k_cache, self.v_cache


def write_rows(cache: Tensor, new: Tensor, start: Tensor, dim: int) -> Tensor:
    """`cache` with `new` written from index `start` on along `dim`, out of place."""
    return cache.index_copy(dim, start + torch.arange(new.shape[dim], device=new.device), new)


def matmul_nt(a: Tensor, b: Tensor) -> Tensor:
    """a [..., M, D] @ b[..., N, D]^T -> [..., M, N]."""
    return torch.matmul(a, b.transpose(-1, -2))


@dataclass(frozen=True)
class CacheOps:
    """How the functional KV cache (cache as graph input and output) is written and read. An exporter passes its
    runtime's ops of the same meaning (LiteRT: dynamic_update_slice, done in place, where an index_copy lowers to a
    scatter that copies the cache; and a batch matmul that reads its right side transposed, where a transpose op
    would copy the cache)."""

    write: Callable[[Tensor, Tensor, Tensor, int], Tensor] = write_rows
    matmul_nt: Callable[[Tensor, Tensor], Tensor] = matmul_nt


def in_dtype(scale: float, dtype: torch.dtype) -> float:
    """A constant scale rounded to `dtype`, as the reference multiplies by a scale tensor cast to the weights' dtype.
    Done in plain Python so that it stays a trace-time constant under torch.export's fake tensors."""
    bits = struct.unpack("<I", struct.pack("<f", scale))[0]
    if dtype == torch.bfloat16:
        bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
    elif dtype == torch.float16:
        return float(struct.unpack("<e", struct.pack("<e", scale))[0])
    return struct.unpack("<f", struct.pack("<I", bits))[0]


def rope_inv_freq(theta: float, head_dim: int) -> Tensor:
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))


def rope_cos_sin(input_pos: Tensor, inv_freq: Tensor) -> tuple[Tensor, Tensor]:
    """cos, sin of shape [T, D] for the rotate-half RoPE convention."""
    freqs = input_pos.float()[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x: [B, T, heads, D]; cos, sin: [T, D]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


def attention_mask(q_pos: Tensor, kv_pos: Tensor, sliding_window: int | None) -> Tensor:
    """Additive mask [T, S]: causal, and for sliding layers only the last `sliding_window` positions (self included)."""
    allowed = kv_pos[None, :] <= q_pos[:, None]
    if sliding_window is not None:
        allowed = allowed & (kv_pos[None, :] > q_pos[:, None] - sliding_window)
    return torch.where(allowed, 0.0, MASKED)


class Attention(nn.Module):
    """Grouped-query attention with q/k/v norms and scale 1 (the q/k norms replace 1/sqrt(D)).

    A KV-shared layer (`kv_shared_from` is set) has no k/v projections: it attends over the keys and values that
    its source layer wrote, which the decoder hands in as `shared_kv`.

    The functional cache (`ops` given: LiteRT) stores K as [B, K, C, D] and V transposed, [B, K, D, C], the layout
    LiteRT-LM's caches have: each step writes its T new rows in place of a slice and attention reads V transposed,
    so no step copies or transposes a whole cache.
    """

    def __init__(self, cfg: TextConfig, layer_idx: int):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.kv_shared_from = cfg.kv_shared_from[layer_idx]
        bias = cfg.attention_bias
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, bias=bias)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        if self.kv_shared_from is None:
            self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=bias)
            self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=bias)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
            self.v_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, with_scale=False)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=bias)
        self.kv_cache: KVCache | None = None

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        mask: Tensor,
        input_pos: Tensor,
        shared_kv: tuple[Tensor, Tensor] | None,
        past_kv: tuple[Tensor, Tensor] | None = None,
        ops: CacheOps | None = None,
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """Returns the output and the keys/values attended over ([B, K, S, D]; V [B, K, D, S] with `ops`): with a
        cache, the whole cache."""
        B, T, _ = x.shape
        q = apply_rope(self.q_norm(self.q_proj(x).view(B, T, self.num_heads, self.head_dim)), cos, sin)
        if self.kv_shared_from is not None:
            k, v = shared_kv
        else:
            k = apply_rope(self.k_norm(self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim)), cos, sin)
            v = self.v_norm(self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim))
            k, v = k.transpose(1, 2), v.transpose(1, 2)
            if past_kv is not None:  # the functional cache, positions input_pos[0] onwards
                k = ops.write(past_kv[0], k, input_pos[0], 2)
                v = ops.write(past_kv[1], v.transpose(2, 3), input_pos[0], 3)
            elif self.kv_cache is not None:  # the cache as a mutable buffer (ExecuTorch and Core ML style)
                k, v = self.kv_cache.update(input_pos, k, v)
        out = grouped_query_attention(q.transpose(1, 2), k, v, mask, ops)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1)), (k, v)


def grouped_query_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, ops: CacheOps | None = None) -> Tensor:
    """q [B, N, T, D], k/v [B, K, S, D] (with `ops`, the functional cache: v [B, K, D, S], and ops' matmul),
    mask [T, S] -> [B, N, T, D]. Softmax in fp32.

    Query head n reads key/value head n // (N / K). The G = N / K query heads of a key/value head are stacked as
    G x T rows of one matmul against it, not matched by copies of the cache: nothing the size of the cache is
    repeated, and every shape stays 4-D. (litert-torch lowered repeat_interleave over a single key/value head to a
    wrong graph: multi-query configs diverged from layer 0.)"""
    B, N, T, D = q.shape
    K = k.shape[1]
    groups = N // K
    rows = q.reshape(B, K, groups * T, D)
    mm_nt = ops.matmul_nt if ops is not None else matmul_nt
    scores = mm_nt(rows, k) + (torch.cat([mask] * groups) if groups > 1 else mask)
    probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    return (mm_nt(probs, v) if ops is not None else torch.matmul(probs, v)).reshape(B, N, T, D)


class FeedForward(nn.Module):
    """GeGLU feed-forward. With activation sparsity s > 0, the gate keeps only values above mean + std * Phi^-1(s)
    (a Gaussian estimate of the top (1 - s) fraction), so Phi^-1(s) is computed here once and lives in the graph as a
    constant: no erfinv, which none of the mobile runtimes lowers."""

    def __init__(self, hidden_size: int, width: int, sparsity: float):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, width, bias=False)
        self.up_proj = nn.Linear(hidden_size, width, bias=False)
        self.down_proj = nn.Linear(width, hidden_size, bias=False)
        self.sparsity = sparsity
        # Normal(0, 1).icdf(s) in fp32 on the CPU, as the reference computes it on every call.
        s = torch.tensor(sparsity, dtype=torch.float32, device="cpu")
        self.std_multiplier = float(torch.erfinv(2 * s - 1) * math.sqrt(2)) if sparsity > 0 else 0.0

    def forward(self, x: Tensor) -> Tensor:
        gate = self.gate_proj(x)
        if self.sparsity > 0:
            mean = gate.mean(-1, keepdim=True)
            std = gate.std(-1, keepdim=True, correction=0)
            gate = F.relu(gate - (mean + std * self.std_multiplier))
        return self.down_proj(F.gelu(gate, approximate="tanh") * self.up_proj(x))


class Laurel(nn.Module):
    """LAuReL (learned augmented residual): x + norm(right(left(x))), a rank-`laurel_rank` side path."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.linear_left = nn.Linear(cfg.hidden_size, cfg.laurel_rank, bias=False)
        self.linear_right = nn.Linear(cfg.laurel_rank, cfg.hidden_size, bias=False)
        self.post_laurel_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.post_laurel_norm(self.linear_right(self.linear_left(x)))


class AltUp(nn.Module):
    """Alternating updates: A streams [A, B, T, H]; only the active one goes through the layer.

    predict() mixes the streams with router-dependent coefficients before the layer; correct() spreads the layer's
    innovation on the active stream back to all streams. The coefficients are clipped to +-altup_coef_clip
    functionally (no in-place write to parameters, which export would reject); within that range, which holds for
    every published checkpoint, this equals the reference's eval path.
    """

    def __init__(self, cfg: TextConfig):
        super().__init__()
        a = cfg.altup_num_inputs
        self.num_inputs, self.active_idx, self.coef_clip = a, cfg.altup_active_idx, cfg.altup_coef_clip
        self.correct_output_scale = nn.Parameter(torch.zeros(cfg.hidden_size))
        self.correction_coefs = nn.Linear(a, a, bias=False)
        self.prediction_coefs = nn.Linear(a, a * a, bias=False)
        self.modality_router = nn.Linear(cfg.hidden_size, a, bias=False)
        self.router_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.router_input_scale = cfg.hidden_size**-1.0

    def _coefs(self, linear: nn.Linear) -> Tensor:
        w = linear.weight
        return w if self.coef_clip is None else w.clamp(-self.coef_clip, self.coef_clip)

    def router_modalities(self, x: Tensor) -> Tensor:
        routed = self.modality_router(self.router_norm(x) * in_dtype(self.router_input_scale, x.dtype))
        return torch.tanh(routed.float()).type_as(x)

    def predict(self, streams: Tensor) -> Tensor:
        modalities = self.router_modalities(streams[self.active_idx])
        coefs = F.linear(modalities, self._coefs(self.prediction_coefs))
        coefs = coefs.reshape(*modalities.shape[:-1], self.num_inputs, self.num_inputs).permute(0, 1, 3, 2)
        predictions = torch.matmul(streams.permute(1, 2, 3, 0), coefs).permute(3, 0, 1, 2)
        return (predictions + streams).type_as(streams)

    def correct(self, predictions: Tensor, activated: Tensor) -> Tensor:
        modalities = self.router_modalities(activated)
        innovation = activated - predictions[self.active_idx]
        coefs = F.linear(modalities, self._coefs(self.correction_coefs)) + 1.0
        coefs = coefs.permute(2, 0, 1).unsqueeze(-1)  # [A, B, T, 1]
        return (innovation.unsqueeze(0) * coefs + predictions).type_as(activated)

    def scale_corrected_output(self, x: Tensor) -> Tensor:
        return (x.type_as(self.correct_output_scale) * self.correct_output_scale).type_as(x)


class DecoderLayer(nn.Module):
    """One Gemma 3n block: AltUp predict -> attention and LAuReL on the active stream -> feed-forward -> AltUp
    correct -> the per-layer input (PLE) gated into streams 1..A-1."""

    def __init__(self, cfg: TextConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.is_sliding = cfg.layer_types[layer_idx] == SLIDING
        self.active_idx, self.correct_scale = cfg.altup_active_idx, cfg.altup_correct_scale
        h, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.self_attn = Attention(cfg, layer_idx)
        self.mlp = FeedForward(h, cfg.ffn_widths[layer_idx], cfg.activation_sparsity[layer_idx])
        self.input_layernorm = RMSNorm(h, eps)
        self.post_attention_layernorm = RMSNorm(h, eps)
        self.pre_feedforward_layernorm = RMSNorm(h, eps)
        self.post_feedforward_layernorm = RMSNorm(h, eps)
        self.altup = AltUp(cfg)
        self.laurel = Laurel(cfg)
        self.per_layer_input_gate = nn.Linear(h, cfg.hidden_size_per_layer_input, bias=False)
        self.per_layer_projection = nn.Linear(cfg.hidden_size_per_layer_input, h, bias=False)
        self.post_per_layer_input_norm = RMSNorm(h, eps)

    def forward(
        self,
        streams: Tensor,
        per_layer_input: Tensor,
        cos: Tensor,
        sin: Tensor,
        mask: Tensor,
        input_pos: Tensor,
        shared_kv: tuple[Tensor, Tensor] | None,
        past_kv: tuple[Tensor, Tensor] | None = None,
        ops: CacheOps | None = None,
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        predictions = self.altup.predict(streams)
        active = predictions[self.active_idx]
        active_normed = self.input_layernorm(active)
        laurel_out = self.laurel(active_normed)
        attn, kv = self.self_attn(active_normed, cos, sin, mask, input_pos, shared_kv, past_kv, ops)
        attn_laurel = (active + self.post_attention_layernorm(attn) + laurel_out) / math.sqrt(2)
        ffw = self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(attn_laurel)))
        corrected = self.altup.correct(predictions, attn_laurel + ffw)

        first = corrected[self.active_idx]
        if self.correct_scale:
            first = self.altup.scale_corrected_output(first)
        gated = F.gelu(self.per_layer_input_gate(first), approximate="tanh") * per_layer_input
        ple = self.post_per_layer_input_norm(self.per_layer_projection(gated))
        # Streams other than 0 receive the per-layer input; written as a concat so no tensor is mutated in place.
        return torch.cat([corrected[:1], corrected[1:] + ple], dim=0), kv


class PerLayerEmbedding(nn.Module):
    """The PLE table [V_ple, L * P], looked up row by row outside the decoder graph (on phones it is a
    memory-mapped asset). Ids outside the table (multimodal soft tokens) read row 0, as in the reference."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.num_layers, self.dim = cfg.num_layers, cfg.hidden_size_per_layer_input
        self.vocab = cfg.vocab_size_per_layer_input
        self.weight = nn.Parameter(torch.zeros(self.vocab, self.num_layers * self.dim))
        self.scale = self.dim**0.5
        # The rows' arithmetic dtype, by default the table's: a float32 reference of a bf16 model reads bf16 rows and
        # scales them in float32, as the float32 table would (models.float32.float32_reference).
        self.compute_dtype: torch.dtype | None = None

    def forward(self, token_ids: Tensor) -> Tensor:
        """[B, T] ids -> per-layer rows [B, T, L, P], already scaled by sqrt(P)."""
        ids = torch.where((token_ids >= 0) & (token_ids < self.vocab), token_ids, 0)
        dtype = self.compute_dtype or self.weight.dtype
        rows = F.embedding(ids, self.weight).to(dtype) * in_dtype(self.scale, dtype)
        return rows.reshape(*token_ids.shape, self.num_layers, self.dim)


class TextDecoder(nn.Module):
    """Gemma 3n's language model with its tied, soft-capped LM head.

    The graph that exporters lower is `forward_embeddings(inputs_embeds, per_layer_rows, input_pos)`: both table
    lookups (`embed` and `per_layer_embedding`) stay outside it. `forward(token_ids)` is the eager convenience path.
    Without caches (`setup_caches` not called) attention covers only the tokens passed in.
    """

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.config = cfg
        h, lp = cfg.hidden_size, cfg.num_layers * cfg.hidden_size_per_layer_input
        self.embed_tokens = nn.Embedding(cfg.vocab_size, h)
        self.embed_scale = h**0.5
        self.per_layer_embedding = PerLayerEmbedding(cfg)
        self.per_layer_model_projection = nn.Linear(h, lp, bias=False)
        self.per_layer_projection_scale = h**-0.5
        self.per_layer_projection_norm = RMSNorm(cfg.hidden_size_per_layer_input, cfg.rms_norm_eps)
        self.per_layer_input_scale = 2.0**-0.5
        self.altup_projections = nn.ModuleList(nn.Linear(h, h, bias=False) for _ in range(cfg.altup_num_inputs - 1))
        self.altup_unembed_projections = nn.ModuleList(
            nn.Linear(h, h, bias=False) for _ in range(cfg.altup_num_inputs - 1)
        )
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(h, cfg.rms_norm_eps)
        self.init_buffers()
        self.cache_len: int | None = None

    def init_buffers(self) -> None:
        """(Re)creates the derived, non-persistent buffers, e.g. after weights were loaded into a meta-device model."""
        cfg = self.config
        self.register_buffer("inv_freq_global", rope_inv_freq(cfg.rope_theta_global, cfg.head_dim), persistent=False)
        self.register_buffer("inv_freq_local", rope_inv_freq(cfg.rope_theta_local, cfg.head_dim), persistent=False)

    # --- caches -------------------------------------------------------------------------------------------------

    def setup_caches(self, cache_len: int, batch: int = 1, dtype: torch.dtype | None = None) -> None:
        """One KV cache per layer that owns one; KV-shared layers get none."""
        dtype = dtype or self.norm.weight.dtype  # the final norm: every decoder has one, exporters' halves too
        device = self.norm.weight.device
        cfg = self.config
        for i in cfg.cache_owning_layers:
            self.layers[i].self_attn.kv_cache = KVCache(batch, cfg.num_kv_heads, cache_len, cfg.head_dim, dtype).to(
                device
            )
        self.cache_len = cache_len

    def reset_caches(self) -> None:
        for layer in self.layers:
            if layer.self_attn.kv_cache is not None:
                layer.self_attn.kv_cache.k_cache.zero_()
                layer.self_attn.kv_cache.v_cache.zero_()

    # --- table lookups (outside the lowered graph) ---------------------------------------------------------------

    def embed(self, token_ids: Tensor) -> Tensor:
        return self.embed_tokens(token_ids) * in_dtype(self.embed_scale, self.embed_tokens.weight.dtype)

    # --- the decoder graph --------------------------------------------------------------------------------------

    def per_layer_inputs(self, inputs_embeds: Tensor, per_layer_rows: Tensor) -> Tensor:
        """Combine the looked-up PLE rows with a projection of the embeddings: [B, T, L, P]."""
        cfg = self.config
        dtype = inputs_embeds.dtype
        proj = self.per_layer_model_projection(inputs_embeds) * in_dtype(self.per_layer_projection_scale, dtype)
        proj = self.per_layer_projection_norm(
            proj.reshape(*inputs_embeds.shape[:-1], cfg.num_layers, cfg.hidden_size_per_layer_input)
        )
        return (proj + per_layer_rows) * in_dtype(self.per_layer_input_scale, dtype)

    def forward_embeddings(
        self,
        inputs_embeds: Tensor,
        per_layer_rows: Tensor,
        input_pos: Tensor | None = None,
        last_position_only: bool = False,
        kv_cache: list[tuple[Tensor, Tensor]] | None = None,
        cache_ops: CacheOps = CacheOps(),
    ) -> Tensor | tuple[Tensor, list[tuple[Tensor, Tensor]]]:
        """inputs_embeds [B, T, H], per_layer_rows [B, T, L, P], input_pos [T] -> logits [B, T, V].

        last_position_only: return logits [B, 1, V] of the last position only. Since KV-shared layers write no cache,
        the other positions are then dropped before the first of them: in prefill only the last prompt position goes
        through the upper layers (E2B: 10 of 30 layers), which changes none of the caches or the last logits.

        kv_cache: the cache passed in as tensors, one pair (k [B, K, C, D], v transposed [B, K, D, C]) per
        cache-owning layer, instead of the module's buffers, written at input_pos[0] onwards (contiguous positions) by
        `cache_ops`; the updated pairs are then returned with the logits: (logits, new kv_cache).
        """
        cfg = self.config
        T = inputs_embeds.shape[1]
        if input_pos is None:
            input_pos = torch.arange(T, device=inputs_embeds.device)
        per_layer_inputs = self.per_layer_inputs(inputs_embeds, per_layer_rows)

        cache_len = kv_cache[0][0].shape[2] if kv_cache is not None else self.cache_len
        ops = cache_ops if kv_cache is not None else None
        kv_pos = input_pos if cache_len is None else torch.arange(cache_len, device=input_pos.device)
        masks = {
            GLOBAL: attention_mask(input_pos, kv_pos, None).to(inputs_embeds.dtype),
            SLIDING: attention_mask(input_pos, kv_pos, cfg.sliding_window).to(inputs_embeds.dtype),
        }
        rope = {
            GLOBAL: rope_cos_sin(input_pos, self.inv_freq_global),
            SLIDING: rope_cos_sin(input_pos, self.inv_freq_local),
        }
        rope = {k: (c.to(inputs_embeds.dtype), s.to(inputs_embeds.dtype)) for k, (c, s) in rope.items()}

        streams = self.altup_streams(inputs_embeds)
        kv_of_layer: dict[int, tuple[Tensor, Tensor]] = {}
        for i, layer in enumerate(self.layers):
            if last_position_only and i == cfg.first_kv_shared_layer:
                streams, per_layer_inputs = streams[:, :, -1:], per_layer_inputs[:, -1:]
                masks = {k: m[-1:] for k, m in masks.items()}
                rope = {k: (c[-1:], s[-1:]) for k, (c, s) in rope.items()}
                input_pos = input_pos[-1:]
            kind = cfg.layer_types[i]
            source = cfg.kv_shared_from[i]
            shared_kv = kv_of_layer[source] if source is not None else None
            past_kv = kv_cache[i] if kv_cache is not None and source is None else None
            streams, kv = layer(
                streams, per_layer_inputs[:, :, i, :], *rope[kind], masks[kind], input_pos, shared_kv, past_kv, ops
            )
            if source is None:
                kv_of_layer[i] = kv
        if last_position_only and cfg.num_kv_shared_layers == 0:
            streams = streams[:, :, -1:]
        logits = self.logits(self.altup_merge(streams))
        if kv_cache is not None:
            return logits, [kv_of_layer[i] for i in cfg.cache_owning_layers]
        return logits

    def forward(self, token_ids: Tensor, input_pos: Tensor | None = None) -> Tensor:
        """token_ids [B, T] -> logits [B, T, V]."""
        return self.forward_embeddings(self.embed(token_ids), self.per_layer_embedding(token_ids), input_pos)

    # --- AltUp stream expansion and merge, and the head -------------------------------------------------------

    @staticmethod
    def _match_magnitude(x: Tensor, target_magnitude: Tensor) -> Tensor:
        magnitude = torch.sqrt(torch.mean(x**2, dim=-1, keepdim=True).clamp(min=1e-5))
        return x * target_magnitude / magnitude

    def altup_streams(self, x: Tensor) -> Tensor:
        """[B, T, H] -> [A, B, T, H]: stream 0 is x, the others are projections of x rescaled to x's magnitude."""
        target = torch.mean(x**2, dim=-1, keepdim=True) ** 0.5
        return torch.stack([x] + [self._match_magnitude(p(x), target) for p in self.altup_projections], dim=0)

    def altup_merge(self, streams: Tensor) -> Tensor:
        target = torch.mean(streams[0] ** 2, dim=-1, keepdim=True) ** 0.5
        unembedded = [streams[0]] + [
            self._match_magnitude(p(streams[i + 1]), target) for i, p in enumerate(self.altup_unembed_projections)
        ]
        return self.norm(torch.stack(unembedded).mean(dim=0))

    def logits(self, hidden: Tensor) -> Tensor:
        logits = F.linear(hidden, self.embed_tokens.weight)
        cap = self.config.final_logit_softcapping
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits
