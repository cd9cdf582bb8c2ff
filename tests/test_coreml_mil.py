"""The coreml-mil executor (runtime_py.executors.mil) against PyTorch, on small programs that coremltools converts from
torch: every op our packages contain, states across calls, and the compressed weights.

A program converted with fp32 compute must give PyTorch's result to float32 rounding; with fp16 compute, within what
fp16 costs (each op's result rounded to fp16). Each few-op module below covers the ops in its comment.
"""

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from exporters.coreml import compress, convert_program
from exporters.spec import ExportSpec
from runtime_py.executors.coreml_executor import coreml_can_predict
from runtime_py.executors.mil import MilOpError, MilPackage, covered_ops


def convert(module: nn.Module, args: tuple, path, precision: str = "fp32", quant: str = "none"):
    """module -> a saved .mlpackage, converted and compressed as the exporters do (exporters.coreml.convert_program
    and compress, `quant` one of the coreml export schemes), at path; its function "main", run at `precision`."""
    with torch.no_grad():
        program = torch.export.export(module.eval(), args)
    mlmodel = compress({"main": convert_program(program, fp16=precision == "fp16")},
                       ExportSpec("coreml", quant=quant, block_size=32))["main"]
    mlmodel.save(str(path))
    return MilPackage(path, precision).function("main")


def run(function, args) -> np.ndarray:
    inputs = {name: a.numpy() for name, a in zip(function.inputs, args)}
    return next(iter(function.predict(inputs).values()))


class Convs(nn.Module):
    """conv (1-d, 2-d, strided, dilated, depthwise, grouped), pad (constant, reflect, replicate), avg_pool,
    upsample_nearest_neighbor, relu, silu, sigmoid"""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=8)
        self.c = nn.Conv2d(8, 8, 1, groups=2, bias=False)
        self.d = nn.Conv1d(8, 4, 5, padding=2)

    def forward(self, x):
        x = torch.relu(self.a(x))
        x = F.silu(self.b(F.pad(x, (1, 1, 1, 1), mode="reflect")))
        x = torch.sigmoid(self.c(F.pad(x, (0, 1, 0, 1), mode="replicate")))
        x = F.interpolate(F.avg_pool2d(F.pad(x, (1, 0, 0, 1)), 2), scale_factor=2, mode="nearest")
        return self.d(x.flatten(2))


class Attention(nn.Module):
    """linear, matmul (transposed), softmax, gelu (exact, tanh), rsqrt, pow, reduce_mean, reduce_sum, reduce_max,
    tanh, clip, cos, sin, concat, transpose, reshape, expand_dims, squeeze, tile, split, slice_by_index (negative
    stride), select, comparisons, logical ops, cumsum, cast, gather"""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(16, 16), nn.Linear(16, 16, bias=False), nn.Linear(16, 16)
        self.table = nn.Parameter(torch.randn(10, 16))
        self.register_buffer("angles", torch.randn(7, 8))

    def forward(self, x, ids):
        B, T, H = x.shape
        x = x + self.table[ids]
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
        rope = torch.cat([self.angles.cos(), self.angles.sin()], dim=-1)
        q = (self.q(x) * rope).reshape(B, T, 2, 8).transpose(1, 2)
        k = self.k(x).reshape(B, T, 2, 8).transpose(1, 2)
        v = self.v(x).reshape(B, T, 2, 8).transpose(1, 2)
        scores = torch.tanh(q @ k.transpose(-1, -2) / 4.0) * 4.0
        causal = torch.arange(T)[:, None] >= torch.arange(T)[None, :]
        window = (torch.arange(T)[:, None] - torch.arange(T)[None, :]) < 3
        scores = torch.where(causal & window, scores, torch.tensor(-1e4))
        out = (torch.softmax(scores, dim=-1) @ v).transpose(1, 2).reshape(B, T, H)
        left, right = out.split([6, 10], dim=-1)
        out = torch.cat([F.gelu(left), F.gelu(right, approximate="tanh")], dim=-1).clamp(-3, 3)
        flipped = out.flip(1).repeat(1, 1, 2)[..., :H]
        total = torch.cumsum(flipped.sum(-1, keepdim=True), dim=1) / 100.0
        return (out + total - flipped.amax(-1, keepdim=True)).unsqueeze(0).squeeze(0)


class Cache(nn.Module):
    """read_state, slice_update at a runtime position, coreml_update_state: a cache written as one slice"""

    def __init__(self):
        super().__init__()
        self.register_buffer("cache", torch.zeros(1, 2, 12, 4))

    def forward(self, x, pos):
        start = pos[0].item()
        torch._check(start >= 0)
        torch._check(start + x.shape[2] <= 12)
        self.cache[:, :, start:start + x.shape[2]] = x
        return self.cache * 2.0


def convs_inputs():
    return (torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0)),)


def attention_inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(1, 7, 16, generator=g), torch.tensor([[1, 3, 0, 9, 2, 2, 5]])


@pytest.mark.parametrize("module, inputs", [(Convs, convs_inputs), (Attention, attention_inputs)])
def test_ops_match_pytorch_at_fp32_and_at_fp16(module, inputs, tmp_path):
    torch.manual_seed(0)
    model, args = module().eval(), inputs()
    with torch.no_grad():
        expected = model(*args).numpy()
    exact = run(convert(model, args, tmp_path / "fp32.mlpackage", "fp32"), args)
    assert exact.shape == expected.shape
    assert np.abs(exact - expected).max() <= 2e-5 * max(1.0, np.abs(expected).max())
    half = run(convert(model, args, tmp_path / "fp16.mlpackage", "fp16"), args)
    # fp16 rounds each op's result to 11 significant bits (2^-11 relative): a few dozen ops compound it.
    assert np.abs(half - expected).max() <= 1e-2 * max(1.0, np.abs(expected).max())
    assert np.abs(half - exact).max() > 0  # fp16 rounding did take place


def test_states_carry_across_calls_and_functions_of_a_package(tmp_path):
    model, x = Cache(), torch.randn(1, 2, 3, 4)
    function = convert(model, (x, torch.tensor([2])), tmp_path / "cache.mlpackage")
    assert list(function.states) == ["cache"]
    state = function.make_state()
    for start in (2, 5, 9):
        update = torch.randn(1, 2, 3, 4)
        with torch.no_grad():
            expected = model(update, torch.tensor([start])).numpy()
        actual = function.predict({"x": update.numpy(), "pos": np.array([start], np.int32)}, state=state)
        assert np.abs(next(iter(actual.values())) - expected).max() <= 1e-6
    assert np.abs(state["cache"].numpy() - model.cache.numpy()).max() <= 1e-6


@pytest.mark.parametrize("scheme, op, max_error", [("int8-per-channel", "constexpr_blockwise_shift_scale", 0.02),
                                                   ("int4-per-block", "constexpr_blockwise_shift_scale", 0.3),
                                                   ("palettize-4bit", "constexpr_lut_to_dense", 0.3)])
def test_compressed_weights_are_dequantized_as_coremltools_defines_them(scheme, op, max_error, tmp_path):
    """The dequantized weights must equal what the package holds (the quantization grid of each scheme), and the
    layer's output what PyTorch computes from those weights."""
    torch.manual_seed(0)
    layer, x = nn.Linear(128, 32), torch.randn(3, 128)  # 4,096 weights: past the exporters' 2,048 threshold
    function = convert(layer, (x,), tmp_path / f"{scheme}.mlpackage", "fp32", scheme)
    assert op in function.op_types
    linear = next(args for op_type, _, args, _, _ in function.steps if op_type == "linear")
    weight = function.constants[linear["weight"]]
    error = (weight - layer.weight.detach()).abs().max().item()
    assert 0 < error <= max_error * layer.weight.abs().max().item()
    # A real quantization grid, not the float weights: int8 per output channel, int4 per block of 32 inputs, a
    # 16-entry table per group of 16 output channels.
    groups, levels = {"int8-per-channel": (weight, 255), "int4-per-block": (weight.reshape(-1, 32), 16),
                      "palettize-4bit": (weight.reshape(2, -1), 16)}[scheme]
    assert max(len(torch.unique(group)) for group in groups) <= levels
    with torch.no_grad():
        expected = F.linear(x, weight, layer.bias).numpy()
    assert np.abs(run(function, (x,)) - expected).max() <= 1e-5


def test_a_packages_functions_hold_each_compressed_weight_once_as_fp16(tmp_path):
    """Two functions over one int4 Linear (as prefill and decode share the decoder's weights): the executor holds the
    dequantized weight once, as fp16, and no compressed part of it (E2B's package ran out of memory holding the int4
    data as int64 and each function's weights in float32); each computes the Linear of that weight."""
    from exporters.coreml import write_package

    torch.manual_seed(0)
    layer = nn.Linear(128, 64).eval()
    spec = ExportSpec("coreml", quant="int4-per-block", block_size=32)
    functions = {}
    for name, rows in (("long", 5), ("short", 1)):
        with torch.no_grad():
            program = torch.export.export(layer, (torch.randn(rows, 128),))
        functions[name] = convert_program(program, fp16=True)
    package = write_package(compress(functions, spec), tmp_path, "two.mlpackage", default_function="short")
    loaded = MilPackage(package)
    long, short = loaded.function("long"), loaded.function("short")
    weights = [next(f.constants[args["weight"]] for op_type, _, args, _, _ in f.steps if op_type == "linear")
               for f in (long, short)]
    assert weights[0] is weights[1] and weights[0].dtype == torch.float16 and weights[0].shape == (64, 128)
    held = [t for f in (long, short) for t in f.constants.values() if isinstance(t, torch.Tensor)]
    assert not [t.shape for t in held if t.numel() >= 64 * 128 and t is not weights[0]]
    x = np.random.default_rng(0).standard_normal((5, 128)).astype(np.float32)
    for function, rows in ((long, x), (short, x[:1])):
        got = run(function, (torch.from_numpy(rows),))
        # the package's own int4 weight, in float32: what is left is fp16 rounding of inputs, bias and output
        expected = F.linear(torch.from_numpy(rows), weights[0].float(), layer.bias.detach()).numpy()
        assert np.abs(got - expected).max() <= 2e-3 * np.abs(expected).max()


def test_an_op_the_executor_does_not_know_is_an_error_naming_it(tmp_path):
    class TopK(nn.Module):
        def forward(self, x):
            return torch.topk(x, 2).values

    with pytest.raises(MilOpError, match="MIL op 'topk'"):
        convert(TopK(), (torch.randn(2, 5),), tmp_path / "topk.mlpackage")


def test_every_op_of_the_default_packages_is_covered(default_bundles):
    from exporters.coreml import op_counts

    ops = set()
    for package in sorted((default_bundles / "ios").glob("*.mlpackage")):
        for counts in op_counts(package).values():
            ops |= set(counts)
    assert ops <= set(covered_ops()), sorted(ops - set(covered_ops()))


# --- bundles: the coreml-mil backend against the torch backend -------------------------------------------------------

ASSETS = Path(__file__).resolve().parents[1] / "models" / "assets"
MEDIA = {"text": {}, "image": {"images": [ASSETS / "sample.png"]}, "audio": {"audio": [ASSETS / "sample.wav"]},
         "image+audio": {"images": [ASSETS / "sample.png"], "audio": [ASSETS / "sample.wav"]}}
STEPS = 8
# A position where the torch model's best token leads the coreml-mil pick by less than this is a near tie that fp16
# may flip: the logits' fp16 error measured on these prompts is up to 0.055 (logits up to ~3.6).
NEAR_TIE = 0.15


def forced_logits(session, tokens: list[int], prompt: str, media: dict) -> np.ndarray:
    """Logits [len(tokens), V]: at the prompt's end, then after each of tokens[:-1] fed in (teacher forcing, so both
    backends see the same inputs at every step)."""
    if media:
        prompt_media = session.media_prompt(prompt, media.get("images"), media.get("audio"), None)
        embeds, rows = session.embed_media_prompt(prompt_media)
        n = len(prompt_media.ids)
    else:
        ids = session.prompt_ids(prompt)
        embeds, rows = session.embed_ids(ids)
        n = len(ids)
    logits = [session.prefill_embeddings(embeds, rows)]
    for i, token in enumerate(tokens[:-1]):
        logits.append(session.executor.decode(*session.embed_ids([token]), n + i))
    return np.stack(logits)


def check_greedy_agreement(bundle, media: dict, prompt: str = "Describe this.") -> None:
    """coreml-mil's greedy token is torch's at every position that is not a near tie, and most positions are not."""
    from runtime_py.engine import open_bundle

    torch_session, mil_session = open_bundle(bundle, "torch"), open_bundle(bundle, "coreml-mil")
    torch_session.stop_ids = []
    tokens = list(torch_session.generate_ids(prompt, max_new_tokens=STEPS, **media))
    reference = forced_logits(torch_session, tokens, prompt, media)
    assert reference.argmax(-1).tolist() == tokens
    actual = forced_logits(mil_session, tokens, prompt, media)
    picks = actual.argmax(-1)
    lead = reference.max(-1) - reference[np.arange(STEPS), picks]
    assert np.all((picks == tokens) | (lead < NEAR_TIE)), (tokens, picks.tolist(), lead.tolist())
    assert (picks == tokens).sum() >= STEPS - 2, (tokens, picks.tolist())
    assert np.abs(actual - reference).max() < NEAR_TIE  # what fp16 costs, not a wrong graph


@pytest.mark.heavy
@pytest.mark.parametrize("kind", list(MEDIA))
def test_coreml_mil_gives_the_torch_tokens_on_the_ios_bundle(multimodal_bundles, kind):
    check_greedy_agreement(multimodal_bundles / "ios", MEDIA[kind])


def test_coreml_mil_gives_the_torch_tokens_on_the_default_text_bundle(default_bundles):
    check_greedy_agreement(default_bundles / "ios", {}, "Write a short story about a robot.")


@pytest.mark.skipif(not coreml_can_predict(), reason="Core ML itself runs on macOS only (the gap is measured there)")
def test_the_executor_against_core_ml_itself(default_bundles, capsys):
    """The same package and inputs through Core ML (CPU and GPU, which compute fp16 programs in float32 and fp16) and
    through coreml-mil: the gap is printed for the record and held to what fp16 costs."""
    from runtime_py.executors.coreml_executor import function_loader

    package = default_bundles / "ios" / "model.mlpackage"
    rng = np.random.default_rng(0)
    mil = function_loader("coreml-mil")(package, "decode")
    inputs = {name: rng.standard_normal(shape).astype(np.float32) for name, shape in
              (("inputs_embeds", mil.input_shapes["inputs_embeds"]),
               ("per_layer_rows", mil.input_shapes["per_layer_rows"]))}
    inputs["input_pos"] = np.array([3], np.int32)
    expected = mil.predict(inputs, state=mil.make_state())["logits"]
    for units in ("CPU_ONLY", "CPU_AND_GPU"):
        core_ml = function_loader("coreml", units)(package, "decode")
        actual = core_ml.predict(inputs, state=core_ml.make_state())["logits"]
        gap = float(np.abs(actual - expected).max())
        print(f"coreml {units} vs coreml-mil: max abs logit gap {gap:.4g}")
        assert gap < NEAR_TIE
