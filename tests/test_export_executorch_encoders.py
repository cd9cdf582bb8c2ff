"""ExecuTorch export of the whole default model: the vision and audio encoders as methods of the decoder's model.pte,
run by executorch.runtime (through ExecuTorchEncoders) against the float PyTorch encoders (TorchEncoders, the
reference: our model, itself checked against timm and transformers).

Lowering costs time per graph node whatever the width, so the float checks read the session's shared multimodal
bundle (tests/conftest.py) and the 8da8w lowering is the one of its own; the 768 px numbers and the several-size
checks are in the lead's report.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from contract.bundle import (
    AUDIO_ENCODER,
    MANIFEST,
    PTD_FILE,
    PTE_FILE,
    VISION_ENCODER,
    vision_encoder_name,
)
from exporters.executorch import (
    Int8WeightOnlyConv,
    XnnpackRMSNorm2d,
    encoder_programs,
    export_executorch,
    lower,
    swap_norms_,
)
from exporters.spec import ENCODER_QUANT_SCHEMES, ExportSpec
from models.default import default_gemma3n, default_model
from models.encoders import golden_media, runner_audio_input
from models.errors import InputError
from models.float32 import sharing_copy
from models.generate import prefill_and_decode_embeddings
from models.random_init import randomise_
from models.vision import Conv2dSame, RMSNorm2d
from runtime_py.executors.executorch_executor import ExecuTorchEncoders, load_program
from runtime_py.executors.torch_executor import TorchEncoders

# The shared float multimodal bundles (tests/conftest.py): 256 px, prefill 64, a 512-position cache, int8 PLE rows.
SIZE, CACHE_LEN, PROMPT_LEN, STEPS = 256, 512, 64, 8
SPEC = ExportSpec("executorch", cache_len=CACHE_LEN, prefill_lengths=(PROMPT_LEN,),
                  components=("decoder", "vision", "audio"), image_sizes=(SIZE,))


def cosine(a, b) -> float:
    a, b = (torch.as_tensor(x).double().flatten() for x in (a, b))
    return F.cosine_similarity(a, b, dim=0).item()


def max_abs(a, b) -> float:
    return (torch.as_tensor(a) - torch.as_tensor(b)).abs().max().item()


@pytest.fixture(scope="module")
def whole(default_gemma3n):
    return default_gemma3n


@pytest.fixture(scope="module")
def golden(whole):
    return golden_media(whole, (SIZE,))


@pytest.fixture(scope="module")
def float_bundle(multimodal_bundles):
    """The shared float executorch bundle of the default whole model (export_executorch's files and the bundle's)
    and its spec."""
    return multimodal_bundles / "executorch", SPEC


def listed(spec):
    """What a bundle's manifest lists of its encoders: components and image sizes."""
    return spec.components, spec.image_sizes


def plans(pte_bytes: bytes) -> dict[str, tuple[int, list[str]]]:
    """method -> (XNNPACK delegate calls, the operators it runs outside them), read from the serialized program."""
    from executorch.exir._serialize._program import deserialize_pte_binary

    program = deserialize_pte_binary(pte_bytes).program
    out = {}
    for plan in program.execution_plan:
        calls = [i.instr_args for i in plan.chains[0].instructions] if plan.chains else []
        kernels = [plan.operators[c.op_index].name for c in calls if type(c).__name__ == "KernelCall"]
        out[plan.name] = (sum(type(c).__name__ == "DelegateCall" for c in calls), kernels)
    return out


# --- without lowering ------------------------------------------------------------------------------------------


def test_text_only_model_refuses_encoders(tmp_path):
    with pytest.raises(InputError, match="no encoders"):
        export_executorch(default_model(), SPEC, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_xnnpack_norm_matches_rmsnorm2d():
    norm = RMSNorm2d(24, eps=1e-6)
    randomise_(norm, 3)
    x = torch.randn(1, 24, 8, 8, generator=torch.Generator().manual_seed(4)) * 3
    with torch.no_grad():
        # The mean of squares as a 1x1 convolution sums in another order: fp32 rounding only.
        torch.testing.assert_close(XnnpackRMSNorm2d(norm)(x), norm(x), rtol=1e-6, atol=1e-6)


def test_int8_weight_only_conv():
    conv = Conv2dSame(8, 16, 3, stride=2, bias=True)  # a strided conv pads by its input's size: the stem's case
    randomise_(conv, 5)
    x = torch.randn(1, 8, 16, 16, generator=torch.Generator().manual_seed(6))
    quantized = Int8WeightOnlyConv(conv)
    assert quantized.weight.dtype == torch.int8 and quantized.scales.numel() == 16
    scales = quantized.scales.view(-1, 1, 1, 1)
    with torch.no_grad():
        padded = F.pad(x, (0, 1, 0, 1))
        dequantized = F.conv2d(padded, quantized.weight.float() * scales, conv.bias, stride=2)
        out, reference = quantized(x), conv(x)
        # Per-channel int8 keeps each weight within half a step of its value: each output within sum |x| * step / 2.
        bound = F.conv2d(padded.abs(), (scales / 2).expand_as(conv.weight), stride=2)
    torch.testing.assert_close(out, dequantized, rtol=1e-5, atol=1e-5)
    assert ((out - reference).abs() <= bound + 1e-5).all() and 0 < max_abs(out, reference)


def test_sharing_copy_swaps_without_touching_the_model(whole):
    tower = whole.vision_tower.conv_stem
    copied = sharing_copy(tower)
    swap_norms_(copied)
    assert isinstance(tower.bn, RMSNorm2d) and isinstance(copied.bn, XnnpackRMSNorm2d)
    assert copied.conv.weight is tower.conv.weight and copied.bn.weight is tower.bn.weight


# --- the float export: decoder, vision (256 px) and audio in one program ------------------------------------------


@pytest.mark.heavy
def test_methods_delegates_and_shared_weights(float_bundle, whole):
    out, _ = float_bundle
    pte = out / PTE_FILE
    assert {PTE_FILE, PTD_FILE} <= {p.name for p in out.iterdir()}
    assert json.loads((out / MANIFEST).read_text())["export_spec"] == json.loads(json.dumps(SPEC.as_dict()))
    program = load_program(pte, out / PTD_FILE)
    assert {VISION_ENCODER, vision_encoder_name(SIZE), AUDIO_ENCODER, "text_decoder", "token_embedding",
            "get_image_sizes"} <= program.method_names
    assert list(program.load_method("get_image_sizes").execute([])) == [SIZE]
    data = pte.read_bytes()
    counts = plans(data)
    # XNNPACK runs the whole vision graph but the nearest-neighbour upsampling of the MSFA, which splits it in two.
    for method in (VISION_ENCODER, vision_encoder_name(SIZE)):
        assert counts[method] == (2, ["aten::upsample_nearest2d"]), counts[method]
    # The default-size method repeats vision_encoder_256 and reads the same weights: each is stored once.
    largest = max((m for m in whole.vision_tower.modules() if isinstance(m, torch.nn.Conv2d)
                   and m.kernel_size == (1, 1)), key=lambda m: m.weight.numel())
    assert data.count(largest.weight.detach().numpy().tobytes()) == 1
    print("delegates / portable ops:", {k: (d, len(ops)) for k, (d, ops) in counts.items()})


@pytest.mark.heavy
def test_encoders_match_torch(float_bundle, whole, golden):
    bundle, spec = float_bundle
    encoders, reference = ExecuTorchEncoders(bundle / PTE_FILE, bundle / PTD_FILE, *listed(spec)), TorchEncoders(whole)
    assert (encoders.image_sizes, encoders.has_vision, encoders.has_audio) == ((SIZE,), True, True)
    pixels = golden[f"pixel_values_{SIZE}"].numpy()
    image, image_ref = encoders.image(pixels), reference.image(pixels)
    assert image.shape == (1, 256, whole.config.text.hidden_size)
    # fp32 throughout; XNNPACK's kernels (convs in NHWC, tanh-form GELU, the norms' 1x1 means) round differently:
    # measured 1.1e-5 on embeddings up to ~3.4.
    assert max_abs(image, image_ref) < 1e-4, max_abs(image, image_ref)
    features, mask = golden["audio_features"].numpy(), golden["audio_padding_mask"].numpy()
    audio, audio_ref = encoders.audio(features, mask), reference.audio(features, mask)
    assert audio.shape == (1, 188, whole.config.text.hidden_size)
    assert max_abs(audio, audio_ref) < 2e-5, max_abs(audio, audio_ref)  # measured 2.2e-6
    # The default method is the same graph as the sized one. Beside each output position it puts the per-layer rows
    # that token_embedding gives the image soft token (row 0 of the PLE table), which text_decoder reads there.
    default = encoders.program.load_method(VISION_ENCODER).execute([torch.from_numpy(pixels)])[0].numpy()
    H = whole.config.text.hidden_size
    np.testing.assert_array_equal(default[..., :H], image)
    ids = torch.tensor([[whole.config.tokens.image, 0]])
    rows = encoders.program.load_method("token_embedding").execute([ids])[0].numpy()[0, :, H:]
    np.testing.assert_array_equal(rows[0], rows[1])
    np.testing.assert_array_equal(default[0, :, H:], np.broadcast_to(rows[0], (256, rows.shape[1])))
    print(f"float vision {SIZE}: max abs {max_abs(image, image_ref):.2e}; audio: {max_abs(audio, audio_ref):.2e}")

    with pytest.raises(InputError, match="no vision encoder for 512 px"):
        encoders.image(np.zeros((1, 3, 512, 512), np.float32))
    with pytest.raises(InputError, match="expected"):
        encoders.audio(features[:, :100], mask[:, :100])
    with pytest.raises(InputError, match="vision_encoder_512"):
        ExecuTorchEncoders(bundle / PTE_FILE, bundle / PTD_FILE, spec.components, (SIZE, 512))


@pytest.mark.heavy
def test_decoder_shares_its_cache_beside_the_encoders(float_bundle, golden):
    """Prefill, an image through the vision encoder, then decode steps: decode still reads the cache that prefill
    wrote (the encoders have no mutable buffers and plan their own memory), as in eager PyTorch."""
    bundle, _ = float_bundle
    program = load_program(bundle / PTE_FILE, bundle / PTD_FILE)
    token_embedding = program.load_method("token_embedding")
    text_decoder = program.load_method("text_decoder")
    vision = program.load_method(VISION_ENCODER)

    decoder = default_model()  # default_gemma3n's decoder has these weights
    cfg = decoder.config
    # Text ids only: the whole model's token_embedding gives media ids the embedders' rows.
    prompt = torch.randint(0, cfg.vocab_size_per_layer_input, (1, PROMPT_LEN),
                           generator=torch.Generator().manual_seed(1))

    def joined(ids):
        return token_embedding.execute([ids])[0]

    def inputs(ids):
        out = joined(ids)
        H = cfg.hidden_size
        return out[..., :H], out[..., H:].reshape(*ids.shape, cfg.num_layers, cfg.hidden_size_per_layer_input)

    # The eager decoder on the program's own lookups (the bundle keeps the PLE table as int8 rows): what is compared
    # is the decoder graphs and their shared cache.
    with torch.no_grad():
        prefill_logits, step_logits, tokens = prefill_and_decode_embeddings(decoder, *inputs(prompt), STEPS, CACHE_LEN,
                                                                            embed=inputs)
    reference = [prefill_logits[0, -1]] + [s[0] for s in step_logits]

    logits = [text_decoder.execute([joined(prompt), torch.arange(PROMPT_LEN)])[0][0, -1]]
    vision.execute([golden[f"pixel_values_{SIZE}"]])
    for pos, token in enumerate(tokens[:STEPS], start=PROMPT_LEN):
        logits.append(text_decoder.execute([joined(torch.tensor([[token]])), torch.tensor([pos])])[0][0, -1])
    errors = [max_abs(a, b) for a, b in zip(logits, reference)]
    assert max(errors) <= 1e-4, errors  # as the decoder-only export (test_export_executorch)
    assert [int(x.argmax()) for x in logits] == tokens


# --- the encoders quantized ------------------------------------------------------------------------------------


@pytest.mark.heavy
def test_8da8w_audio_encoder(whole, golden, tmp_path):
    """The bundles' int8 scheme (runtime_py.bundle.ENCODER_QUANT_LEVELS): int8 per-channel weights and dynamically
    quantized activations for every Linear and 2-D convolution but the depthwise ones, run by XNNPACK. The audio
    encoder's convolutions are fed by other nodes than the graph input, which ExecuTorch 1.5.1's layout pass gets
    wrong unless bounded (bounded_dynamic_quant_layout). The vision encoder's 8da8w lowering (the same code at
    768 px) is checked once, by `make compare`'s executorch/int8 row (cosine 0.998 against the float encoder)."""
    spec = ExportSpec("executorch", components=("decoder", "audio"), encoder_quant="8da8w")
    programs = encoder_programs(whole, spec)
    eager = programs[AUDIO_ENCODER].module()
    pte = tmp_path / PTE_FILE
    pte.write_bytes(lower(programs, {}).buffer)
    program = load_program(pte, None)
    features, mask = golden["audio_features"].numpy(), golden["audio_padding_mask"].numpy()
    packed = torch.from_numpy(runner_audio_input(features, mask))
    H = whole.config.text.hidden_size
    audio = program.load_method(AUDIO_ENCODER).execute([packed])[0][..., :H]
    audio_ref = golden["audio_embeddings"]
    with torch.no_grad():
        audio_eager = eager(packed)[..., :H]
    print(f"8da8w audio: max abs {max_abs(audio, audio_ref):.3f} cosine {cosine(audio, audio_ref):.5f}; "
          f"eager PT2E reference: {cosine(audio_eager, audio_ref):.5f}; .pte {pte.stat().st_size:,} B")
    # Measured 0.99996.
    assert cosine(audio, audio_ref) >= 0.99
    # XNNPACK picks the activations' ranges and rounds by itself, so the program does not repeat the eager PT2E
    # reference bit for bit; it stays as close to float as that reference is (measured 1 - cosine 3.9e-5 against the
    # reference's 4.3e-5).
    assert 1 - cosine(audio, audio_ref) <= 1.2 * (1 - cosine(audio_eager, audio_ref))
    print("audio delegates / portable ops:", plans(pte.read_bytes())[AUDIO_ENCODER])


# --- measurements for the report --------------------------------------------------------------------------------------


def measure(out: Path, sizes: tuple[int, ...] = (768, 256), schemes=tuple(ENCODER_QUANT_SCHEMES["executorch"])) -> None:
    """Prints max abs error and cosine against the float torch encoders on golden_media(), per size and scheme
    (each scheme's encoders lowered alone, as export_executorch lowers them), with the .pte sizes and lowering
    times."""
    import time

    model = default_gemma3n()
    media = golden_media(model, sizes)
    out.mkdir(parents=True, exist_ok=True)
    for scheme in schemes:
        spec = ExportSpec("executorch", components=("decoder", "vision", "audio"), image_sizes=sizes,
                          encoder_quant=scheme)
        t0 = time.perf_counter()
        pte = out / f"encoders-{scheme}.pte"
        pte.write_bytes(lower(encoder_programs(model, spec), {}).buffer)
        seconds = time.perf_counter() - t0
        program = load_program(pte, None)
        H = model.config.text.hidden_size
        for size in sizes:
            image = program.load_method(vision_encoder_name(size)).execute([media[f"pixel_values_{size}"]])[0][..., :H]
            ref = media[f"image_embeddings_{size}"]
            print(f"{scheme:17s} vision {size:3d}px  max abs {max_abs(image, ref):.3g}  mean abs "
                  f"{(image - ref).abs().mean():.3g}  cosine {cosine(image, ref):.6f}")
        packed = runner_audio_input(media["audio_features"].numpy(), media["audio_padding_mask"].numpy())
        audio = program.load_method(AUDIO_ENCODER).execute([torch.from_numpy(packed)])[0][..., :H]
        ref = media["audio_embeddings"]
        print(f"{scheme:17s} audio        max abs {max_abs(audio, ref):.3g}  mean abs {(audio - ref).abs().mean():.3g}  "
              f"cosine {cosine(audio, ref):.6f}")
        print(f"   {pte.name}: {pte.stat().st_size / 1e6:.2f} MB, exported and lowered in {seconds:.0f} s", flush=True)


if __name__ == "__main__":
    import sys
    import tempfile

    # python tests/test_export_executorch_encoders.py [DIR [SCHEME,SCHEME...]]
    with tempfile.TemporaryDirectory() as tmp:
        measure(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tmp),
                schemes=sys.argv[2].split(",") if len(sys.argv) > 2 else tuple(ENCODER_QUANT_SCHEMES["executorch"]))
