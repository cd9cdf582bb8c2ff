"""The Gemma 3n audio path: waveform -> log-mel features -> USM conformer encoder -> one token per 160 ms.

Decisions (what the runtime does with audio the user hands in):
- Input: a WAV or FLAC file (read by soundfile: every PCM width, 8-bit included, and float), or an array [N] or
  [N, channels] (float, or int16/int32/int8/uint8 scaled to [-1, 1]; an array's sample rate defaults to 16 kHz).
- Multichannel audio is downmixed to mono by averaging the channels; other sample rates are resampled to 16 kHz
  with scipy.signal.resample_poly (polyphase, Kaiser-windowed FIR).
- Empty audio, NaN/inf samples, and missing, corrupt or unsupported files are an InputError whose one line names the
  file (or the array) and what was expected.
- Clips longer than 30 s are split into consecutive windows of at most 30 s (a 31 s clip gives a 30 s and a 1 s
  window), each encoded on its own: the encoder, like transformers' processor, handles one 30 s window at a time.
- Features are exactly those of transformers' Gemma3nAudioFeatureExtractor with its published defaults (HTK
  pre-emphasis 0.97, 32 ms periodic Hann frames every 10 ms, 1024-point FFT magnitude, 128 mel bins over
  125-7600 Hz, natural log floored at 1e-5, the clip zero-padded to a multiple of 128 samples). A clip shorter than
  one frame (513 samples, 32 ms) is zero-padded to 640 samples so that it has one frame; transformers would give no
  frame at all.
- Encoder output: one token per 160 ms (4x time subsampling in the conv stem, 4x reduction at the end), so one full
  30 s window (480000 samples, 2997 frames) gives 188 tokens and a 1 s window 7. Tokens whose frames lie in the
  padding are masked (zeroed, mask True); `encode_audio` drops them (transformers fills a window's masked and
  missing tokens up to 188 with the embedding of the audio vocabulary's last entry before the language model).
- The exported encoder runs at one fixed shape, a 30 s window (`log_mel_features(w, pad_to=480000)`: 2997 frames,
  mask marking the padding). For a shorter clip its valid tokens equal the unpadded encoding except the last one,
  whose conv-stem receptive field reaches into the padding (frames of silence rather than zeros); transformers
  behaves the same way when it pads a batch.
- A file's sample rate is its header's; `load_audio(path, sample_rate=...)` must agree with it.

Shapes: B batch, T mel frames (then subsampled frames), H hidden size, N heads, D head dim, U query blocks,
W block (chunk) size, C key context per block (W + left + right), F relative positions (left + right + 1).
Module and parameter names are transformers' (`Gemma3nAudioEncoder`), so a checkpoint's `model.audio_tower.*`
tensors load with the prefix stripped. The encoder has no buffers: its constants (relative timing signal, local
mask) are built in forward from static shapes, so it builds on the meta device and exports at a fixed shape.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.errors import CheckpointError, InputError
from models.text import RMSNorm

SAMPLE_RATE = 16_000
WINDOW_SECONDS = 30.0
AUDIO_WINDOW_SAMPLES = int(WINDOW_SECONDS * SAMPLE_RATE)  # 480000: the one shape the exported audio encoders take
AUDIO_WINDOW_FRAMES = 2997  # log-mel frames of one window (hop 160, frame 513)


# --- configuration ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AudioConfig:
    """Gemma3nAudioConfig's fields; the defaults are the published Gemma 3n (E2B and E4B) audio tower."""

    input_feat_size: int = 128
    hidden_size: int = 1536
    rms_norm_eps: float = 1e-6
    gradient_clipping: float = 1e10
    conf_attention_chunk_size: int = 12
    conf_attention_context_left: int = 13
    conf_attention_context_right: int = 0
    conf_attention_logit_cap: float = 50.0
    conf_num_attention_heads: int = 8
    conf_num_hidden_layers: int = 12
    conf_conv_kernel_size: int = 5
    conf_reduction_factor: int = 4
    conf_residual_weight: float = 0.5
    sscp_conv_channel_size: tuple[int, int] = (128, 32)
    sscp_conv_group_norm_eps: float = 1e-3
    sscp_conv_kernel_size: tuple[tuple[int, int], tuple[int, int]] = ((3, 3), (3, 3))
    sscp_conv_stride_size: tuple[tuple[int, int], tuple[int, int]] = ((2, 2), (2, 2))
    vocab_size: int = 128  # the audio embedder's table (embed_audio), not the encoder's
    vocab_offset: int = 262_272

    def __post_init__(self):
        if self.hidden_size % self.conf_num_attention_heads:
            raise CheckpointError("audio_config: hidden_size must be a multiple of conf_num_attention_heads")
        for name in ("sscp_conv_channel_size", "sscp_conv_kernel_size", "sscp_conv_stride_size"):
            if len(getattr(self, name)) != 2:
                raise CheckpointError(f"audio_config: {name} must have 2 entries (two subsampling convolutions)")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.conf_num_attention_heads

    @property
    def time_stride(self) -> int:
        """Mel frames per conformer frame (the conv stem's time strides)."""
        return self.sscp_conv_stride_size[0][0] * self.sscp_conv_stride_size[1][0]

    @classmethod
    def from_hf_dict(cls, d: dict) -> "AudioConfig":
        """From the `audio_config` object of a Gemma 3n config.json; keys this class does not model are ignored."""
        known = {f.name for f in fields(cls)}
        kw = {}
        try:
            for key, value in d.items():
                if key not in known:
                    continue
                if isinstance(value, list):
                    value = tuple(tuple(v) if isinstance(v, list) else v for v in value)
                kw[key] = value
            return cls(**kw)
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"config.json: malformed audio_config ({e})") from None


# --- input handling -----------------------------------------------------------------------------------------------

_INT_SCALE = {np.dtype(np.int16): 32768.0, np.dtype(np.int32): 2147483648.0, np.dtype(np.int8): 128.0}


def load_audio(source: str | Path | np.ndarray, sample_rate: int | None = None) -> np.ndarray:
    """A WAV/FLAC path or an array [N] / [N, channels] -> float32 mono 16 kHz [N'].

    For a file, the sample rate is the file's; `sample_rate`, if given, must agree with it. For an array it defaults
    to 16000."""
    if isinstance(source, np.ndarray):
        name = "audio array"
        audio = _array_to_float(source, name)
        rate = SAMPLE_RATE if sample_rate is None else sample_rate
    elif isinstance(source, (str, Path)):
        name = str(source)
        audio, rate = _read_file(Path(source))
        if sample_rate is not None and sample_rate != rate:
            raise InputError(f"{name}: the file is {rate} Hz but sample_rate={sample_rate} was given")
    else:
        raise InputError(f"audio: expected a WAV/FLAC path or a numpy array, got {type(source).__name__}")
    if isinstance(rate, bool) or not isinstance(rate, (int, np.integer)) or not MIN_RATE <= rate <= MAX_RATE:
        raise InputError(f"{name}: sample rate {rate!r} Hz is not an integer in {MIN_RATE}..{MAX_RATE}")
    if audio.shape[0] == 0:
        raise InputError(f"{name}: the audio is empty (zero samples)")
    if not np.isfinite(audio).all():
        raise InputError(f"{name}: the audio contains NaN or infinite samples")
    mono = audio.mean(axis=1) if audio.shape[1] > 1 else audio[:, 0]
    if rate != SAMPLE_RATE:
        from scipy.signal import resample_poly

        g = math.gcd(int(rate), SAMPLE_RATE)
        mono = resample_poly(mono.astype(np.float64), SAMPLE_RATE // g, int(rate) // g)
    return np.ascontiguousarray(mono, dtype=np.float32)


def _array_to_float(a: np.ndarray, name: str) -> np.ndarray:
    """[N] or [N, channels] of any supported dtype -> float [N, channels]."""
    if a.ndim == 1:
        a = a[:, None]
    elif a.ndim != 2:
        raise InputError(f"{name}: expected shape [samples] or [samples, channels], got {list(a.shape)}")
    elif a.shape[1] > a.shape[0]:
        raise InputError(f"{name}: shape {list(a.shape)} has more channels than samples; expected [samples, channels]")
    if a.dtype in _INT_SCALE:
        return a.astype(np.float32) / _INT_SCALE[a.dtype]
    if a.dtype == np.uint8:  # 8-bit PCM is unsigned with 128 as silence
        return (a.astype(np.float32) - 128.0) / 128.0
    if a.dtype.kind == "f":
        return a.astype(np.float32, copy=False)
    raise InputError(f"{name}: dtype {a.dtype} is not supported (float, int16, int32, int8 or uint8 expected)")


# Sample rates and channel counts a clip may have. Beyond them a header is lying or the file is not speech: resampling
# from a rate of 2**31 Hz designs a filter of tens of billions of taps (the fuzzer found it: out of memory), and
# thousands of channels would size each decoded block by the header.
MIN_RATE, MAX_RATE, MAX_CHANNELS = 1_000, 384_000, 32

# The longest clip a prompt takes: 30 windows. Files are decoded block by block up to it, so a header that claims
# more frames than the file holds (or a long file) never sizes an allocation.
MAX_AUDIO_SECONDS = 30 * WINDOW_SECONDS


def _read_file(path: Path) -> tuple[np.ndarray, int]:
    import soundfile

    if not path.is_file():
        raise InputError(f"{path}: no such audio file")
    try:
        with soundfile.SoundFile(str(path)) as f:
            rate, limit = int(f.samplerate), int(MAX_AUDIO_SECONDS * f.samplerate)
            if not (MIN_RATE <= rate <= MAX_RATE and 0 < f.channels <= MAX_CHANNELS):
                raise InputError(f"{path}: the header gives {rate} Hz and {f.channels} channels (expected "
                                 f"{MIN_RATE}..{MAX_RATE} Hz, 1..{MAX_CHANNELS} channels)")
            blocks, frames = [], 0
            for block in f.blocks(blocksize=1 << 16, dtype="float32", always_2d=True):
                blocks.append(block)
                frames += len(block)
                if frames > limit:
                    raise InputError(f"{path}: longer than {MAX_AUDIO_SECONDS:.0f} s, the longest clip a prompt takes")
    except InputError:
        raise
    except Exception as e:  # libsndfile reports corrupt and unsupported files alike, as RuntimeError subclasses
        reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise InputError(f"{path}: cannot read as WAV/FLAC audio ({reason})") from None
    audio = np.concatenate(blocks) if blocks else np.zeros((0, 1), np.float32)
    return audio, rate


def audio_windows(waveform: np.ndarray, seconds: float = WINDOW_SECONDS) -> list[np.ndarray]:
    """Consecutive windows of at most `seconds` (16 kHz samples): a 31 s clip -> [30 s, 1 s]."""
    if waveform.ndim != 1 or waveform.shape[0] == 0:
        raise InputError(f"audio: expected a non-empty mono waveform [N], got shape {list(waveform.shape)}")
    size = int(round(seconds * SAMPLE_RATE))
    return [waveform[start : start + size] for start in range(0, waveform.shape[0], size)]


# --- log-mel features (transformers' Gemma3nAudioFeatureExtractor, published defaults) ----------------------------

FRAME_LENGTH = 512  # 32 ms
HOP_LENGTH = 160  # 10 ms
FFT_LENGTH = 1024  # next power of two of the frame, doubled ("FFT overdrive")
NUM_MEL_BINS = 128
MEL_FMIN, MEL_FMAX = 125.0, 7600.0
PREEMPHASIS = 0.97
MEL_FLOOR = 1e-5
PAD_TO_MULTIPLE_OF = 128


@lru_cache(maxsize=1)
def _mel_filterbank() -> np.ndarray:
    """[FFT_LENGTH // 2 + 1, 128] HTK-mel triangles without area normalisation, float64 as transformers builds it."""
    all_freqs = np.arange(FFT_LENGTH // 2 + 1, dtype=np.float32) * (SAMPLE_RATE / FFT_LENGTH)
    m_min = 2595.0 * math.log10(1.0 + MEL_FMIN / 700.0)
    m_max = 2595.0 * math.log10(1.0 + MEL_FMAX / 700.0)
    f_pts = 700.0 * (10 ** (np.linspace(m_min, m_max, NUM_MEL_BINS + 2) / 2595.0) - 1.0)
    f_diff = f_pts[1:] - f_pts[:-1]
    slopes = f_pts[None, :] - all_freqs[:, None]
    down = -slopes[:, :-2] / f_diff[:-1]
    up = slopes[:, 2:] / f_diff[1:]
    return np.maximum(np.zeros(1, dtype=np.float32), np.minimum(down, up))


@lru_cache(maxsize=1)
def _hann_window() -> np.ndarray:
    n = np.arange(FRAME_LENGTH, dtype=np.float32)
    return (0.5 * (1 - np.cos(2 * np.pi * n / FRAME_LENGTH))).astype(np.float32)


def padded_length(num_samples: int) -> int:
    """The samples log-mel framing reads: at least one frame, rounded up to PAD_TO_MULTIPLE_OF (zeros)."""
    return -(-max(num_samples, FRAME_LENGTH + 1) // PAD_TO_MULTIPLE_OF) * PAD_TO_MULTIPLE_OF


def num_frames(num_samples: int) -> int:
    """Mel frames of a clip of `num_samples` on its own (what transformers extracts for it alone)."""
    return (padded_length(num_samples) - FRAME_LENGTH - 1) // HOP_LENGTH + 1


def log_mel_features(waveform: np.ndarray, pad_to: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """16 kHz mono waveform [N] -> (log-mel features [frames, 128] float32, valid mask [frames] bool).

    Equal to Gemma3nAudioFeatureExtractor()(waveform) for one clip (no truncation: split long clips with
    `audio_windows` first). `pad_to` zero-pads the clip to that many samples first, as the extractor does with
    padding="max_length" (e.g. 480000 for the fixed-shape exported encoder). A frame is valid when its first sample
    is a real one, as transformers marks it."""
    waveform = np.asarray(waveform)
    if waveform.ndim != 1 or waveform.shape[0] == 0:
        raise InputError(f"audio: expected a non-empty mono waveform [N], got shape {list(waveform.shape)}")
    n = waveform.shape[0]
    target = padded_length(max(n, pad_to or 0))
    if pad_to is not None and n > pad_to:
        raise InputError(f"audio: {n} samples do not fit pad_to={pad_to}")
    # transformers computes in float32 (it casts float64 input down when padding); numpy >= 2 keeps rfft in float32.
    padded = np.zeros(target, dtype=np.float32)
    padded[:n] = waveform

    frames_plus_one = np.lib.stride_tricks.sliding_window_view(padded, FRAME_LENGTH + 1)[::HOP_LENGTH]
    # HTK pre-emphasis within each frame: the first sample is scaled by (1 - a), the rest get x[i] - a * x[i-1].
    first = frames_plus_one[:, :1] * (1.0 - PREEMPHASIS)
    rest = frames_plus_one[:, 1:-1] - PREEMPHASIS * frames_plus_one[:, :-2]
    frames = np.concatenate([first, rest], axis=-1) * _hann_window()
    magnitude = np.abs(np.fft.rfft(frames, n=FFT_LENGTH, axis=-1))
    mel = magnitude @ _mel_filterbank()
    features = np.log(np.maximum(mel, np.float64(MEL_FLOOR))).astype(np.float32)
    valid = np.arange(features.shape[0]) * HOP_LENGTH < n
    return features, valid


# --- encoder ------------------------------------------------------------------------------------------------------


class CumulativeGroupNorm(nn.Module):
    """Group norm (one group) whose mean and variance accumulate over time, so frame t sees only frames <= t (USM's
    streaming-friendly conv-stem norm). [B, T, F, C] -> same; statistics over (F, C), a scale per channel, fp32."""

    def __init__(self, num_channels: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_channels))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        B, T, Fd, C = xf.shape
        count = (torch.arange(1, T + 1, device=x.device, dtype=torch.float32) * (Fd * C)).view(1, T, 1, 1)
        mean = torch.cumsum(xf.sum(dim=(2, 3), keepdim=True), dim=1) / count
        # As in USM: each frame's squared deviation is taken from the running mean at that frame, then accumulated.
        var = torch.cumsum((xf - mean).pow(2).sum(dim=(2, 3), keepdim=True), dim=1) / count
        out = (xf - mean) * torch.rsqrt(var + self.eps) * self.weight.float()
        return out.to(x.dtype)


class SubSampleConvBlock(nn.Module):
    """Conv2d over (time, frequency), stride 2 in both, then cumulative group norm and ReLU. [B, C_in, T, F] ->
    [B, C_out, T', F']. Time is padded (0, k - 1) ("reverse causal") and frequency (1, 1), as USM pads."""

    def __init__(self, cfg: AudioConfig, idx: int, in_freq: int):
        super().__init__()
        in_channels = 1 if idx == 0 else cfg.sscp_conv_channel_size[idx - 1]
        out_channels = cfg.sscp_conv_channel_size[idx]
        (k_t, k_f), stride = cfg.sscp_conv_kernel_size[idx], cfg.sscp_conv_stride_size[idx]
        self.padding = (1, 1, 0, k_t - 1)
        self.conv = nn.Conv2d(in_channels, out_channels, (k_t, k_f), stride=tuple(stride), bias=False)
        self.time_stride = stride[0]
        self.out_freq = (in_freq + 2 - k_f) // stride[1] + 1
        self.norm = CumulativeGroupNorm(out_channels, cfg.sscp_conv_group_norm_eps)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv(F.pad(x, self.padding))
        x = self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return F.relu(x)


class SubSampleConvProjection(nn.Module):
    """USM's conv stem (SSCP): two strided conv blocks (4x fewer frames), then a linear projection to H.
    Mel features [B, T, 128] -> [B, T/4, H]."""

    def __init__(self, cfg: AudioConfig):
        super().__init__()
        self.conv_0 = SubSampleConvBlock(cfg, 0, cfg.input_feat_size)
        self.conv_1 = SubSampleConvBlock(cfg, 1, self.conv_0.out_freq)
        stem_width = cfg.sscp_conv_channel_size[1] * self.conv_1.out_freq
        self.input_proj_linear = nn.Linear(stem_width, cfg.hidden_size, bias=False)

    def forward(self, features: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        """padding_mask [B, T] (True = padded frame): each block's input is zeroed at padded frames, so past the end
        of a clip the convolutions see what they see past the end of an unpadded clip (their zero padding): a clip
        gives the same tokens alone, padded into a 30 s window, or beside a longer clip in a batch."""
        x = features.unsqueeze(1)
        for block in (self.conv_0, self.conv_1):
            if padding_mask is not None:
                x = x * (~padding_mask)[:, None, :, None].to(x.dtype)
                padding_mask = padding_mask[:, :: block.time_stride]  # a frame is padding when its first input is
            x = block(x)  # [B, C, T', F']
        B, C, T, Fd = x.shape
        return self.input_proj_linear(x.permute(0, 2, 3, 1).reshape(B, T, Fd * C))


def timing_signal(positions: Tensor, channels: int) -> Tensor:
    """Transformer sinusoids [len, channels] ([sin | cos], timescales 1 .. 1e4) for (relative) positions [len]."""
    num_timescales = channels // 2
    log_increment = math.log(1.0e4) / max(num_timescales - 1, 1)
    inv_timescales = torch.exp(torch.arange(num_timescales, device=positions.device) * -log_increment).float()
    scaled = positions.float()[:, None] * inv_timescales[None, :]
    return torch.cat([torch.sin(scaled), torch.cos(scaled)], dim=-1)


class RelativePositionEmbedding(nn.Module):
    """Transformer-XL style relative position term: queries against projected sinusoids of the distances
    left .. -right, shifted so that each (query, key) pair in a block picks its own distance.
    queries [B, U, W, N, D], keys [B, U, C, N, D] -> logits [B, N, U, W, C] (content + position terms)."""

    def __init__(self, cfg: AudioConfig):
        super().__init__()
        self.num_heads, self.head_dim, self.channels = cfg.conf_num_attention_heads, cfg.head_dim, cfg.hidden_size
        self.max_backward = max(0, cfg.conf_attention_context_left - 1)
        self.max_forward = cfg.conf_attention_context_right
        self.pos_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=False)

    def forward(self, queries: Tensor, keys: Tensor) -> Tensor:
        B, U, W, N, D = queries.shape
        C = keys.shape[2]
        distances = torch.arange(self.max_backward, -self.max_forward - 1, -1, device=queries.device)
        num_distances = distances.shape[0]
        sin_emb = self.pos_proj(timing_signal(distances, self.channels).to(queries.dtype))
        sin_emb = sin_emb.view(num_distances, N, D).permute(1, 2, 0)  # [N, D, F]

        q = queries.permute(0, 3, 1, 2, 4)  # [B, N, U, W, D]
        content = torch.matmul(q, keys.permute(0, 3, 1, 4, 2))  # [B, N, U, W, C]
        position = torch.matmul(q.reshape(B, N, U * W, D), sin_emb).view(B, N, U, W, num_distances)
        # Relative shift: pad the distance axis to C + 1 and re-read rows of length C, so that entry (w, c) becomes
        # position[w, c - w] (distance left - (c - w)), and 0 where c - w is out of range (masked later anyway).
        position = F.pad(position, (0, C + 1 - num_distances)).reshape(B, N, U, W * (C + 1))
        position = position[..., : W * C].reshape(B, N, U, W, C)
        return content + position


def block_context(x: Tensor, chunk: int, left: int, right: int) -> Tensor:
    """[B, T, ...] -> [B, U, chunk + left + right, ...]: for each block of `chunk` frames, the frames from `left`
    before its start to `right` after its end, zeros outside [0, T). A gather with a static index, not unfold, which
    lowers to as_strided that some mobile runtimes lack."""
    B, T = x.shape[:2]
    num_blocks = (T + chunk - 1) // chunk
    context = chunk + left + right
    pad_right = right + chunk - 1
    x = torch.cat([x.new_zeros((B, left, *x.shape[2:])), x, x.new_zeros((B, pad_right, *x.shape[2:]))], dim=1)
    starts = torch.arange(num_blocks, device=x.device)[:, None] * chunk
    index = (starts + torch.arange(context, device=x.device)[None, :]).flatten()
    return x.index_select(1, index).view(B, num_blocks, context, *x.shape[2:])


class LocalAttention(nn.Module):
    """USM's chunked local self-attention: queries in blocks of W frames, each attending to its own block and the
    `left - 1` frames before it (and `right` after); per-dimension learned query scale, relative positions, logits
    soft-capped with tanh. [B, T, H], padding mask [B, T] (True = padded) -> [B, T, N, D]."""

    def __init__(self, cfg: AudioConfig):
        super().__init__()
        self.num_heads, self.head_dim = cfg.conf_num_attention_heads, cfg.head_dim
        self.chunk_size = cfg.conf_attention_chunk_size
        self.max_past = max(0, cfg.conf_attention_context_left - 1)
        self.max_future = cfg.conf_attention_context_right
        self.logit_cap = float(cfg.conf_attention_logit_cap)
        self.relative_position_embedding = RelativePositionEmbedding(cfg)
        self.per_dim_scale = nn.Parameter(torch.zeros(self.head_dim))
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=False)
        # D^-0.5 / softplus(0), rounded to fp32 as the reference's buffer is (softplus(per_dim_scale=0) is then 1).
        r_softplus_0 = 1.0 / F.softplus(torch.tensor(0.0, device="cpu"))
        self.q_scale = float(self.head_dim**-0.5 * r_softplus_0)

    def local_mask(self, device: torch.device) -> Tensor:
        """[W, C]: query w of a block may see context position c when 0 <= c - w <= left - 1 + right."""
        w = torch.arange(self.chunk_size, device=device)[:, None]
        c = torch.arange(self.chunk_size + self.max_past + self.max_future, device=device)[None, :]
        return (c >= w) & (c <= w + self.max_past + self.max_future)

    def forward(self, x: Tensor, padding_mask: Tensor) -> Tensor:
        B, T, _ = x.shape
        N, D, W = self.num_heads, self.head_dim, self.chunk_size
        q = self.q_proj(x).view(B, T, N, D) * self.q_scale * F.softplus(self.per_dim_scale).view(1, 1, 1, D)
        k = self.k_proj(x).view(B, T, N, D)
        v = self.v_proj(x).view(B, T, N, D)

        U = (T + W - 1) // W
        q_blocks = torch.cat([q, q.new_zeros((B, U * W - T, N, D))], dim=1).view(B, U, W, N, D)
        k_blocks = block_context(k, W, self.max_past, self.max_future)  # [B, U, C, N, D]
        v_blocks = block_context(v, W, self.max_past, self.max_future)
        key_valid = block_context(~padding_mask, W, self.max_past, self.max_future)  # [B, U, C], False outside
        allowed = key_valid[:, None, :, None, :] & self.local_mask(x.device)  # [B, 1, U, W, C]

        logits = self.relative_position_embedding(q_blocks, k_blocks)
        logits = torch.tanh(logits / self.logit_cap) * self.logit_cap
        logits = torch.where(allowed, logits, torch.finfo(logits.dtype).min)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32).to(v.dtype)
        out = torch.matmul(probs, v_blocks.permute(0, 3, 1, 2, 4))  # [B, N, U, W, D]
        return out.permute(0, 2, 3, 1, 4).reshape(B, U * W, N, D)[:, :T]


class ConformerAttention(nn.Module):
    """Pre-norm local attention with a post-norm on its output, added to the residual. [B, T, H] -> [B, T, H]."""

    def __init__(self, cfg: AudioConfig):
        super().__init__()
        self.clip = float(cfg.gradient_clipping)
        self.pre_attn_norm = RMSNorm(cfg.hidden_size, 1e-6)  # the reference fixes 1e-6 here, not rms_norm_eps
        self.attn = LocalAttention(cfg)
        self.post = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=False)
        self.post_norm = RMSNorm(cfg.hidden_size, 1e-6)

    def forward(self, x: Tensor, padding_mask: Tensor) -> Tensor:
        h = self.attn(self.pre_attn_norm(x.clamp(-self.clip, self.clip)), padding_mask)
        h = self.post(h.flatten(2)).clamp(-self.clip, self.clip)
        return x + self.post_norm(h)


class ConformerFeedForward(nn.Module):
    """Conformer's half-step ("macaron") feed-forward: x + 0.5 * norm(W2 silu(W1 norm(x))). [B, T, H] -> same."""

    def __init__(self, cfg: AudioConfig):
        super().__init__()
        self.clip = float(cfg.gradient_clipping)
        self.residual_weight = cfg.conf_residual_weight
        self.pre_layer_norm = RMSNorm(cfg.hidden_size, 1e-6)
        self.ffw_layer_1 = nn.Linear(cfg.hidden_size, cfg.hidden_size * 4, bias=False)
        self.ffw_layer_2 = nn.Linear(cfg.hidden_size * 4, cfg.hidden_size, bias=False)
        self.post_layer_norm = RMSNorm(cfg.hidden_size, 1e-6)

    def forward(self, x: Tensor) -> Tensor:
        h = self.ffw_layer_1(self.pre_layer_norm(x.clamp(-self.clip, self.clip)))
        h = self.ffw_layer_2(F.silu(h)).clamp(-self.clip, self.clip)
        return x + self.post_layer_norm(h) * self.residual_weight


class LightConv1d(nn.Module):
    """Conformer's convolution module, lightweight: GLU, a causal depthwise conv over time, norm, SiLU, linear,
    plus the residual. [B, T, H] -> [B, T, H]."""

    def __init__(self, cfg: AudioConfig):
        super().__init__()
        H = cfg.hidden_size
        self.clip = float(cfg.gradient_clipping)
        self.pre_layer_norm = RMSNorm(H, cfg.rms_norm_eps)
        self.linear_start = nn.Linear(H, H * 2, bias=False)
        self.depthwise_conv1d = nn.Conv1d(H, H, cfg.conf_conv_kernel_size, groups=H, bias=False)
        self.conv_norm = RMSNorm(H, cfg.rms_norm_eps)
        self.linear_end = nn.Linear(H, H, bias=False)
        self.causal_padding = cfg.conf_conv_kernel_size - 1

    def forward(self, x: Tensor) -> Tensor:
        h = F.glu(self.linear_start(self.pre_layer_norm(x)), dim=-1)
        h = self.depthwise_conv1d(F.pad(h.transpose(1, 2), (self.causal_padding, 0))).transpose(1, 2)
        h = F.silu(self.conv_norm(h.clamp(-self.clip, self.clip)))
        return x + self.linear_end(h)


class ConformerBlock(nn.Module):
    """One conformer layer: FFN/2, local attention, light conv (padded frames zeroed first), FFN/2, norm."""

    def __init__(self, cfg: AudioConfig):
        super().__init__()
        self.clip = float(cfg.gradient_clipping)
        self.ffw_layer_start = ConformerFeedForward(cfg)
        self.attention = ConformerAttention(cfg)
        self.lconv1d = LightConv1d(cfg)
        self.ffw_layer_end = ConformerFeedForward(cfg)
        self.norm = RMSNorm(cfg.hidden_size, 1e-6)

    def forward(self, x: Tensor, padding_mask: Tensor) -> Tensor:
        x = self.attention(self.ffw_layer_start(x), padding_mask)
        x = self.lconv1d(x * (~padding_mask).unsqueeze(-1).to(x.dtype))
        return self.norm(self.ffw_layer_end(x).clamp(-self.clip, self.clip))


class AudioEncoder(nn.Module):
    """USM-style audio encoder (Gemma3nAudioEncoder): conv stem (4x), conformer blocks, 4x output reduction.

    features [B, T, 128], padding_mask [B, T] (True = padded frame) -> (encodings [B, N, H], padding_mask [B, N]),
    N = ceil(ceil(ceil(T / 2) / 2) / 4); padded tokens are zero."""

    def __init__(self, cfg: AudioConfig):
        super().__init__()
        self.cfg = cfg
        self.subsample_conv_projection = SubSampleConvProjection(cfg)
        self.conformer = nn.ModuleList(ConformerBlock(cfg) for _ in range(cfg.conf_num_hidden_layers))

    def forward(self, features: Tensor, padding_mask: Tensor) -> tuple[Tensor, Tensor]:
        x = self.subsample_conv_projection(features, padding_mask)
        T_in, T = padding_mask.shape[1], x.shape[1]
        # A subsampled frame is padding when the first mel frame of its receptive field is.
        index = torch.clamp(torch.arange(T, device=x.device) * self.cfg.time_stride, max=T_in - 1)
        mask = padding_mask.index_select(1, index)
        for block in self.conformer:
            x = block(x, mask)
        r = self.cfg.conf_reduction_factor
        x, mask = x[:, ::r], mask[:, ::r]
        return x.masked_fill(mask.unsqueeze(-1), 0.0), mask


def num_audio_tokens(num_frames: int, cfg: AudioConfig = AudioConfig()) -> int:
    """Encoder output length for `num_frames` mel frames."""
    t = num_frames
    for (k_t, _), (s_t, _) in zip(cfg.sscp_conv_kernel_size, cfg.sscp_conv_stride_size):
        t = (t + k_t - 1 - k_t) // s_t + 1
    return -(-t // cfg.conf_reduction_factor)


@torch.no_grad()
def encode_audio(encoder: AudioEncoder, waveform: np.ndarray) -> list[Tensor]:
    """16 kHz mono waveform -> per 30 s window, its valid tokens [N_i, H] (padded tokens dropped)."""
    param = next(encoder.parameters())
    out = []
    for window in audio_windows(waveform):
        features, valid = log_mel_features(window)
        feats = torch.from_numpy(features)[None].to(param.device, param.dtype)
        padding = torch.from_numpy(~valid)[None].to(param.device)
        encodings, mask = encoder(feats, padding)
        out.append(encodings[0][~mask[0]])
    return out
