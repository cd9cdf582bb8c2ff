"""The vision path against its references: our MobileNetV5 against timm's `mobilenetv5_300m_enc` (the network that
transformers' Gemma 3n vision tower wraps) on the same random weights, and `preprocess_images` against transformers'
image processor with the settings published with Gemma 3n.

The narrow encoder here has the published 84 blocks at 1/16 width; the default model's shallow one (12 of those
blocks: models.hf_reference.SHALLOW_STAGES, given to timm as model_args' block_args) is checked the same way.

Tolerances: the encoder runs in fp32 through 84 blocks; ours computes the same operations but attention as plain
matmuls where timm calls scaled_dot_product_attention, so results differ by rounding only: max |ours - ref| must
stay within 1e-4 of max |ref| (measured: about 1e-6). Preprocessing does the same integer resize and the same
float32 rescale as transformers, so pixels must be identical (tolerance 0).

The measured numbers are printed: `.venv/bin/python -m pytest -q -s tests/test_vision.py -k "not heavy"`.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from models.errors import CheckpointError, InputError
from models.hf_reference import TEST_VISION_ARGS
from models.random_init import randomise_
from models.vision import (
    ARCHITECTURE,
    MOBILENETV5_300M,
    MobileNetV5,
    VisionConfig,
    preprocess_images,
    timm_block_args,
)

REL_TOL = 1e-4
SEED = 11
NARROW_ARGS = {"channel_multiplier": 0.0625}  # every block of the published encoder


def randomise_buffers_(model: torch.nn.Module, seed: int) -> list[str]:
    """Every floating buffer (norm running statistics, if a model has any) random and positive; returns their names."""
    gen = torch.Generator().manual_seed(seed)
    names = []
    with torch.no_grad():
        for name, b in sorted(model.named_buffers()):
            if b.is_floating_point():
                b.copy_(0.5 + torch.rand(b.shape, generator=gen))
                names.append(name)
    return names


def relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).abs().max() / ref.abs().max()).item()


def random_pixels(batch: int, size: int, seed: int) -> torch.Tensor:
    """Preprocessed-image-like input: values in [0, 1]."""
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def same_weights(model_args: dict) -> dict:
    """timm's encoder built from `model_args` with every parameter (and buffer) random, the same weights in
    transformers' vision tower and in ours (loaded strict, so the state-dict keys are timm's exactly)."""
    import timm
    from transformers import AutoModel, Gemma3nVisionConfig

    # copies: timm builds its blocks from block_args in place (models.hf_reference.timm_safe_build)
    timm_model = timm.create_model(ARCHITECTURE, pretrained=False, **copy.deepcopy(model_args)).eval()
    randomise_(timm_model, SEED)
    randomised_buffers = randomise_buffers_(timm_model, SEED)
    state = timm_model.state_dict()

    hf_config = Gemma3nVisionConfig(architecture=ARCHITECTURE, model_args=copy.deepcopy(model_args), hidden_size=2048)
    config_json = hf_config.to_dict()
    tower = AutoModel.from_config(hf_config).eval()
    tower.timm_model.load_state_dict(state, strict=True)

    ours = MobileNetV5(VisionConfig.from_hf_dict(config_json)).eval()
    ours.load_state_dict(state, strict=True)
    n_params = sum(p.numel() for p in ours.parameters())
    print(f"\n{sorted(model_args)}: {n_params} parameters, randomised buffers: {randomised_buffers}")
    return {"timm": timm_model, "tower": tower, "ours": ours, "eager_768": None}


@pytest.fixture(scope="module")
def narrow():
    return same_weights(NARROW_ARGS)


@torch.no_grad()
def test_the_default_models_shallow_encoder_matches_timm_and_transformers():
    """model_args' block_args (what the default model's config.json carries) build the same 12 blocks in timm,
    in transformers' vision tower and in ours."""
    shallow = same_weights(TEST_VISION_ARGS)
    assert [len(stage) for stage in shallow["ours"].blocks] == [len(stage) for stage in shallow["timm"].blocks] == [
        2, 2, 5, 3]
    x = random_pixels(1, 256, seed=5)
    ref = shallow["timm"].forward_features(x)
    assert torch.equal(shallow["tower"](pixel_values=x, do_pooling=False).last_hidden_state, ref)
    err = relative_error(shallow["ours"](x), ref)
    print(f"\nshallow encoder at 256x256: max|ours - timm| / max|timm| = {err:.2e}")
    assert err <= REL_TOL


@torch.no_grad()
def test_matches_timm_and_transformers_at_256(narrow):
    x = random_pixels(2, 256, seed=1)  # a batch: each image on its own
    ref = narrow["timm"].forward_features(x)
    tower = narrow["tower"](pixel_values=x, do_pooling=False).last_hidden_state
    ours = narrow["ours"](x)
    # transformers' vision tower (TimmWrapperModel, do_pooling=False) returns timm's forward_features as it is.
    assert torch.equal(tower, ref)
    assert ours.shape == ref.shape == (2, 2048, 16, 16)
    err = relative_error(ours, ref)
    print(f"\n256x256, batch 2: max|ours - timm| / max|timm| = {err:.2e} (max|timm| = {ref.abs().max():.3f})")
    assert err <= REL_TOL


@torch.no_grad()
def test_matches_timm_at_512(narrow):
    x = random_pixels(1, 512, seed=2)
    ref = narrow["timm"].forward_features(x)
    ours = narrow["ours"](x)
    assert ours.shape == ref.shape == (1, 2048, 16, 16)
    err = relative_error(ours, ref)
    print(f"\n512x512: max|ours - timm| / max|timm| = {err:.2e}")
    assert err <= REL_TOL


@torch.no_grad()
def test_matches_transformers_vision_tower_at_768(narrow):
    x = random_pixels(1, 768, seed=3)
    ref = narrow["tower"](pixel_values=x, do_pooling=False).last_hidden_state
    ours = narrow["ours"](x)
    narrow["eager_768"] = (x, ours)
    # transformers' get_image_features reads [1, 2048, 16, 16] as 256 soft tokens of 2048.
    assert ours.shape == ref.shape == (1, 2048, 16, 16)
    err = relative_error(ours, ref)
    print(f"\n768x768: max|ours - transformers tower| / max|ref| = {err:.2e}")
    assert err <= REL_TOL


@torch.no_grad()
def test_export_at_768_matches_eager(narrow):
    ours = narrow["ours"]
    if narrow["eager_768"] is None:
        x = random_pixels(1, 768, seed=3)
        narrow["eager_768"] = (x, ours(x))
    x, eager = narrow["eager_768"]
    program = torch.export.export(ours, (x,))
    exported = program.module()(x)
    err = relative_error(exported, eager)
    print(f"\nexported vs eager at 768x768: {err:.2e}")
    assert exported.shape == (1, 2048, 16, 16)
    assert err <= 1e-6


def test_published_encoder_matches_timm_on_meta():
    """The real 300M encoder (channel_multiplier 1.0): timm's state-dict keys, shapes and parameter count, and the
    output grid for every supported input size, checked on the meta device (no memory, no compute)."""
    import timm

    with torch.device("meta"):
        ref = timm.create_model(ARCHITECTURE, pretrained=False)
        ours = MobileNetV5()
    ref_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == ref_shapes
    n_ref, n_ours = (sum(p.numel() for p in m.parameters()) for m in (ref, ours))
    print(f"\npublished encoder: {n_ours} parameters (timm: {n_ref})")
    assert n_ours == n_ref
    for size in (768, 512, 256):
        assert ours(torch.empty(1, 3, size, size, device="meta")).shape == (1, 2048, 16, 16)


@pytest.mark.heavy
@torch.no_grad()
def test_published_encoder_matches_timm_numerically():
    """The full-width encoder at 768 on random weights (about 300M parameters, 2.4 GB for both copies)."""
    import timm

    ref = timm.create_model(ARCHITECTURE, pretrained=False).eval()
    randomise_(ref, SEED)
    randomise_buffers_(ref, SEED)
    ours = MobileNetV5().eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = random_pixels(1, 768, seed=4)
    err = relative_error(ours(x), ref.forward_features(x))
    print(f"\npublished encoder at 768x768: max|ours - timm| / max|timm| = {err:.2e}")
    assert err <= REL_TOL


def test_vision_config_from_hf_dict():
    published = {"architecture": ARCHITECTURE, "model_args": None, "hidden_size": 2048, "do_pooling": False}
    assert VisionConfig.from_hf_dict(published) == VisionConfig()
    assert VisionConfig.from_hf_dict({}) == VisionConfig()
    narrow = VisionConfig.from_hf_dict({"architecture": ARCHITECTURE, "model_args": TEST_VISION_ARGS})
    assert narrow.channel_multiplier == 0.0625 and narrow.model_args == TEST_VISION_ARGS
    with pytest.raises(CheckpointError, match="architecture is 'resnet50'"):
        VisionConfig.from_hf_dict({"architecture": "resnet50"})
    with pytest.raises(CheckpointError, match=r"model_args \['depth'\]"):
        VisionConfig.from_hf_dict({"model_args": {"depth": 3}})
    with pytest.raises(CheckpointError, match="hidden_size is 1024"):
        VisionConfig.from_hf_dict({"hidden_size": 1024})
    # The published blocks given as block_args are the published encoder.
    published_args = {"block_args": timm_block_args(MOBILENETV5_300M)}
    assert VisionConfig.from_hf_dict({"model_args": published_args}) == VisionConfig()


@pytest.mark.parametrize("block_args, message", [
    ([[{"block_type": "er", "out_chs": 8, "stride": 2, "exp_kernel_size": 3, "exp_ratio": 4.0}]],
     "at least two non-empty stages"),
    ([[{"block_type": "ir"}], [{"block_type": "er"}]], r"block_args\[0\]\[0\]: block_type must be one of"),
    ([[{"block_type": "er", "out_chs": 8, "stride": 2, "exp_kernel_size": 3, "exp_ratio": 4.0, "se_ratio": 0.25}],
      [{"block_type": "er"}]], r"block_args\[0\]\[0\]: \['se_ratio'\] not supported"),
    ([[{"block_type": "er", "out_chs": 8, "stride": 2, "exp_kernel_size": 3, "exp_ratio": 4.0}],
      [{"block_type": "uir", "out_chs": 16, "stride": 2, "dw_kernel_size_start": 3, "exp_ratio": 4.0}]],
     r"block_args\[1\]\[0\]: malformed uir block \('dw_kernel_size_mid'\)"),
    ([[{"block_type": "er", "out_chs": 8, "stride": 2, "exp_kernel_size": 3, "exp_ratio": 4.0}],
      [{"block_type": "mqa", "out_chs": 16, "dw_kernel_size": 3, "num_heads": 2, "key_dim": 8, "value_dim": 8,
        "kv_stride": 1}]], r"block_args\[1\]\[0\]: malformed mqa block \(attention blocks keep the width"),
])
def test_bad_block_args_name_the_block(block_args, message):
    with pytest.raises(CheckpointError, match=message):
        VisionConfig.from_hf_dict({"model_args": {"block_args": block_args}})


# --- preprocessing ------------------------------------------------------------------------------------------------

# What google/gemma-3n-E2B-it's preprocessor_config.json says about images (transformers' conversion script writes it
# from SiglipImageProcessorFast(size 768x768, resample BILINEAR, do_normalize False, mean = std = 0.5)).
PUBLISHED_IMAGE_PROCESSOR = {
    "image_processor_type": "SiglipImageProcessorFast",
    "processor_class": "Gemma3nProcessor",
    "do_resize": True,
    "size": {"height": 768, "width": 768},
    "resample": 2,
    "do_rescale": True,
    "rescale_factor": 0.00392156862745098,
    "do_normalize": False,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
    "image_seq_length": 256,
}


@pytest.fixture(scope="module")
def hf_processor(tmp_path_factory):
    """transformers' processor read from the published settings. do_convert_rgb=True (the class default) so that
    transformers converts grayscale and RGBA inputs at all; see the module docstring of models/vision.py."""
    from transformers import AutoImageProcessor

    directory = tmp_path_factory.mktemp("gemma3n-processor")
    (directory / "preprocessor_config.json").write_text(json.dumps(PUBLISHED_IMAGE_PROCESSOR))
    processor = AutoImageProcessor.from_pretrained(directory, do_convert_rgb=True)
    return lambda images, size=768: processor(
        images, size={"height": size, "width": size}, return_tensors="pt"
    ).pixel_values


def random_image(height: int, width: int, channels: int | None = 3, seed: int = 0) -> np.ndarray:
    shape = (height, width) if channels is None else (height, width, channels)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


@pytest.mark.parametrize("size", [768, 512, 256])
def test_preprocess_matches_transformers(hf_processor, size):
    from PIL import Image

    pixels = random_image(400, 600)  # non-square: resized to size x size, aspect ratio not kept
    image = Image.fromarray(pixels)
    ours, ref = preprocess_images(image, size), hf_processor(image, size)
    assert ours.dtype == torch.float32 and ours.shape == ref.shape == (1, 3, size, size)
    diff = (ours - ref).abs().max().item()
    print(f"\npreprocess 600x400 RGB -> {size}: max |ours - transformers| = {diff}")
    assert diff == 0
    assert torch.equal(preprocess_images(pixels, size), ours)
    assert 0 <= ours.min() and ours.max() <= 1


def _converted_inputs():
    from PIL import Image

    gray, rgba = random_image(300, 500, None, seed=1), random_image(300, 500, 4, seed=2)
    palette = Image.fromarray(random_image(300, 500, seed=3)).convert("P", palette=Image.Palette.ADAPTIVE)
    transparent_palette = palette.copy()
    transparent_palette.info["transparency"] = 7
    # (ours, transformers' input): transformers takes a grayscale array only with a channel axis.
    return {
        "gray PIL": (Image.fromarray(gray), Image.fromarray(gray)),
        "gray array": (gray, gray[..., None]),
        "gray array with channel axis": (gray[..., None], gray[..., None]),
        "RGBA PIL": (Image.fromarray(rgba), Image.fromarray(rgba)),
        "RGBA array": (rgba, rgba),
        "palette": (palette, palette),
        "palette with transparency": (transparent_palette, transparent_palette),
    }


@pytest.mark.parametrize("kind", list(_converted_inputs()))
def test_preprocess_converts_to_rgb_as_transformers(hf_processor, kind):
    ours_input, ref_input = _converted_inputs()[kind]
    ours, ref = preprocess_images(ours_input), hf_processor(ref_input)
    assert ours.shape == ref.shape == (1, 3, 768, 768)
    assert (ours - ref).abs().max().item() == 0


@pytest.mark.parametrize("name, orientation", [("photo.png", None), ("photo.jpg", None), ("rotated.jpg", 6)])
def test_preprocess_path_matches_transformers(hf_processor, tmp_path, name, orientation):
    """Paths: decoded (JPEG too) and turned upright by the EXIF orientation exactly as transformers loads them."""
    from PIL import Image

    path = tmp_path / name
    exif = Image.Exif()
    if orientation is not None:
        exif[0x0112] = orientation  # 6: the camera was rotated 90 degrees clockwise
    Image.fromarray(random_image(400, 600, seed=4)).save(path, exif=exif)
    ours = preprocess_images(path)
    assert torch.equal(ours, preprocess_images(str(path)))
    assert (ours - hf_processor(str(path))).abs().max().item() == 0
    if orientation is not None:
        assert not torch.equal(ours, preprocess_images(Image.open(path)))  # an opened image is taken as it is


def test_video_frames(hf_processor):
    frames = [random_image(240, 320, seed=s) for s in range(3)]
    video = preprocess_images(frames)
    assert video.shape == (3, 3, 768, 768)
    for i, frame in enumerate(frames):
        assert torch.equal(video[i : i + 1], preprocess_images(frame))
    assert torch.equal(video, hf_processor(frames))


def test_unreadable_image_files(tmp_path):
    corrupt = tmp_path / "x.png"
    corrupt.write_bytes(np.random.default_rng(0).integers(0, 256, 512, dtype=np.uint8).tobytes())
    with pytest.raises(InputError, match="x.png") as err:
        preprocess_images(corrupt)
    assert "\n" not in str(err.value)
    with pytest.raises(InputError, match="missing.jpg.*not found"):
        preprocess_images(str(tmp_path / "missing.jpg"))
    with pytest.raises(InputError, match="frame 1: array of dtype float64"):
        preprocess_images([random_image(8, 8), np.zeros((8, 8, 3))])


def test_a_decompression_bomb_is_refused_not_warned_about(tmp_path):
    """10000 x 10000 pixels, past PIL's MAX_IMAGE_PIXELS (89.5M) but under twice that, where PIL only warns: an
    error naming the file, before the pixels are decoded. (1-bit, so writing it takes 12.5 MB.)"""
    from PIL import Image

    bomb = tmp_path / "bomb.png"
    Image.new("1", (10_000, 10_000)).save(bomb)
    with pytest.raises(InputError, match="bomb.png: not a readable image file.*decompression bomb"):
        preprocess_images(bomb)


@pytest.mark.parametrize(
    "bad, message",
    [
        (np.zeros((8, 8, 3), dtype=np.float32), "dtype float32, expected uint8"),
        (np.zeros((8, 8, 5), dtype=np.uint8), r"shape \(8, 8, 5\)"),
        (np.zeros((2, 8, 8, 3), dtype=np.uint8), "as a list of frames"),
        (np.zeros(8, dtype=np.uint8), r"shape \(8,\)"),
        (np.zeros((0, 8, 3), dtype=np.uint8), "empty"),
        ([], "no images"),
        (torch.zeros(3, 8, 8), "got Tensor"),
    ],
)
def test_bad_inputs(bad, message):
    with pytest.raises(InputError, match=message):
        preprocess_images(bad)


def test_unsupported_size():
    with pytest.raises(InputError, match="image size 300 .* 256, 512, 768"):
        preprocess_images(random_image(8, 8), size=300)
