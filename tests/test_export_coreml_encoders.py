"""Core ML encoder packages beside model.mlpackage: vision_encoder.mlpackage (one function per image size, sharing
the weights) and audio_encoder.mlpackage, fp16 and int8 per channel, of the default whole model.

Linux has no Core ML runtime, so here the packages are checked through their specs and MIL programs (functions,
inputs, outputs, op counts, the int8 weights themselves) and their weight files; what fp16 and int8 cost is simulated
in eager PyTorch (exporters.coreml.simulate_encoder_errors), and the packages' own numerics against the float
PyTorch encoders run through the coreml-mil executor (the saved MIL programs), and through Core ML on macOS.
"""

import copy
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch
from coremltools.models.utils import load_spec

from contract.bundle import EMBEDDINGS_FILE, PLE_ASSET_FILE
from exporters.coreml import (
    AUDIO_PACKAGE,
    ENCODER_WEIGHT_OPS,
    VISION_PACKAGE,
    WEIGHTS_DIR,
    compress,
    convert_encoder_packages,
    export_coreml,
    fake_quantize_int8_per_channel_,
    load_mil_program,
    simulate_encoder_errors,
    summarize_mlpackage,
    write_package,
)
from exporters.spec import EXPORT_RECORD, ExportSpec
from models.encoders import AudioEmbedder, VisionEmbedder, golden_media
from models.errors import InputError
from runtime_py.executors.coreml_executor import CoreMLEncoders, coreml_can_predict
from runtime_py.executors.torch_executor import TorchEncoders

SPEC = ExportSpec(target="coreml", components=("decoder", "vision", "audio"), image_sizes=(256,), cache_len=64,
                  prefill_lengths=(16,))
INT8_SPEC = replace(SPEC, encoder_quant="int8-per-channel")
QUANTIZED = "constexpr_blockwise_shift_scale"


def write_encoder_packages(functions, spec, out_dir):
    for name, (fns, default) in functions.items():
        write_package(compress(fns, spec, spec.encoder_recipe, ENCODER_WEIGHT_OPS), out_dir, name, default)
    return out_dir


def signature(fn):
    """(inputs, outputs) of a function summary as (name, shape, dtype)."""
    features = lambda key: [(f["name"], f["shape"], f["dtype"]) for f in fn[key]]  # noqa: E731
    return features("inputs"), features("outputs")


def quantizable_weights(embedder):
    """The weights coremltools quantizes: of convolutions and linear layers, more than MIN_QUANTIZED_ELEMENTS."""
    return fake_quantize_int8_per_channel_(copy.deepcopy(embedder))


@pytest.fixture(scope="module")
def whole(default_gemma3n):
    return default_gemma3n


@pytest.fixture(scope="module")
def encoder_functions(whole):
    """The fp16 functions of both packages, converted once."""
    return convert_encoder_packages(whole, SPEC)


@pytest.fixture(scope="module")
def float_dir(encoder_functions, tmp_path_factory):
    return write_encoder_packages(encoder_functions, SPEC, tmp_path_factory.mktemp("coreml-enc-float"))


@pytest.fixture(scope="module")
def int8_dir(encoder_functions, tmp_path_factory):
    return write_encoder_packages(encoder_functions, INT8_SPEC, tmp_path_factory.mktemp("coreml-enc-int8"))


def test_float_packages_have_the_encoders_signatures_and_ops(whole, float_dir):
    H = whole.config.text.hidden_size
    vision, audio = summarize_mlpackage(float_dir / VISION_PACKAGE), summarize_mlpackage(float_dir / AUDIO_PACKAGE)
    assert vision["specification_version"] >= 9 and audio["specification_version"] >= 9  # iOS 18 multifunction

    assert list(vision["functions"]) == ["vision_encoder_256"] and vision["default_function"] == "vision_encoder_256"
    fn = vision["functions"]["vision_encoder_256"]
    assert signature(fn) == ([("pixel_values", [1, 3, 256, 256], "float32")],
                             [("image_embeddings", [1, 256, H], "float32")])
    assert fn["states"] == []
    embedder = VisionEmbedder(whole)
    # One MIL conv per convolution of MobileNet-V5, one softmax per multi-query attention block: nothing unrolled or
    # dropped; float weights are plain fp16 consts.
    assert fn["ops"]["conv"] == sum(isinstance(m, torch.nn.Conv2d) for m in embedder.modules()) == 41
    assert fn["ops"]["softmax"] == sum(type(m).__name__ == "MultiQueryAttention2d" for m in embedder.modules()) == 2
    assert not any(op.startswith("constexpr") for op in fn["ops"])

    assert list(audio["functions"]) == ["audio_encoder"] and audio["default_function"] == "audio_encoder"
    fn = audio["functions"]["audio_encoder"]
    assert signature(fn) == ([("features", [1, 2997, 128], "float32"), ("padding_mask", [1, 2997], "float32")],
                             [("audio_embeddings", [1, 188, H], "float32")])
    assert fn["states"] == []
    # The two subsampling convolutions and the conformer's depthwise conv; one attention (one conformer block); the
    # padding mask's subsampling is an int32 gather (Core ML gathers no bools).
    assert fn["ops"]["conv"] == 3 and fn["ops"]["softmax"] == 1
    assert fn["ops"]["gather"] >= 1 and not any(op.startswith("constexpr") for op in fn["ops"])


def test_float_vision_weights_are_fp16(whole, float_dir):
    embedder = VisionEmbedder(whole)
    # Every parameter is in the graph except the hard-token table (those rows are precomputed for the bundle).
    in_graph = sum(p.numel() for p in embedder.parameters()) - whole.embed_vision.embedding.weight.numel()
    weight_bytes = summarize_mlpackage(float_dir / VISION_PACKAGE)["weight_bytes"]
    # Measured 14,971,776 bytes for 7,468,560 weights: 2 bytes each plus blob alignment.
    assert 2 * in_graph <= weight_bytes <= 1.01 * 2 * in_graph


def test_int8_packages_quantize_every_conv_and_linear_weight_and_halve_the_vision_weights(whole, float_dir, int8_dir):
    for package, embedder in ((VISION_PACKAGE, VisionEmbedder(whole)), (AUDIO_PACKAGE, AudioEmbedder(whole))):
        summary, float_summary = summarize_mlpackage(int8_dir / package), summarize_mlpackage(float_dir / package)
        assert summary["default_function"] == float_summary["default_function"]
        for name, fn in summary["functions"].items():
            assert signature(fn) == signature(float_summary["functions"][name])
            # Exactly the weights the eager simulation rounds (vision 24: 23 convs and the embedder's projection;
            # audio 5 linears), and no folded activation constant.
            assert fn["ops"][QUANTIZED] == quantizable_weights(embedder)
    ratio = (summarize_mlpackage(int8_dir / VISION_PACKAGE)["weight_bytes"]
             / summarize_mlpackage(float_dir / VISION_PACKAGE)["weight_bytes"])
    # 1 byte instead of 2 per quantized weight, plus an fp16 scale per output channel and the small fp16 weights:
    # measured 0.518 (the published 84 blocks at the same width: 0.515).
    assert 0.5 <= ratio <= 0.53


def int8_levels(weight):
    """round(w / scale) per output channel, in the weight's dtype: the integers coremltools stores."""
    scale = weight.abs().amax(dim=tuple(range(1, weight.ndim)), keepdim=True) / 127
    return (weight / scale).round().clamp(-127, 127).to(torch.int8).numpy()


def test_int8_weights_are_rounded_as_the_simulation_rounds_them(whole, int8_dir):
    """The package's int8 data times its scales equals fake_quantize_int8_per_channel_ on the fp16 weights, so the
    simulated int8 error is the package's rounding error."""
    fp16 = copy.deepcopy(VisionEmbedder(whole)).half()
    rounded = copy.deepcopy(fp16)
    fake_quantize_int8_per_channel_(rounded)
    expected = {"p_" + name.replace(".", "_") + "_to_fp16_quantized": p.detach().numpy()
                for name, p in rounded.named_parameters()}
    package = int8_dir / VISION_PACKAGE
    spec = load_spec(str(package))
    program = load_mil_program(spec, spec.specificationVersion, str(package / WEIGHTS_DIR))
    quantized = [op for op in program.functions["vision_encoder_256"].operations if op.op_type == QUANTIZED]
    named = [op for op in quantized if op.name in expected]
    for op in named:
        dequantized = op.data.val.astype(np.float32) * op.scale.val.astype(np.float32)
        np.testing.assert_allclose(dequantized, expected[op.name].astype(np.float32), rtol=2e-3, atol=0)
    # The other two: coremltools folds each attention's layer scale into its output projection (a per-output-channel
    # factor, which per-channel rounding is blind to but for the fp16 rounding of the product: measured 1.4% of the
    # levels one off). The embedder's projection is a Linear kept whole (exporters.coreml.decompositions): named.
    fused = [op for op in quantized if op.name.startswith("mul_")]
    projections = [m.output.proj.weight.detach() for m in fp16.modules() if type(m).__name__ == "MultiQueryAttention2d"]
    assert (len(named), len(fused), len(quantized)) == (22, 2, 24)
    for op, weight in zip(fused, projections):
        levels = int8_levels(weight)
        assert op.data.val.shape == levels.shape
        differ = op.data.val.astype(np.int32) != levels
        assert differ.mean() <= 0.03 and np.abs(op.data.val.astype(np.int32) - levels).max() <= 1


def test_simulated_fp16_keeps_the_embeddings(whole):
    errors = simulate_encoder_errors(whole, (256,), audio=True, simulations=("fp16",))
    # Measured: vision 256 max abs 0.017 (embeddings up to 3.4), cosine 0.999995; audio 0.0044, 0.9999998.
    for case in ("vision_256", "audio"):
        assert errors[case]["fp16"]["cosine"] >= 0.9999
        assert errors[case]["fp16"]["max_abs"] <= 0.05


@pytest.mark.heavy
def test_simulated_int8_keeps_the_768_image_embeddings(whole):
    errors = simulate_encoder_errors(whole, (768,), audio=True, simulations=("int8-weights+fp16",))
    # The bar for a convnet's int8 weights: cosine >= 0.99 at 768 on the golden image. Measured 0.9988
    # (max abs 0.16 of 3.7); audio 0.999996.
    assert errors["vision_768"]["int8-weights+fp16"]["cosine"] >= 0.99
    assert errors["audio"]["int8-weights+fp16"]["cosine"] >= 0.99


@pytest.mark.heavy
def test_vision_sizes_share_one_copy_of_the_weights(whole, encoder_functions, float_dir, tmp_path):
    """(768, 256, 512): 768 the default, as in a bundle; the 256 function is the fixture's."""
    spec = replace(SPEC, components=("decoder", "vision"), image_sizes=(768, 512))
    functions, default = convert_encoder_packages(whole, spec)[VISION_PACKAGE]
    functions = {"vision_encoder_768": functions["vision_encoder_768"],
                 "vision_encoder_256": encoder_functions[VISION_PACKAGE][0]["vision_encoder_256"],
                 "vision_encoder_512": functions["vision_encoder_512"]}
    package = write_package(functions, tmp_path, VISION_PACKAGE, default)
    summary = summarize_mlpackage(package)
    assert summary["default_function"] == "vision_encoder_768"
    H = whole.config.text.hidden_size
    for size in (768, 256, 512):
        fn = summary["functions"][f"vision_encoder_{size}"]
        assert signature(fn) == ([("pixel_values", [1, 3, size, size], "float32")],
                                 [("image_embeddings", [1, 256, H], "float32")])
        assert fn["ops"]["conv"] == 41 and fn["ops"]["softmax"] == 2
    one_size = summarize_mlpackage(float_dir / VISION_PACKAGE)["weight_bytes"]
    # Measured: the same bytes (within the blob alignment) as one size; three copies would be 3x.
    assert one_size <= summary["weight_bytes"] <= 1.01 * one_size


@pytest.mark.heavy
def test_export_coreml_writes_every_package_reproducibly_and_leaves_the_model(whole, float_dir, tmp_path):
    """export_coreml of the decoder and the audio encoder gives the fixture's bytes. With the session's conversion
    memo (exporters.memo) the functions are copies of the fixture's conversions, packed again; that two independent
    conversions give the same bytes is tests/test_reproducible.py's check (two processes, memo off, every package of
    the make run bundles)."""
    before = {k: v.clone() for k, v in whole.state_dict().items()}
    out = tmp_path / "out"
    package = export_coreml(whole, replace(SPEC, components=("decoder", "audio")), out)
    assert package == out / "model.mlpackage"
    assert sorted(p.name for p in out.iterdir()) == sorted(["audio_encoder.mlpackage", EMBEDDINGS_FILE, EXPORT_RECORD,
                                                            "model.mlpackage", PLE_ASSET_FILE])
    # The fixture's bytes.
    for name in (AUDIO_PACKAGE,):
        files = sorted(p.relative_to(out / name) for p in (out / name).rglob("*") if p.is_file())
        assert files == sorted(p.relative_to(float_dir / name) for p in (float_dir / name).rglob("*") if p.is_file())
        for f in files:
            assert (out / name / f).read_bytes() == (float_dir / name / f).read_bytes(), f
    assert all(torch.equal(v, before[k]) for k, v in whole.state_dict().items())


def test_export_coreml_needs_a_whole_model_for_encoders(tmp_path):
    from models.default import default_model

    with pytest.raises(InputError, match="text-only checkpoint has no encoders"):
        export_coreml(default_model(), SPEC, tmp_path)


# --- runtime ------------------------------------------------------------------------------------------------------


def listed(spec):
    """What a bundle's manifest lists of its encoders: components and image sizes."""
    return spec.components, spec.image_sizes


def test_coreml_encoders_check_the_bundle_and_the_inputs(float_dir, tmp_path):
    encoders = CoreMLEncoders(float_dir, *listed(SPEC))
    assert (encoders.image_sizes, encoders.has_vision, encoders.has_audio) == ((256,), True, True)
    with pytest.raises(InputError, match=r"no vision encoder for 512 px \(it has 256\)"):
        encoders.image(np.zeros((1, 3, 512, 512), np.float32))
    with pytest.raises(InputError, match="has no function vision_encoder_512 .it has vision_encoder_256"):
        CoreMLEncoders(float_dir, *listed(replace(SPEC, image_sizes=(256, 512))))
    with pytest.raises(InputError, match="audio_encoder.mlpackage: missing"):
        CoreMLEncoders(tmp_path, *listed(replace(SPEC, components=("decoder", "audio"))))
    vision_only = CoreMLEncoders(float_dir, *listed(replace(SPEC, components=("decoder", "vision"))))
    with pytest.raises(InputError, match="no audio encoder"):
        vision_only.audio(np.zeros((1, 2997, 128), np.float32), np.zeros((1, 2997), np.float32))


@pytest.mark.skipif(sys.platform == "darwin", reason="on macOS the encoders run (the test below)")
def test_coreml_encoders_say_they_need_macos(float_dir):
    encoders = CoreMLEncoders(float_dir, *listed(SPEC))
    with pytest.raises(InputError, match="needs macOS"):
        encoders.image(np.zeros((1, 3, 256, 256), np.float32))


@pytest.mark.parametrize("backend", [
    pytest.param("coreml", marks=pytest.mark.skipif(
        not coreml_can_predict(), reason="Core ML predictions need macOS with coremltools' native runtime; on "
        f"{sys.platform} coremltools cannot load or predict (coreml-mil runs the same packages)")),
    "coreml-mil",
])
def test_coreml_encoders_match_the_float_pytorch_encoders(whole, float_dir, int8_dir, backend):
    golden = golden_media(whole, (256,))
    reference = TorchEncoders(whole)
    simulated = simulate_encoder_errors(whole, (256,), audio=True, simulations=("fp16", "int8-weights+fp16"))
    inputs = {"vision_256": (golden["pixel_values_256"].numpy(),),
              "audio": (golden["audio_features"].numpy(), golden["audio_padding_mask"].numpy())}
    for bundle, spec, simulation, min_cosine in ((float_dir, SPEC, "fp16", 0.9999),
                                                 (int8_dir, INT8_SPEC, "int8-weights+fp16", 0.99)):
        encoders = CoreMLEncoders(bundle, *listed(spec), backend)
        for case, run, expected in (("vision_256", encoders.image, reference.image),
                                    ("audio", encoders.audio, reference.audio)):
            actual, want = run(*inputs[case]), expected(*inputs[case])
            assert actual.shape == want.shape and actual.dtype == np.float32
            error = np.abs(actual - want).max()
            cosine = float((actual * want).sum() / np.linalg.norm(actual) / np.linalg.norm(want))
            # Core ML's fp16 kernels order their sums differently from PyTorch's: a margin of 4 over the simulation.
            assert error <= 4 * simulated[case][simulation]["max_abs"], (bundle.name, case, error)
            assert cosine >= min_cosine, (bundle.name, case, cosine)


def measure(out, sizes: tuple[int, ...] = (768, 256)) -> None:
    """Prints max abs error and cosine of the saved packages, run by the coreml-mil executor, against the float
    torch encoders on golden_media(), per size, float (fp16) and int8 per channel."""
    from pathlib import Path

    from models.default import default_gemma3n

    whole, out = default_gemma3n(), Path(out)
    golden = {k: v.numpy() for k, v in golden_media(whole, sizes).items()}
    spec = replace(SPEC, image_sizes=sizes)
    functions = convert_encoder_packages(whole, spec)
    for scheme, scheme_spec in (("fp16", spec), ("int8-per-channel", replace(spec, encoder_quant="int8-per-channel"))):
        folder = write_encoder_packages(functions, scheme_spec, out / scheme)
        encoders = CoreMLEncoders(folder, *listed(scheme_spec), "coreml-mil")
        cases = [(f"vision {s:3d}px", encoders.image, (golden[f"pixel_values_{s}"],), golden[f"image_embeddings_{s}"])
                 for s in sizes]
        cases.append(("audio       ", encoders.audio, (golden["audio_features"], golden["audio_padding_mask"]),
                      golden["audio_embeddings"]))
        for name, run, inputs, expected in cases:
            actual = run(*inputs)
            cosine = float((actual * expected).sum() / np.linalg.norm(actual) / np.linalg.norm(expected))
            print(f"{scheme:17s} {name}  max abs {np.abs(actual - expected).max():.3g}  cosine {cosine:.7f}")


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        measure(sys.argv[1] if len(sys.argv) > 1 else tmp)
