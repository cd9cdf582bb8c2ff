"""ExecuTorch export: model.pte (XNNPACK) + per_layer_embeddings.ptd, run by executorch.runtime against eager PyTorch.

The model is the tiny preset cut to 4 layers (sliding, global, then one KV-shared layer of each type; sparsity on
layer 0), randomised like the default model: every feature the exporter handles is there, and lowering, which costs
minutes per 8-layer model on 2 shared cores, stays within the test budget.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from contract.bundle import PTD_FILE, PTE_FILE
from contract.ple import PleTable
from exporters.executorch import export_decoder, export_executorch, quantize_decoder_
from exporters.ple import quantize_rows_int8, write_ple_asset
from exporters.spec import EXPORT_RECORD, ExportSpec
from models.config import TINY_4_LAYERS
from models.errors import InputError
from models.generate import prefill_and_decode
from models.random_init import randomise_
from models.text import TextDecoder

SMALL = TINY_4_LAYERS
CACHE_LEN, PROMPT_LEN, STEPS = 32, 8, 8


@pytest.fixture(scope="module")
def model():
    m = TextDecoder(SMALL)
    randomise_(m, 5)
    return m.eval()


@pytest.fixture(scope="module")
def prompt(model):
    return torch.randint(0, SMALL.vocab_size, (1, PROMPT_LEN), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def eager(model, prompt):
    """Reference greedy generation: prefill logits [1,T,V], STEPS step logits [1,V], tokens."""
    return prefill_and_decode(model, prompt, STEPS, CACHE_LEN)


def _export(model, tmp_path_factory, **spec_fields):
    spec = ExportSpec("executorch", cache_len=CACHE_LEN, prefill_lengths=(PROMPT_LEN,), **spec_fields)
    out = tmp_path_factory.mktemp("et") / "bundle"
    return spec, export_executorch(model, spec, out)


@pytest.fixture(scope="module")
def float_export(model, tmp_path_factory):
    return _export(model, tmp_path_factory, quant="none", ple_storage="fp32")


def _load(pte):
    import executorch.kernels.quantized  # noqa: F401  (registers the quantized kernels the 8da/int8 programs call)
    from executorch.runtime import Runtime

    return Runtime.get().load_program(pte, data_path=pte.parent / PTD_FILE)


def _generate(program, prompt, tokens_in):
    """text_decoder on the whole prompt, then on each token of `tokens_in` (teacher-forced, so that every step is
    compared with eager on the same input), called as ExecuTorch's LLM runner calls it. Returns the last-position
    logits of prefill and of each step, [V] each."""
    token_embedding, text_decoder = program.load_method("token_embedding"), program.load_method("text_decoder")
    logits = [text_decoder.execute([token_embedding.execute([prompt])[0], torch.arange(prompt.shape[1])])[0][0, -1]]
    for pos, token in enumerate(tokens_in, start=prompt.shape[1]):
        embeddings = token_embedding.execute([torch.tensor([[token]])])[0]
        logits.append(text_decoder.execute([embeddings, torch.tensor([pos])])[0][0, -1])
    return logits


def _per_layer_rows(program, ids):
    """The per-layer rows [1, T, L, P] that token_embedding puts beside each embedding."""
    out = program.load_method("token_embedding").execute([ids])[0]
    return out[..., SMALL.hidden_size:].reshape(*ids.shape, SMALL.num_layers, SMALL.hidden_size_per_layer_input)


def _reference(eager):
    prefill_logits, step_logits, tokens = eager
    return [prefill_logits[0, -1]] + [s[0] for s in step_logits], tokens


def test_float_pte_generates_like_eager(float_export, prompt, eager):
    _, pte = float_export
    reference, tokens = _reference(eager)
    logits = _generate(_load(pte), prompt, tokens[:STEPS])
    # decode reads the cache that prefill wrote (shared mutable buffers): a step that saw an empty cache would be
    # off by whole logits. 1e-4: fp32 kernels rounding differently (XNNPACK's gemm, tanh, rsqrt); logits up to ~4.
    errors = [(a - b).abs().max().item() for a, b in zip(logits, reference)]
    assert max(errors) <= 1e-4, errors
    assert [int(x.argmax()) for x in logits] == tokens


@pytest.mark.parametrize("length", [1, 3, PROMPT_LEN])
def test_text_decoder_prefills_any_length(float_export, prompt, eager, length):
    """The runner prefills each prompt span with one text_decoder call of its own length (our runtime, each chunk):
    the cache they write then gives decode eager's logits."""
    _, pte = float_export
    reference, tokens = _reference(eager)
    program = _load(pte)
    text_decoder, token_embedding = program.load_method("text_decoder"), program.load_method("token_embedding")
    for start in range(0, PROMPT_LEN, length):
        span = prompt[:, start : start + length]
        out = text_decoder.execute([token_embedding.execute([span])[0], torch.arange(start, start + span.shape[1])])
    assert (out[0][0, -1] - reference[0]).abs().max().item() <= 1e-4
    steps = [text_decoder.execute([token_embedding.execute([torch.tensor([[t]])])[0], torch.tensor([pos])])[0][0, -1]
             for pos, t in enumerate(tokens[:2], start=PROMPT_LEN)]
    assert max((a - b).abs().max().item() for a, b in zip(steps, reference[1:3])) <= 1e-4


def test_runner_metadata_methods(float_export):
    spec, pte = float_export
    program = _load(pte)
    assert {"token_embedding", "text_decoder"} <= program.method_names
    assert not any(name.startswith(("prefill", "decode", "per_layer")) for name in program.method_names)
    expected = {
        "get_max_seq_len": [CACHE_LEN],
        "get_max_context_len": [CACHE_LEN],
        "get_bos_id": [SMALL.bos_token_id],
        "get_eos_ids": list(SMALL.eos_token_ids),
        "get_vocab_size": [SMALL.vocab_size],
        "use_kv_cache": [True],
        "enable_dynamic_shape": [True],
        "get_prefill_lengths": [PROMPT_LEN],
        "get_hidden_size": [SMALL.hidden_size],
        "get_per_layer_shape": [SMALL.num_layers, SMALL.hidden_size_per_layer_input],
    }
    assert {name: list(program.load_method(name).execute([])) for name in expected} == expected


def _portable_ops(pte, method: str) -> tuple[int, set[str]]:
    """(delegate calls, names of the ops left to the portable kernels) of one method of a .pte."""
    from executorch.exir._serialize._program import deserialize_pte_binary

    program = deserialize_pte_binary(pte.read_bytes())
    plan = next(p for p in getattr(program, "program", program).execution_plan if p.name == method)
    calls = [i.instr_args for chain in plan.chains for i in chain.instructions]
    delegates = sum(type(a).__name__ == "DelegateCall" for a in calls)
    return delegates, {plan.operators[a.op_index].name for a in calls if type(a).__name__ == "KernelCall"}


# What XNNPACK cannot take: the cache writes (index_put into the mutable buffers), the mask arithmetic on integer
# positions, and, text_decoder taking any number of tokens, the slices of a tensor with that dynamic dim (XNNPACK's
# static slice; AltUp's stream selects, RoPE's halves) with their views and size computations. Norms, AltUp's
# coefficient Linears, activation sparsity's mean and std, and the reshapes (one inferred dim) stay in delegates
# (exporters.executorch.delegate_friendly_views).
PORTABLE_OK = {"aten::index_put", "aten::copy_", "aten::scalar_tensor", "aten::le", "aten::gt", "aten::where",
               "aten::bitwise_and", "aten::arange", "aten::sub", "aten::cat", "aten::mean",
               "dim_order_ops::_to_dim_order_copy", "aten::slice_copy", "aten::expand_copy", "aten::sym_size",
               "executorch_prim::mul", "executorch_prim::et_view"}


def test_the_decoder_runs_in_few_delegates(float_export):
    _, pte = float_export
    delegates, portable = _portable_ops(pte, "text_decoder")
    assert portable <= PORTABLE_OK, portable - PORTABLE_OK
    # Measured 13: the slices of the dynamic token dim split what would otherwise be one delegate per stretch between
    # two cache writes (5: K, then V, of each of the two cache-owning layers, and the rest).
    assert delegates <= 4 * SMALL.num_layers, delegates


def test_ple_table_lives_in_the_ptd(model, float_export):
    _, pte = float_export
    ptd = pte.parent / PTD_FILE
    table = model.per_layer_embedding.weight.detach().float().numpy().tobytes()
    pte_bytes, ptd_bytes = pte.read_bytes(), ptd.read_bytes()
    assert sorted(p.name for p in pte.parent.iterdir()) == sorted([PTE_FILE, ptd.name, EXPORT_RECORD])
    assert table in ptd_bytes and table not in pte_bytes
    assert len(table) <= len(ptd_bytes) < len(table) + 4096  # the table and a small header, nothing else
    # Every row comes back through the mapped table, ids beyond the PLE vocabulary reading row 0 as in eager.
    ids = torch.tensor([[0, 1, 100, 319, 320, 383, 5, 7]])
    assert torch.equal(_per_layer_rows(_load(pte), ids), model.per_layer_embedding(ids))


def _eager_quantized(model, spec, prompt, tokens_in, ple_asset):
    """The quantized program's numbers in eager PyTorch: the decoder quantized by torchao, the token embedding's rows
    int8 (a quantized program's), the PLE rows the asset's."""
    decoder = export_decoder(model, CACHE_LEN)
    quantize_decoder_(decoder, spec)
    q, scale = quantize_rows_int8(model.embed_tokens.weight.detach())
    with torch.no_grad():
        steps = [(prompt, torch.arange(PROMPT_LEN))]
        steps += [(torch.tensor([[t]]), torch.tensor([pos])) for pos, t in enumerate(tokens_in, start=PROMPT_LEN)]
        rows = [torch.from_numpy(ple_asset.rows(ids[0].numpy()))[None] for ids, _ in steps]
        embeds = [q[ids].float() * scale[ids][..., None] * model.embed_scale for ids, _ in steps]
        return [decoder.forward_embeddings(e, r, pos, True)[0, -1] for e, r, (_, pos) in zip(embeds, rows, steps)]


def test_refuses_other_targets_and_existing_outputs(model, tmp_path):
    with pytest.raises(InputError, match="executorch"):
        export_executorch(model, ExportSpec("litert"), tmp_path / "x")
    with pytest.raises(InputError, match="exists"):
        export_executorch(model, ExportSpec("executorch"), tmp_path)
    with pytest.raises(InputError, match="no scheme"):
        export_executorch(model, ExportSpec("executorch", quant="int4-palettized"), tmp_path / "p")
    assert not (tmp_path / "p").exists()


def test_int8_weight_only_with_int8_ple(model, prompt, eager, float_export, tmp_path_factory, tmp_path):
    """A quantized program with the PLE table int8 in the .ptd. The bundles' 8da8w decoder (the same lowering, other
    weights) is compared once, by `make compare`'s executorch/int8 row."""
    spec, pte = _export(model, tmp_path_factory, quant="int8-weight-only", ple_storage="int8")
    program = _load(pte)
    # The int8 PLE table in the .ptd gives exactly the rows that the safetensors asset (contract.ple) gives.
    ids = torch.tensor([[0, 5, 319, 320, 383, 17, 2, 1]])
    rows = _per_layer_rows(program, ids)
    asset = PleTable(write_ple_asset(model, tmp_path, "int8"))
    np.testing.assert_allclose(rows[0].numpy(), asset.rows(ids[0].numpy()), rtol=1e-6, atol=1e-6)
    ptd_size = (pte.parent / PTD_FILE).stat().st_size
    table_int8 = SMALL.vocab_size_per_layer_input * SMALL.num_layers * SMALL.hidden_size_per_layer_input
    assert table_int8 <= ptd_size < table_int8 + 4 * SMALL.vocab_size_per_layer_input + 4096
    # The Linears' weights and the token embedding's rows are stored as int8 (norms and AltUp coefficients are not).
    assert pte.stat().st_size < 0.5 * float_export[1].stat().st_size
    reference, tokens = _reference(eager)
    logits = _generate(program, prompt, tokens[:STEPS])
    # Against the same quantization run eagerly on the same int8 PLE rows: the lowering adds next to nothing
    # (measured 0.0; 1e-3 leaves room for XNNPACK's rounding). Against float: measured 0.10 on logits up to ~4 with
    # fp32 PLE rows (LiteRT's int8 weight-only: 0.41; 8da8w, which also quantizes activations: 0.14); the int8 rows
    # add their own rounding.
    quantized = _eager_quantized(model, spec, prompt, tokens[:STEPS], asset)
    assert max((a - b).abs().max().item() for a, b in zip(logits, quantized)) < 1e-3
    error = max((a - b).abs().max().item() for a, b in zip(logits, reference))
    print(f"int8-weight-only, int8 PLE: max |delta logit| vs float {error:.4f}, .pte {pte.stat().st_size:,} B "
          f"(float {float_export[1].stat().st_size:,} B)")
    assert error < 0.3


@pytest.mark.parametrize("block_size", [32, None])
def test_8da4w_takes_the_largest_block_that_divides_each_linear(model, block_size):
    """8da4w quantizes each Linear in the largest multiple of 32 up to the spec's block size (ExecuTorch's default:
    128, as its Llama exports) that divides its input, and leaves float only a Linear that no such block divides:
    on the tiny model the hidden size (64) takes blocks of 64 and the FFN's down projection (128) blocks of 128, while
    the PLE width (16) and the LAuReL rank (8) stay float."""
    spec = ExportSpec("executorch", cache_len=CACHE_LEN, prefill_lengths=(PROMPT_LEN,), quant="8da4w",
                      block_size=block_size)
    decoder = export_decoder(model, CACHE_LEN)
    quantize_decoder_(decoder, spec)
    blocks = {}
    for fqn, linear in decoder.named_modules():
        if isinstance(linear, torch.nn.Linear) and not fqn.endswith("_coefs"):
            weight = linear.weight.detach()
            blocks[fqn] = None if type(weight) is torch.Tensor else weight.block_size[-1]
    expected = {32: {8: None, 16: None, 64: 32, 128: 32}, None: {8: None, 16: None, 64: 64, 128: 128}}[block_size]
    assert blocks == {fqn: expected[decoder.get_submodule(fqn).in_features] for fqn in blocks}
    assert set(blocks.values()) == set(expected.values())  # every case is on the tiny model


@pytest.mark.parametrize("quant", ["none", "8da4w", "int8-weight-only"])
def test_a_bf16_model_exports_as_its_float32_copy_would(model, quant):
    """`g3n export --target executorch` keeps a bf16 checkpoint bf16 and casts a layer at a time (a float32 E2B does
    not fit in 24 GB beside its conversion): the modules it exports (decoder step, token embedding) equal those of
    the float32 copy of the same bf16 weights, which the CLI loaded before, output for output, and the caller's bf16
    model is left as it was. Eager, not traced: what differs is the casting, which torch.export does not touch."""
    from exporters.executorch import DecoderStep, PerLayerEmbedder, TokenEmbedder, float32_quantized_

    bf16 = TextDecoder(SMALL)
    bf16.load_state_dict({k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}, assign=True)
    bf16.init_buffers()
    before = {k: v.clone() for k, v in bf16.state_dict().items()}
    copy = TextDecoder(SMALL)
    copy.load_state_dict({k: v.float() for k, v in before.items()}, assign=True)
    copy.init_buffers()
    spec = ExportSpec("executorch", cache_len=CACHE_LEN, prefill_lengths=(PROMPT_LEN,), quant=quant)
    width = SMALL.hidden_size + SMALL.num_layers * SMALL.hidden_size_per_layer_input
    x = torch.randn(1, 3, width, generator=torch.Generator().manual_seed(0))
    ids = torch.tensor([[2, 17, SMALL.vocab_size - 1]])
    outputs = []
    for m in (bf16, copy):
        decoder = export_decoder(m, CACHE_LEN)
        float32_quantized_(decoder, spec)
        embedder = TokenEmbedder(m, PerLayerEmbedder(m, "fp32"), None, quant)
        with torch.no_grad():
            outputs.append([DecoderStep(decoder, True)(x, torch.arange(3)), embedder(ids)])
    for ours, theirs in zip(*outputs):
        assert ours.dtype == torch.float32 and torch.equal(ours, theirs)
    after = bf16.state_dict()
    assert all(after[k].dtype == torch.bfloat16 or not v.is_floating_point() for k, v in before.items())
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_lowering_leaves_no_copy_of_the_delegated_weights(tmp_path):
    """An export's peak memory is its serialisation (to_executorch), so by then each weight must live once, as the
    delegate's bytes: not in the programs it was exported as (the exporter empties them), nor in PT2E's device-check
    caches (they kept every prepared module, with its float32 weights), nor in the program each delegate was lowered
    from (its weights become stubs). Checked with weak references while the lowered program is alive, and the
    program still computes what the eager module does."""
    import gc
    import weakref

    from executorch.runtime import Runtime

    from exporters.executorch import encoder_program, lower

    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 64)).to(torch.bfloat16)
    x = torch.randn(1, 8, 64)
    programs = {"encoder": encoder_program(module, (x,), "8da8w")}  # PT2E: float32 copy, then int8 weights
    weights = [weakref.ref(t) for t in programs["encoder"].state_dict.values()]
    lowered = lower(programs, {})
    gc.collect()
    assert programs == {} and len(weights) >= 4 and [w() for w in weights] == [None] * len(weights)
    (tmp_path / "m.pte").write_bytes(lowered.buffer)
    import executorch.kernels.quantized  # noqa: F401
    got = Runtime.get().load_program(tmp_path / "m.pte").load_method("encoder").execute([x])[0]
    expected = module.float()(x)
    assert (got - expected).abs().max().item() < 0.05 * expected.abs().max().item()


def test_an_8da8w_program_holds_only_the_weights_it_reads():
    """convert_pt2e folds each quantized weight into an int8 constant and leaves the float32 one registered; exported
    as it is, that unread copy is lifted into the program and held through the lowering (E2B's export: 3.6 GB of its
    peak). Every weight the program keeps is an input its graph reads, and the Linears' weights are int8 only."""
    from exporters.executorch import encoder_program

    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 64))
    program = encoder_program(module, (torch.randn(1, 8, 64),), "8da8w")
    placeholders = {node.name: node for node in program.graph.nodes if node.op == "placeholder"}
    kept = [spec for spec in program.graph_signature.input_specs if spec.target is not None]
    assert kept and all(placeholders[spec.arg.name].users for spec in kept)
    weights = [t for t in (*program.state_dict.values(), *program.constants.values()) if t.dim() == 2]
    assert sorted((t.dtype, tuple(t.shape)) for t in weights) == [(torch.int8, (64, 256)), (torch.int8, (256, 64))]
