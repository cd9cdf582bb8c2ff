"""Core ML export: one multifunction .mlpackage (prefill_<T>, decode) over a KV-cache state, float and quantized.

Linux has no Core ML runtime, so here the package is checked through its spec and its MIL program (functions,
inputs, outputs, states, op counts) and its weight file, and its numerics against eager PyTorch by the coreml-mil
executor (runtime_py.executors.mil: the saved MIL program run op by op); Core ML itself runs them on macOS 15+.
"""

import copy
import sys

import numpy as np
import pytest
import torch

from contract.bundle import EMBEDDINGS_FILE, PLE_ASSET_FILE
from contract.ple import PleTable
from exporters.coreml import (
    MIN_QUANTIZED_ELEMENTS,
    compress,
    convert_functions,
    export_coreml,
    install_slice_write_caches,
    summarize_mlpackage,
    write_package,
)
from exporters.spec import EXPORT_RECORD, ExportSpec
from exporters.weights import decoder_half
from models.default import default_model
from models.generate import prefill_and_decode
from runtime_py.executors.coreml_executor import coreml_can_predict

CACHE_LEN, PROMPT_LEN, DECODE_STEPS = 16, 4, 3
FUNCTIONS = {f"prefill_{PROMPT_LEN}", "decode"}


def coreml_spec(quant="none"):
    return ExportSpec("coreml", cache_len=CACHE_LEN, prefill_lengths=(PROMPT_LEN,), quant=quant, block_size=32)


def prompt_ids(vocab_size):
    return torch.randint(0, vocab_size, (1, PROMPT_LEN), generator=torch.Generator().manual_seed(5))


def decoder_params(model):
    """(all graph weights, the weights coremltools compresses: more than MIN_QUANTIZED_ELEMENTS elements).
    The PLE table is not in the graph; the tied embedding is, once, as the LM head."""
    params = [p for name, p in model.named_parameters() if not name.startswith("per_layer_embedding.")]
    return params, [p for p in params if p.numel() > MIN_QUANTIZED_ELEMENTS]


@pytest.fixture(scope="module")
def model():
    return default_model()


@pytest.fixture(scope="module")
def float_functions(model):
    return convert_functions(model, coreml_spec())


@pytest.fixture(scope="module")
def float_package(float_functions, tmp_path_factory):
    return write_package(compress(float_functions, coreml_spec()), tmp_path_factory.mktemp("coreml-float"))


def quantized_package(float_functions, tmp_path_factory, quant):
    return write_package(compress(float_functions, coreml_spec(quant)), tmp_path_factory.mktemp(f"coreml-{quant}"))


def compressible_bytes_per_param(model, package, float_package):
    """Bytes the package spends per compressible weight: its weight file minus what stays as in the float package
    (the fp16 small weights and the blob alignment), over the number of compressible parameters."""
    _, compressible = decoder_params(model)
    n = sum(p.numel() for p in compressible)
    kept = summarize_mlpackage(float_package)["weight_bytes"] - 2 * n
    return (summarize_mlpackage(package)["weight_bytes"] - kept) / n


def run_eager(decoder, model, token_ids, start):
    """`decoder` (the model or a half of it) over `model`'s two lookups of token_ids at positions from `start`."""
    positions = torch.arange(start, start + token_ids.shape[1])
    return decoder.forward_embeddings(model.embed(token_ids), model.per_layer_embedding(token_ids), positions)


def test_slice_written_cache_equals_the_models_own_cache(model):
    """The Core ML lowering writes the cache of its copy of the decoder's half as a slice at input_pos[0]; eager,
    that must give exactly what the model's index_put cache gives, for a prefill and cached decode steps, and the
    model keeps its own caches."""
    cfg = model.config
    ids = prompt_ids(cfg.vocab_size)
    eager_prefill, eager_steps, tokens = prefill_and_decode(model, ids, DECODE_STEPS, CACHE_LEN)
    own_caches = [model.layers[i].self_attn.kv_cache for i in cfg.cache_owning_layers]

    half = decoder_half(model)
    install_slice_write_caches(half, CACHE_LEN)
    with torch.no_grad():
        prefill = run_eager(half, model, ids, 0)
        steps = [run_eager(half, model, torch.tensor([[token]]), PROMPT_LEN + i) for i, token in enumerate(tokens[:-1])]
    assert (prefill - eager_prefill).abs().max().item() <= 1e-6
    for step, expected in zip(steps, eager_steps):
        assert (step[:, -1] - expected).abs().max().item() <= 1e-6
    assert [model.layers[i].self_attn.kv_cache for i in cfg.cache_owning_layers] == own_caches
    assert model.cache_len == CACHE_LEN


def test_float_package_has_two_functions_over_one_cache_state(model, float_package):
    cfg = model.config
    summary = summarize_mlpackage(float_package)
    assert set(summary["functions"]) == FUNCTIONS
    assert summary["default_function"] == "decode"
    assert summary["specification_version"] >= 9  # iOS 18: states and multifunction models

    expected_states = [
        (f"decoder_layers_{i}_self_attn_kv_cache_{kv}_cache", [1, cfg.num_kv_heads, CACHE_LEN, cfg.head_dim], "float16")
        for i in cfg.cache_owning_layers
        for kv in "kv"
    ]
    for name, fn in summary["functions"].items():
        t = PROMPT_LEN if name.startswith("prefill") else 1
        assert [(f["name"], f["shape"], f["dtype"]) for f in fn["inputs"]] == [
            ("inputs_embeds", [1, t, cfg.hidden_size], "float32"),
            ("per_layer_rows", [1, t, cfg.num_layers, cfg.hidden_size_per_layer_input], "float32"),
            ("input_pos", [t], "int32"),
        ]
        # kv_shared_prefill: prefill returns the last position's logits only, like decode.
        assert [(f["name"], f["shape"]) for f in fn["outputs"]] == [("logits", [1, 1, cfg.vocab_size])]
        assert sorted((s["name"], s["shape"], s["dtype"]) for s in fn["states"]) == sorted(expected_states)

        ops = fn["ops"]
        n_cache = len(expected_states)
        # Every cache is read once and written once, in place as a slice: no scatter, which Core ML cannot do in place.
        assert ops["read_state"] == ops["coreml_update_state"] == ops["slice_update"] == n_cache
        assert not any("scatter" in op for op in ops)
        assert ops["softmax"] == cfg.num_layers
        assert not any(op.startswith("constexpr") for op in ops)  # float: plain fp16 consts
    prefill_ops = summary["functions"][f"prefill_{PROMPT_LEN}"]["ops"]
    assert prefill_ops["linear"] == summary["functions"]["decode"]["ops"]["linear"]


def test_float_weights_are_fp16_and_stored_once_for_both_functions(model, float_package):
    params, _ = decoder_params(model)
    fp16_bytes = 2 * sum(p.numel() for p in params)
    weight_bytes = summarize_mlpackage(float_package)["weight_bytes"]
    # Measured 758,688 bytes for 371,616 weights: 2 bytes each plus blob alignment. Two unshared copies would be 2x.
    assert fp16_bytes <= weight_bytes <= 1.05 * fp16_bytes


def check_quantized(model, package, float_package, op_type, bytes_low, bytes_high):
    summary, float_summary = summarize_mlpackage(package), summarize_mlpackage(float_package)
    _, compressible = decoder_params(model)
    for name, fn in summary["functions"].items():
        float_fn = float_summary["functions"][name]
        for io in ("inputs", "outputs", "states"):
            assert fn[io] == float_fn[io]
        assert fn["ops"][op_type] == len(compressible)  # every large weight, the tied LM head included
    assert bytes_low <= compressible_bytes_per_param(model, package, float_package) <= bytes_high


def test_int8_per_channel_halves_the_large_weights(model, float_functions, float_package, tmp_path_factory):
    package = quantized_package(float_functions, tmp_path_factory, "int8-per-channel")
    # 1 byte per weight plus one fp16 scale per output channel (64-384 weights per channel): measured 1.038.
    check_quantized(model, package, float_package, "constexpr_blockwise_shift_scale", 1.0, 1.08)


@pytest.mark.heavy
@pytest.mark.parametrize(
    "quant, op_type",
    [("int4-per-block", "constexpr_blockwise_shift_scale"), ("palettize-4bit", "constexpr_lut_to_dense")],
)
def test_4bit_schemes_quarter_the_large_weights(
    model, float_functions, float_package, tmp_path_factory, quant, op_type
):
    package = quantized_package(float_functions, tmp_path_factory, quant)
    # Half a byte per weight plus an fp16 scale per block of 32 (1/16 byte; measured 0.572) or a 16-entry fp16 table
    # per 16 output channels (measured 0.538).
    check_quantized(model, package, float_package, op_type, 0.5, 0.6)


@pytest.mark.heavy
def test_export_coreml_writes_only_the_package_and_leaves_the_model_as_it_was(model, tmp_path):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.setup_caches(CACHE_LEN)
    own_caches = [model.layers[i].self_attn.kv_cache for i in model.config.cache_owning_layers]
    package = export_coreml(model, coreml_spec("int4-per-block"), tmp_path / "out")
    assert package == tmp_path / "out" / "model.mlpackage"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        [EXPORT_RECORD, "model.mlpackage", PLE_ASSET_FILE, EMBEDDINGS_FILE])
    assert set(summarize_mlpackage(package)["functions"]) == FUNCTIONS
    # The token table beside it at the decoder's width: int4 in groups of 32, each value within half a step.
    table = PleTable(tmp_path / "out" / EMBEDDINGS_FILE)
    assert table.storage == "int4" and (table.num_layers, table.dim) == (model.config.hidden_size // 32, 32)
    ids = torch.arange(model.config.vocab_size)
    rows = torch.from_numpy(table.rows(ids.numpy())).flatten(1)
    with torch.no_grad():
        expected = model.embed(ids[None])[0]
    step = expected.unflatten(1, (-1, 32)).abs().amax(2, keepdim=True) / 7
    assert ((rows - expected).unflatten(1, (-1, 32)).abs() <= step * 0.5001 + 1e-6).all()
    assert [model.layers[i].self_attn.kv_cache for i in model.config.cache_owning_layers] == own_caches
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items() if k in before)


def test_a_bf16_models_steps_are_its_float32_copys(model):
    """`g3n export --target coreml` and `g3n bundle --targets ios` keep a bf16 checkpoint bf16 (a float32 E2B does not
    fit in 24 GB beside its conversion): the steps Core ML converts are over a float32 copy of the decoder's half,
    and compute what the float32 copy of the same bf16 weights does, output for output, the caller's bf16 model left
    as it was. Eager, not traced: what differs is the casting, which torch.export does not touch."""
    from exporters.coreml import decoder_step, decoder_steps

    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    before = {k: v.clone() for k, v in bf16.state_dict().items()}
    float_copy = copy.deepcopy(bf16).float()
    spec = coreml_spec()
    assert decoder_steps(spec) == {f"prefill_{PROMPT_LEN}": (PROMPT_LEN, True), "decode": (1, False)}
    outputs = []
    for m in (bf16, float_copy):
        torch.manual_seed(0)
        outputs.append([])
        for length, last in decoder_steps(spec).values():
            step, sample = decoder_step(m, spec, length, last)
            params = list(step.parameters())
            assert params and all(p.dtype == torch.float32 for p in params)
            # No PLE table and no token table but the LM head's: the half holds 2.4B of E2B's 5.4B parameters.
            assert sum(p.numel() for p in params) == sum(p.numel() for p in decoder_params(m)[0])
            with torch.no_grad():
                outputs[-1].append(step(*(torch.randn_like(x) if x.is_floating_point() else x for x in sample)))
    for ours, theirs in zip(*outputs):
        assert torch.equal(ours, theirs)
    after = bf16.state_dict()
    assert all(after[k].dtype == v.dtype and torch.equal(after[k], v) for k, v in before.items())


@pytest.mark.parametrize("backend", [
    pytest.param("coreml", marks=pytest.mark.skipif(
        not coreml_can_predict(), reason="Core ML predictions need macOS 15+ with coremltools' native runtime; on "
        f"{sys.platform} coremltools cannot load, predict or create state (coreml-mil runs the same package)")),
    "coreml-mil",
])
def test_coreml_prefill_and_decode_match_eager_pytorch(model, float_package, backend):
    """The package's functions over one cache state, run by Core ML (macOS) or by the coreml-mil executor (the saved
    MIL program, anywhere)."""
    from runtime_py.executors.coreml_executor import function_loader


    cfg = model.config
    ids = prompt_ids(cfg.vocab_size)
    eager_prefill, eager_steps, tokens = prefill_and_decode(model, ids, DECODE_STEPS, CACHE_LEN)
    # The tolerance is what fp16 itself costs: the same model run in fp16 by PyTorch, with a margin of 4 for the
    # different order of operations (measured on the tiny model: 0.028 with logits up to 3.6).
    fp16_prefill, fp16_steps, _ = prefill_and_decode(copy.deepcopy(model).half(), ids, DECODE_STEPS, CACHE_LEN)
    fp16_error = max(
        (eager_prefill[:, -1] - fp16_prefill[:, -1].float()).abs().max().item(),
        *((a - b.float()).abs().max().item() for a, b in zip(eager_steps, fp16_steps)),
    )
    tolerance = 4 * fp16_error

    load = function_loader(backend)
    prefill, decode = load(float_package, f"prefill_{PROMPT_LEN}"), load(float_package, "decode")
    state = prefill.make_state()  # one cache state, shared by both functions

    def run(fn, token_ids, start):
        inputs = {
            "inputs_embeds": model.embed(token_ids).detach().numpy(),
            "per_layer_rows": model.per_layer_embedding(token_ids).detach().numpy(),
            "input_pos": np.arange(start, start + token_ids.shape[1], dtype=np.int32),
        }
        return torch.from_numpy(fn.predict(inputs, state=state)["logits"].astype(np.float32))[:, -1]

    with torch.no_grad():
        assert (run(prefill, ids, 0) - eager_prefill[:, -1]).abs().max().item() <= tolerance
        for pos, token, expected in zip(range(PROMPT_LEN, PROMPT_LEN + DECODE_STEPS), tokens, eager_steps):
            assert (run(decode, torch.tensor([[token]]), pos) - expected).abs().max().item() <= tolerance


@pytest.mark.parametrize("values, overflows", [([1.0, -2.0, 65504.0], False), ([1.0, 70000.0, 3.0], True),
                                               ([-65505.0, 0.0, 1.0], True), ([np.inf, 1.0, -np.inf], False),
                                               ([2e38, -3e38, 5.0], False), ([2e38, 65600.0, 0.0], True)])
def test_fp16_overflow_check_answers_as_coremltools_own(values, overflows):
    """exporters.coreml.fp16_overflow (a slice of a constant at a time) decides as coremltools' own check (np.where of
    the whole constant: 13 GB of index arrays for E2B's LM head) on constants at and past fp16's range, infinities
    and values it treats as infinite (beyond 1e38)."""
    from coremltools.converters.mil import Builder as mb

    from exporters.coreml import coremltools_fp16_overflow, fp16_overflow

    @mb.program(input_specs=[mb.TensorSpec(shape=(2, 3))])
    def program(x):
        return mb.add(x=x, y=np.array([values, [0.0, 1.0, 2.0]], dtype=np.float32))

    (op,) = [op for op in program.functions["main"].operations if op.op_type == "add"]
    assert fp16_overflow(op) == coremltools_fp16_overflow(op) == overflows
