"""The Gemma 3n vision path: an image -> [3, S, S] pixels in [0, 1] -> MobileNet-V5 -> [2048, 16, 16] = 256 soft tokens.

MobileNet-V5 (timm's `mobilenetv5_300m_enc`, which transformers wraps as the Gemma 3n vision tower) is built from
MobileNet-V4 blocks (arXiv 2404.10518): a conv stem, four stages of Edge Residual (fused inverted bottleneck),
Universal Inverted Residual (UIR) and Mobile Multi-Query Attention (MQA) blocks, and a Multi-Scale Fusion Adapter
(MSFA) that fuses the outputs of the last two stages into a 16x16 grid of 2048 channels, closed by an RMS norm.

Decisions (what the runtime does with images the user hands in):
- Input: an image file path (opened by PIL, EXIF orientation applied, as transformers does for paths), a
  PIL.Image, or a uint8 numpy array (H, W, 3) RGB, (H, W) or (H, W, 1) grayscale, or (H, W, 4) RGBA. A video is a
  list of frames, each one of those; it gives one row per frame. Anything else (float arrays, other ranks or
  channel counts, a 4-D array: pass a video as a list of frames) is an InputError.
- Colour: as transformers' processor converts with do_convert_rgb=True (its class default; without it transformers
  hands a 4-channel RGBA or 1-channel grayscale image through unconverted, which the encoder cannot take).
  PIL images: grayscale, palette and other modes go through PIL's convert("RGB"), and an image with transparency
  (an alpha band or a palette transparency entry) is first alpha-composited onto white by PIL.
  Arrays: grayscale is replicated to three channels; RGBA is composited onto white in float32 and scaled back to
  uint8 with torchvision, as transformers does for arrays (PIL's integer compositing can differ by one level).
  Paths are opened by PIL and treated as the PIL images they give (transformers' own path loader decodes with
  torchvision and drops an alpha channel instead of compositing; results differ only where pixels are transparent).
- Pixels are exactly those of the processor published with Gemma 3n (google/gemma-3n-E2B-it and -E4B-it:
  `SiglipImageProcessorFast`, i.e. transformers' torchvision-backend SiglipImageProcessor, with size 768x768,
  resample BILINEAR, do_rescale with 1/255, do_normalize false): each image is resized to S x S ignoring the aspect
  ratio, with torchvision's antialiased bilinear resize on the uint8 image, then multiplied by 1/255 in float32.
  There is no mean/std normalisation (the published config lists mean = std = 0.5 but switches normalisation off),
  so pixel values lie in [0, 1]; timm's config for this encoder also has mean 0, std 1.
- Sizes: S is 256, 512 or 768 (the resolutions the Gemma 3n model card lists; 768 is the processor's); any other is an
  InputError. The encoder gives 16x16 = 256 soft tokens at every one of them (the MSFA pools or upsamples to 16x16).
- A missing, unreadable or corrupt image file is an InputError whose one line names the file.

Shapes: B batch, C channels, H x W spatial, h x w the downsampled key/value grid of an attention block, N heads,
D key/value dim per head. Module and parameter names are timm's, so a checkpoint's
`model.vision_tower.timm_model.*` tensors load with the prefix stripped (strict). The model has no buffers, and
its 'same' paddings are computed from static shapes, so it builds on the meta device and exports at a fixed shape.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.errors import CheckpointError, InputError

ARCHITECTURE = "mobilenetv5_300m_enc"


# --- the architecture and its configuration ---------------------------------------------------------------------------


@dataclass(frozen=True)
class EdgeResidualSpec:
    """Fused inverted bottleneck: a full k x k expansion conv (which carries the stride), then a 1x1 projection."""

    out_chs: int
    kernel: int
    exp_ratio: float
    stride: int = 1


@dataclass(frozen=True)
class UIRSpec:
    """Universal Inverted Residual: optional depthwise conv (start_kernel), 1x1 expansion, optional depthwise conv
    (mid_kernel, which carries the stride), 1x1 projection. Kernel 0 means the conv is absent."""

    out_chs: int
    start_kernel: int
    mid_kernel: int
    exp_ratio: float
    stride: int = 1


@dataclass(frozen=True)
class MQASpec:
    """Mobile MQA: num_heads query heads sharing one key and one value head of head_dim, keys and values taken
    from a grid downsampled by kv_stride (a kv_kernel depthwise conv)."""

    out_chs: int
    num_heads: int
    head_dim: int
    kv_stride: int
    kv_kernel: int = 3


def _mqa_stage(chs: int, heads: int, head_dim: int, kv_stride: int, pairs: int) -> list:
    return [UIRSpec(chs, 0, 0, 2.0) if i % 2 else MQASpec(chs, heads, head_dim, kv_stride) for i in range(2 * pairs)]


# timm's `mobilenetv5_300m_enc` arch_def (er/uir/mqa block strings), stage by stage; widths before channel_multiplier.
# Only the first block of a stage strides; the stem strides too, so the stages run at 1/4, 1/8, 1/16 and 1/32.
MOBILENETV5_300M: tuple[tuple, ...] = (
    (EdgeResidualSpec(128, 3, 4.0, stride=2), EdgeResidualSpec(128, 3, 4.0), EdgeResidualSpec(128, 3, 4.0)),
    (
        UIRSpec(256, 3, 5, 6.0, stride=2),
        UIRSpec(256, 5, 0, 4.0),
        UIRSpec(256, 3, 0, 4.0),
        UIRSpec(256, 5, 0, 4.0),
        UIRSpec(256, 3, 0, 4.0),
    ),
    (
        UIRSpec(640, 5, 5, 6.0, stride=2),
        *[UIRSpec(640, 5, 0, 4.0)] * 7,
        UIRSpec(640, 0, 0, 1.0),
        *_mqa_stage(640, heads=12, head_dim=64, kv_stride=2, pairs=14),
    ),
    (UIRSpec(1280, 5, 5, 6.0, stride=2), *_mqa_stage(1280, heads=16, head_dim=96, kv_stride=1, pairs=19)),
)
STEM_CHANNELS = 64

# timm's decoded block arguments (its decode_arch_def's output, which model_args' `block_args` carries) of each kind,
# as far as they are fixed here: anything else (squeeze-excite, no skip, a third depthwise conv) is not supported.
_FIXED_BLOCK_ARGS = {
    "er": {"act_layer": None, "pw_kernel_size": 1, "force_in_chs": 0, "se_ratio": 0.0, "noskip": False},
    "uir": {"act_layer": None, "dw_kernel_size_end": 0, "se_ratio": 0.0, "noskip": False},
    "mqa": {"act_layer": None, "stride": 1, "noskip": False},
}


def timm_block_args(stages: tuple[tuple, ...]) -> list[list[dict]]:
    """The stages as timm's `block_args` (what decode_arch_def makes of their arch_def strings)."""

    def block(spec) -> dict:
        if isinstance(spec, EdgeResidualSpec):
            own = {"block_type": "er", "out_chs": spec.out_chs, "stride": spec.stride, "exp_kernel_size": spec.kernel,
                   "exp_ratio": spec.exp_ratio}
        elif isinstance(spec, UIRSpec):
            own = {"block_type": "uir", "out_chs": spec.out_chs, "stride": spec.stride,
                   "dw_kernel_size_start": spec.start_kernel, "dw_kernel_size_mid": spec.mid_kernel,
                   "exp_ratio": spec.exp_ratio}
        else:
            own = {"block_type": "mqa", "out_chs": spec.out_chs, "dw_kernel_size": spec.kv_kernel,
                   "num_heads": spec.num_heads, "key_dim": spec.head_dim, "value_dim": spec.head_dim,
                   "kv_stride": spec.kv_stride}
        return own | _FIXED_BLOCK_ARGS[own["block_type"]]

    return [[block(spec) for spec in stage] for stage in stages]


def stages_from_block_args(block_args) -> tuple[tuple, ...]:
    """model_args' `block_args` read back into stages; one CheckpointError naming the block for anything else."""
    where = "config.json: vision_config.model_args.block_args"
    if not isinstance(block_args, list) or len(block_args) < 2 or not all(
            isinstance(stage, list) and stage for stage in block_args):
        raise CheckpointError(f"{where} must be a list of at least two non-empty stages (lists of blocks)")
    stages, width = [], None
    for i, stage in enumerate(block_args):
        specs = []
        for j, b in enumerate(stage):
            kind = b.get("block_type") if isinstance(b, dict) else None
            if kind not in _FIXED_BLOCK_ARGS:
                raise CheckpointError(f"{where}[{i}][{j}]: block_type must be one of {sorted(_FIXED_BLOCK_ARGS)}, "
                                      f"got {kind!r}")
            fixed = {k: v for k, v in _FIXED_BLOCK_ARGS[kind].items() if b.get(k, v) != v}
            if fixed:
                raise CheckpointError(f"{where}[{i}][{j}]: {sorted(fixed)} not supported ({kind} blocks take "
                                      f"{_FIXED_BLOCK_ARGS[kind]})")
            try:
                if kind == "er":
                    spec = EdgeResidualSpec(int(b["out_chs"]), int(b["exp_kernel_size"]), float(b["exp_ratio"]),
                                            int(b["stride"]))
                elif kind == "uir":
                    spec = UIRSpec(int(b["out_chs"]), int(b["dw_kernel_size_start"]), int(b["dw_kernel_size_mid"]),
                                   float(b["exp_ratio"]), int(b["stride"]))
                else:
                    if b["key_dim"] != b["value_dim"] or b["out_chs"] != width:
                        raise ValueError("attention blocks keep the width, with key_dim = value_dim")
                    spec = MQASpec(int(b["out_chs"]), int(b["num_heads"]), int(b["key_dim"]), int(b["kv_stride"]),
                                   int(b["dw_kernel_size"]))
            except (KeyError, TypeError, ValueError) as e:
                raise CheckpointError(f"{where}[{i}][{j}]: malformed {kind} block ({e})") from None
            specs.append(spec)
            width = spec.out_chs
        stages.append(tuple(specs))
    return tuple(stages)


@dataclass(frozen=True)
class VisionConfig:
    """Gemma3nVisionConfig as far as the encoder is concerned: timm's `mobilenetv5_300m_enc` and its model_args.

    channel_multiplier scales every block's width (not the stem's when below 1, nor the attention heads, as in
    timm); 1.0 is the published encoder (E2B and E4B share it). stages: the blocks, stage by stage (default: the
    published architecture; model_args' `block_args`, which timm takes in place of its own, can give others). The
    MSFA always outputs `hidden_size` = 2048 channels on a 16x16 grid."""

    channel_multiplier: float = 1.0
    hidden_size: int = 2048
    msfa_output_resolution: int = 16
    rms_norm_eps: float = 1e-6  # timm's RmsNorm2d default; vision_config.rms_norm_eps is the embedder's, not this
    stages: tuple[tuple, ...] = MOBILENETV5_300M

    # Keys of model_args that only matter for training (dropout); anything else unknown is an error.
    _TRAINING_ONLY_ARGS = ("drop_rate", "drop_path_rate")

    def __post_init__(self):
        if not self.channel_multiplier > 0:
            raise CheckpointError(
                f"vision_config.model_args: channel_multiplier must be > 0, got {self.channel_multiplier}"
            )
        if self.hidden_size != 2048:
            raise CheckpointError(
                f"vision_config.hidden_size is {self.hidden_size}, but {ARCHITECTURE} always outputs 2048 channels"
            )

    @property
    def model_args(self) -> dict:
        """The timm.create_model keyword arguments that build the same network."""
        args = {} if self.channel_multiplier == 1.0 else {"channel_multiplier": self.channel_multiplier}
        if self.stages != MOBILENETV5_300M:
            args["block_args"] = timm_block_args(self.stages)
        return args

    @classmethod
    def from_hf_dict(cls, d: dict) -> "VisionConfig":
        """From the `vision_config` object of a Gemma 3n config.json (missing keys take transformers' defaults)."""
        architecture = d.get("architecture", ARCHITECTURE)
        if architecture != ARCHITECTURE:
            raise CheckpointError(
                f"config.json: vision_config.architecture is {architecture!r}; only {ARCHITECTURE!r} is supported"
            )
        args = d.get("model_args") or {}
        if not isinstance(args, dict):
            raise CheckpointError(f"config.json: vision_config.model_args must be an object, got {args!r}")
        unknown = sorted(set(args) - {"channel_multiplier", "block_args", *cls._TRAINING_ONLY_ARGS})
        if unknown:
            raise CheckpointError(
                f"config.json: vision_config.model_args {unknown} are not supported (only channel_multiplier and "
                "block_args)"
            )
        stages = stages_from_block_args(args["block_args"]) if "block_args" in args else MOBILENETV5_300M
        try:
            return cls(
                channel_multiplier=float(args.get("channel_multiplier", 1.0)),
                hidden_size=int(d.get("hidden_size", 2048)),
                stages=stages,
            )
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"config.json: malformed vision_config ({e})") from None


def make_divisible(v: float, divisor: int = 8, round_limit: float = 0.9) -> int:
    """timm's channel rounding: the nearest multiple of `divisor` (at least `divisor`), never more than 10% below v."""
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    if new_v < round_limit * v:
        new_v += divisor
    return new_v


def round_channels(channels: int, multiplier: float) -> int:
    return make_divisible(channels * multiplier)


# --- layers -------------------------------------------------------------------------------------------------------


def gelu(x: Tensor) -> Tensor:
    return F.gelu(x, approximate="tanh")


class RMSNorm2d(nn.Module):
    """RMS norm over the channels of [B, C, H, W], in the input's dtype as timm's RmsNorm2d computes it."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))

    def forward(self, x: Tensor) -> Tensor:
        x = x * torch.rsqrt(x.pow(2).mean(dim=1, keepdim=True) + self.eps)
        return x * self.weight.view(1, -1, 1, 1)


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow's SAME padding along one axis (before, after): the output has ceil(size / stride) positions and
    any odd padding goes after."""
    total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class Conv2dSame(nn.Conv2d):
    """nn.Conv2d with TensorFlow SAME padding (the checkpoint was trained in JAX, and timm builds this encoder with
    pad_type='same'). At stride 1 with an odd kernel that is the symmetric k // 2; a strided conv pads by the input's
    static size, one more row and column at the bottom and right for the even sizes used here."""

    def __init__(self, in_chs: int, out_chs: int, kernel: int, stride: int = 1, groups: int = 1, bias: bool = False):
        assert kernel % 2 == 1, "only odd kernels"
        padding = kernel // 2 if stride == 1 else 0
        super().__init__(in_chs, out_chs, kernel, stride, padding, groups=groups, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        if self.stride[0] > 1:
            (top, bottom), (left, right) = (same_padding(s, self.kernel_size[0], self.stride[0]) for s in x.shape[-2:])
            x = F.pad(x, (left, right, top, bottom))
        return super().forward(x)


class ConvNormAct(nn.Module):
    """conv -> RMS norm (`bn`, timm's name) -> optional GELU."""

    def __init__(self, in_chs: int, out_chs: int, kernel: int, stride: int = 1, groups: int = 1, bias: bool = False,
                 act: bool = True, eps: float = 1e-6):
        super().__init__()
        self.conv = Conv2dSame(in_chs, out_chs, kernel, stride, groups, bias)
        self.bn = RMSNorm2d(out_chs, eps)
        self.act = act

    def forward(self, x: Tensor) -> Tensor:
        x = self.bn(self.conv(x))
        return gelu(x) if self.act else x


class LayerScale2d(nn.Module):
    """Per-channel residual-branch scale (CaiT's LayerScale) on [B, C, H, W]."""

    def __init__(self, channels: int, init_value: float = 1e-5):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((channels,), init_value))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma.view(1, -1, 1, 1)


class EdgeResidual(nn.Module):
    """Edge Residual (EfficientNet-EdgeTPU's fused MBConv): [B, C, H, W] -> [B, C', H / stride, W / stride]."""

    def __init__(self, in_chs: int, out_chs: int, kernel: int, exp_ratio: float, stride: int, eps: float):
        super().__init__()
        mid_chs = make_divisible(in_chs * exp_ratio)
        self.conv_exp = Conv2dSame(in_chs, mid_chs, kernel, stride)
        self.bn1 = RMSNorm2d(mid_chs, eps)
        self.conv_pwl = Conv2dSame(mid_chs, out_chs, 1)
        self.bn2 = RMSNorm2d(out_chs, eps)
        self.has_skip = in_chs == out_chs and stride == 1

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn2(self.conv_pwl(gelu(self.bn1(self.conv_exp(x)))))
        return out + x if self.has_skip else out


class UniversalInvertedResidual(nn.Module):
    """MobileNet-V4's Universal Inverted Bottleneck: [B, C, H, W] -> [B, C', H / stride, W / stride].

    The optional depthwise convs make it an inverted bottleneck (mid only), a ConvNeXt-like block (start only), an
    ExtraDW block (both) or a plain FFN (neither). Only the expansion and the middle conv have an activation."""

    def __init__(self, in_chs: int, out_chs: int, start_kernel: int, mid_kernel: int, exp_ratio: float,
                 stride: int = 1, layer_scale: bool = True, skip: bool = True, eps: float = 1e-6):
        super().__init__()
        mid_chs = make_divisible(in_chs * exp_ratio)
        # The stride sits on the middle conv when there is one, otherwise on the start conv.
        self.dw_start = (ConvNormAct(in_chs, in_chs, start_kernel, 1 if mid_kernel else stride, groups=in_chs,
                                     act=False, eps=eps) if start_kernel else nn.Identity())
        self.pw_exp = ConvNormAct(in_chs, mid_chs, 1, eps=eps)
        self.dw_mid = (ConvNormAct(mid_chs, mid_chs, mid_kernel, stride, groups=mid_chs, eps=eps)
                       if mid_kernel else nn.Identity())
        self.pw_proj = ConvNormAct(mid_chs, out_chs, 1, act=False, eps=eps)
        self.layer_scale = LayerScale2d(out_chs) if layer_scale else nn.Identity()
        self.has_skip = skip and in_chs == out_chs and stride == 1

    def forward(self, x: Tensor) -> Tensor:
        out = self.layer_scale(self.pw_proj(self.dw_mid(self.pw_exp(self.dw_start(x)))))
        return out + x if self.has_skip else out


class Projection(nn.Module):
    """A 1x1 conv, after an optional strided depthwise conv + RMS norm (`down_conv`, `norm`) that shrinks the grid."""

    def __init__(self, in_chs: int, out_chs: int, down_stride: int = 1, down_kernel: int = 3, eps: float = 1e-6):
        super().__init__()
        self.down_stride = down_stride
        if down_stride > 1:
            self.down_conv = Conv2dSame(in_chs, in_chs, down_kernel, down_stride, groups=in_chs)
            self.norm = RMSNorm2d(in_chs, eps)
        self.proj = Conv2dSame(in_chs, out_chs, 1)

    def forward(self, x: Tensor) -> Tensor:
        if self.down_stride > 1:
            x = self.norm(self.down_conv(x))
        return self.proj(x)


class MultiQueryAttention2d(nn.Module):
    """Multi-query attention on a feature map: [B, C, H, W] -> [B, C', H, W]. N query heads attend to one shared
    key/value head (dim D) computed on the h x w grid (H / kv_stride); scale 1 / sqrt(D)."""

    def __init__(self, dim: int, dim_out: int, num_heads: int, head_dim: int, kv_stride: int, kv_kernel: int,
                 eps: float):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, head_dim
        self.query = Projection(dim, num_heads * head_dim)
        self.key = Projection(dim, head_dim, kv_stride, kv_kernel, eps)
        self.value = Projection(dim, head_dim, kv_stride, kv_kernel, eps)
        self.output = Projection(num_heads * head_dim, dim_out)

    def forward(self, x: Tensor) -> Tensor:
        B, _, H, W = x.shape
        N, D = self.num_heads, self.head_dim
        # With a single key/value head, the N heads' queries are just N * H * W rows against the same keys: one
        # plain matmul, with no broadcast over heads.
        q = self.query(x).reshape(B, N, D, H * W).transpose(-1, -2).reshape(B, N * H * W, D)
        k = self.key(x).reshape(B, D, -1)  # [B, D, hw]: already transposed for q @ k
        v = self.value(x).reshape(B, D, -1).transpose(-1, -2)  # [B, hw, D]
        attn = torch.softmax((q * D**-0.5) @ k, dim=-1)  # [B, N * HW, hw]
        o = (attn @ v).reshape(B, N, H * W, D)
        o = o.transpose(1, 2).reshape(B, H, W, N * D).permute(0, 3, 1, 2)  # channels head-major: [B, N * D, H, W]
        return self.output(o)


class MobileAttention(nn.Module):
    """The MQA block: x + layer_scale(attention(rms_norm(x))), [B, C, H, W] -> [B, C, H, W]."""

    def __init__(self, chs: int, spec: MQASpec, eps: float):
        super().__init__()
        self.norm = RMSNorm2d(chs, eps)
        self.attn = MultiQueryAttention2d(chs, chs, spec.num_heads, spec.head_dim, spec.kv_stride, spec.kv_kernel, eps)
        self.layer_scale = LayerScale2d(chs)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.layer_scale(self.attn(self.norm(x)))


class MultiScaleFusionAdapter(nn.Module):
    """MSFA: features of several scales [B, C_i, H_i, W_i] (the first the finest) -> [B, C_out, R, R].

    Coarser features are upsampled (nearest) to the finest grid, concatenated on channels, passed through a UIR
    FFN (no skip, no layer scale), brought to R x R (average pooling when the grid is a multiple of R, bilinear
    otherwise) and RMS-normalised."""

    def __init__(self, in_chs: int, out_chs: int, output_resolution: int, eps: float):
        super().__init__()
        self.output_resolution = output_resolution
        self.ffn = UniversalInvertedResidual(in_chs, out_chs, 0, 0, 2.0, layer_scale=False, skip=False, eps=eps)
        self.norm = RMSNorm2d(out_chs, eps)

    def forward(self, features: list[Tensor]) -> Tensor:
        H, W = features[0].shape[-2:]
        resized = [f if f.shape[-2] >= H and f.shape[-1] >= W else F.interpolate(f, size=(H, W), mode="nearest")
                   for f in features]
        x = self.ffn(torch.cat(resized, dim=1))
        R = self.output_resolution
        if (H, W) != (R, R):
            if H % R or W % R:
                x = F.interpolate(x, size=(R, R), mode="bilinear", align_corners=False)
            else:
                x = F.avg_pool2d(x, kernel_size=(H // R, W // R), stride=(H // R, W // R))
        return self.norm(x)


class MobileNetV5(nn.Module):
    """Gemma 3n's vision encoder: pixels [B, 3, S, S] in [0, 1] -> features [B, 2048, 16, 16] (the soft tokens,
    channels first, as transformers' vision tower returns them with do_pooling=False), for S = 256, 512 or 768."""

    def __init__(self, cfg: VisionConfig = VisionConfig()):
        super().__init__()
        self.config = cfg
        m, eps = cfg.channel_multiplier, cfg.rms_norm_eps
        stem_chs = STEM_CHANNELS if m < 1.0 else round_channels(STEM_CHANNELS, m)  # timm's fix_stem
        self.conv_stem = ConvNormAct(3, stem_chs, 3, stride=2, bias=True, eps=eps)
        in_chs, stages, stage_chs = stem_chs, [], []
        for stage in cfg.stages:
            blocks = []
            for spec in stage:
                out_chs = round_channels(spec.out_chs, m)
                if isinstance(spec, EdgeResidualSpec):
                    blocks.append(EdgeResidual(in_chs, out_chs, spec.kernel, spec.exp_ratio, spec.stride, eps))
                elif isinstance(spec, UIRSpec):
                    blocks.append(UniversalInvertedResidual(in_chs, out_chs, spec.start_kernel, spec.mid_kernel,
                                                            spec.exp_ratio, spec.stride, eps=eps))
                else:  # stages_from_block_args checked that it keeps the width
                    blocks.append(MobileAttention(in_chs, spec, eps))
                in_chs = out_chs
            stages.append(nn.Sequential(*blocks))
            stage_chs.append(in_chs)
        self.blocks = nn.Sequential(*stages)
        # The adapter fuses the last two stages (1/16 and 1/32 of the input).
        self.msfa = MultiScaleFusionAdapter(stage_chs[-2] + stage_chs[-1], cfg.hidden_size,
                                            cfg.msfa_output_resolution, eps)

    def forward(self, pixel_values: Tensor) -> Tensor:
        x = self.conv_stem(pixel_values)
        stage_outputs = []
        for stage in self.blocks:
            x = stage(x)
            stage_outputs.append(x)
        return self.msfa(stage_outputs[-2:])


# --- preprocessing ------------------------------------------------------------------------------------------------

IMAGE_SIZES = (256, 512, 768)
DEFAULT_IMAGE_SIZE = 768
RESCALE_FACTOR = 1 / 255


def preprocess_images(images, size: int = DEFAULT_IMAGE_SIZE) -> Tensor:
    """An image, or a list of images (a video's frames), -> pixel_values [N, 3, size, size] float32 in [0, 1].

    Each image: a file path, a PIL.Image, or a uint8 numpy array (H, W[, 1 | 3 | 4]). See the module docstring."""
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2.functional import resize

    if size not in IMAGE_SIZES:
        raise InputError(f"image size {size} is not supported; expected one of {', '.join(map(str, IMAGE_SIZES))}")
    frames = list(images) if isinstance(images, (list, tuple)) else [images]
    if not frames:
        raise InputError("no images given (an empty list of frames)")
    resized = []
    for i, frame in enumerate(frames):
        name = f"frame {i}" if isinstance(images, (list, tuple)) else "image"
        rgb = _rgb_uint8(frame, name)  # [3, H, W]
        # The same torchvision call on the uint8 image as transformers' processor makes (on x86 with AVX2 and on ARM
        # it resizes natively in uint8); resizing a float image instead would round differently.
        resized.append(resize(rgb[None], [size, size], interpolation=InterpolationMode.BILINEAR, antialias=True))
    # uint8 * python float -> float32, computed as transformers' rescale computes it.
    return torch.cat(resized) * RESCALE_FACTOR


def _rgb_uint8(image, name: str) -> Tensor:
    """One image -> a contiguous uint8 RGB tensor [3, H, W], converted as transformers' processor converts each kind."""
    from PIL import Image

    if isinstance(image, (str, os.PathLike)):
        image = _open_image(Path(image))
    if isinstance(image, np.ndarray):
        rgb = _array_to_rgb(image, name)
    elif isinstance(image, Image.Image):
        if "A" in image.getbands() or image.info.get("transparency") is not None:
            rgba = image.convert("RGBA")
            image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
        rgb = torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)
    else:
        raise InputError(
            f"{name}: expected an image path, a PIL.Image or a uint8 numpy array, got {type(image).__name__}"
        )
    if rgb.shape[1] == 0 or rgb.shape[2] == 0:
        raise InputError(f"{name}: the image is empty ({rgb.shape[2]}x{rgb.shape[1]} pixels)")
    return rgb.contiguous()


def _open_image(path: Path):
    import warnings

    from PIL import Image, ImageOps

    try:
        # PIL only warns between MAX_IMAGE_PIXELS and twice that (a decompression bomb's first stage): an error here.
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as opened:
                opened.load()
                image = ImageOps.exif_transpose(opened)
                return image.copy() if image is opened else image
    except FileNotFoundError:
        raise InputError(f"{path}: image file not found") from None
    except IsADirectoryError:
        raise InputError(f"{path}: is a directory, expected an image file") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        # PIL reports unknown formats as UnidentifiedImageError (an OSError) and truncated data as OSError.
        reason = " ".join(str(e).split()) or type(e).__name__
        raise InputError(f"{path}: not a readable image file ({reason})") from None


def _array_to_rgb(array: np.ndarray, name: str) -> Tensor:
    from torchvision.transforms.v2.functional import to_dtype

    if array.dtype != np.uint8:
        raise InputError(f"{name}: array of dtype {array.dtype}, expected uint8 pixel values 0..255")
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
        hint = " (pass a video as a list of frames)" if array.ndim == 4 else ""
        raise InputError(f"{name}: array of shape {tuple(array.shape)}, expected (H, W), (H, W, 1), (H, W, 3) or "
                         f"(H, W, 4){hint}")
    image = torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)
    if image.shape[0] == 1:
        return image.expand(3, -1, -1)
    if image.shape[0] == 4:
        # Composited onto white in float32 and scaled back with torchvision, as transformers does for RGBA arrays
        # (PIL's integer compositing, used for RGBA PIL images, can differ by one grey level).
        rgba = to_dtype(image, torch.float32, scale=True)
        alpha = rgba[3:]
        image = to_dtype(rgba[:3] * alpha + (1 - alpha), torch.uint8, scale=True)
    return image
