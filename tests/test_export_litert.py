"""The LiteRT target against three references: our eager model, transformers, and Google's LiteRT-LM engine.

One float export of the tiny random checkpoint (cache 64, prefill_8 + decode; about two minutes of conversion on
2 cores) serves every test; the int8 variant re-quantizes its decoder rather than converting again.
"""

from __future__ import annotations

import copy
import os
import shutil

import numpy as np
import pytest
import sentencepiece as spm
import torch

from exporters import litert
from exporters.spec import EXPORT_RECORD, ExportSpec
from models import load_pretrained
from models.errors import InputError
from models.generate import prefill_and_decode
from models.hf_reference import hf_prefill_and_decode, load_hf_model

TOKENIZER = "models/assets/tokenizer.model"
THRESHOLD = "RESOURCE_CONSTANT_NUMEL_THRESHOLD"  # litert_torch.config.resource_constant_numel_threshold
CACHE_LEN, PREFILL_LEN, NEW_TOKENS = 64, 8, 32
# 14 tokens with BOS: the engine prefills 13 of them as prefill_8 + a padded prefill_8 chunk (it holds the last
# prompt token back for the first decode step), so the padding path is exercised.
PROMPT = "The train leaves the station at seven"


@pytest.fixture(scope="module")
def exported(tiny_checkpoint, tmp_path_factory):
    """The decoder's lightweight conversion keeps weights of 1 MB and more in place, which no tiny weight is: here
    every weight takes that path, as a real model's do."""
    model = load_pretrained(tiny_checkpoint, dtype=torch.float32)
    spec = ExportSpec("litert", cache_len=CACHE_LEN, prefill_lengths=(PREFILL_LEN,), ple_storage="fp32")
    out = tmp_path_factory.mktemp("litert") / "export"
    os.environ[THRESHOLD] = "1"
    try:
        return model, litert.export_litert(model, spec, out, TOKENIZER)
    finally:
        del os.environ[THRESHOLD]


def prompt_ids(model) -> list[int]:
    return [model.config.bos_token_id] + spm.SentencePieceProcessor(model_file=TOKENIZER).encode(PROMPT)


def test_writes_the_bundle_and_nothing_half_done(exported):
    _, path = exported
    assert path.name == "model.litertlm" and path.read_bytes()[:8] == b"LITERTLM"
    names = sorted(p.name for p in path.parent.iterdir())
    assert names == sorted([litert.DECODER_FILE, litert.EMBEDDER_FILE, litert.PER_LAYER_EMBEDDER_FILE, path.name,
                           EXPORT_RECORD])


def test_litert_lm_engine_generates_the_same_tokens_as_eager_and_transformers(exported, tiny_checkpoint):
    """The engine's Python API returns text, not ids, so its 32 greedy tokens are compared as text against the
    detokenized ids of the references; the references' ids are compared with each other exactly."""
    import litert_lm

    model, path = exported
    ids = torch.tensor([prompt_ids(model)])
    _, _, eager_tokens = prefill_and_decode(model, ids, NEW_TOKENS - 1, CACHE_LEN)
    _, _, hf_tokens = hf_prefill_and_decode(load_hf_model(tiny_checkpoint), ids, NEW_TOKENS - 1)
    assert eager_tokens == hf_tokens[:NEW_TOKENS]
    # The engine stops at <eos> or <end_of_turn>; this prompt's 32 greedy tokens contain neither.
    assert not {1, 5} & set(eager_tokens)

    engine = litert_lm.Engine(
        str(path), backend=litert_lm.Backend.CPU(thread_count=2), activation_data_type=litert_lm.ActivationDataType.FLOAT32
    )
    session = engine.create_session(
        apply_prompt_template=False, sampler_config=litert_lm.SamplerConfig(top_k=1), max_output_tokens=NEW_TOKENS
    )
    session.run_prefill([PROMPT])  # the engine tokenizes and prepends BOS (the metadata's start token) itself
    text = session.run_decode().texts[0]
    expected = spm.SentencePieceProcessor(model_file=TOKENIZER).decode(eager_tokens)
    assert text == expected


class Decoder:
    """The decoder .tflite run signature by signature, its KV cache carried between calls as numpy arrays."""

    def __init__(self, path, model):
        from ai_edge_litert.interpreter import Interpreter

        self.interpreter = Interpreter(model_path=str(path), num_threads=2)
        self.model = model
        self.cache = {
            k: v.numpy() for k, v in litert.decoder_sample_inputs(model, 1, CACHE_LEN).items() if k.startswith("kv_")
        }

    def __call__(self, signature: str, ids: list[int], start: int) -> np.ndarray:
        t = torch.tensor([ids])
        inputs = {
            "embeddings": self.model.embed(t).numpy(),
            "per_layer_embeddings": self.model.per_layer_embedding(t).numpy(),
            "input_pos": np.arange(start, start + len(ids), dtype=np.int32),
            "mask": np.zeros((1, 1, len(ids), CACHE_LEN), np.float32),  # not read by the graph (see LiteRtLmDecoder)
        }
        out = self.interpreter.get_signature_runner(signature)(**inputs, **self.cache)
        self.cache = {k: out[k] for k in self.cache}
        return out["logits"]


@torch.no_grad()
def logit_errors(decoder_path, model, steps: int = 4) -> list[float]:
    """Max |delta logit| of the prefill (last position) and of `steps` decode steps fed the eager greedy tokens."""
    ids = prompt_ids(model)[:PREFILL_LEN]
    prefill, step_logits, tokens = prefill_and_decode(model, torch.tensor([ids]), steps, CACHE_LEN)
    run = Decoder(decoder_path, model)
    errors = [float(np.abs(run(f"prefill_{PREFILL_LEN}", ids, 0)[0, -1] - prefill[0, -1].numpy()).max())]
    for i, eager in enumerate(step_logits):
        got = run("decode", [tokens[i]], PREFILL_LEN + i)
        errors.append(float(np.abs(got[0, -1] - eager[0].numpy()).max()))
    return errors


def test_decoder_signatures_match_eager_logits(exported):
    model, path = exported
    # Same float32 arithmetic in a different op order (XNNPACK): observed ~1e-6 on logits of size ~4.
    assert max(logit_errors(path.parent / litert.DECODER_FILE, model)) <= 1e-4


def rounded_weights(model, bits: int = 8, block: int | None = None):
    """The reference for a quantized decoder: the eager model with every matmul weight rounded to symmetric int8 per
    channel, or to int`bits` in blocks of `block` along its input where they divide it (int8 per channel where not),
    as the recipes do (the activations' dynamic int8 rounding comes on top)."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        for w in [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)] + [model.embed_tokens.weight]:
            blocked = block is not None and w.shape[1] % block == 0
            qmax = 2 ** (bits - 1) - 1 if blocked else 127
            groups = w.reshape(w.shape[0], -1, block if blocked else w.shape[1])
            scale = groups.abs().amax(-1, keepdim=True).clamp(min=1e-12) / qmax
            w.copy_((torch.round(groups / scale).clamp(-qmax, qmax) * scale).reshape(w.shape))
    return model


@torch.no_grad()
def weight_rounding_error(model, reference, steps: int) -> float:
    """Max |delta logit| between `reference` and the model over the positions logit_errors compares."""
    ids = prompt_ids(model)[:PREFILL_LEN]
    _, _, tokens = prefill_and_decode(model, torch.tensor([ids]), steps, CACHE_LEN)
    sequence = torch.tensor([ids + tokens[:steps]])
    positions = slice(PREFILL_LEN - 1, PREFILL_LEN + steps)
    return (reference(sequence) - model(sequence))[0, positions].abs().max().item()


@torch.no_grad()
def test_int8_dynamic_decoder_errs_no_more_than_int8_weights_do(exported, tmp_path):
    model, path = exported
    decoder = shutil.copy(path.parent / litert.DECODER_FILE, tmp_path / "int8.tflite")
    litert.quantize(decoder, ExportSpec("litert", quant="int8-dynamic").recipe)
    steps = 4
    errors = logit_errors(decoder, model, steps)
    # The random tiny model is sensitive to int8 weights (the eager rounding alone moves its logits, of size ~4, by
    # ~0.6; measured int8-dynamic: ~0.4). A correct lowering errs by about as much as that rounding, not more;
    # 1.5x leaves room for the dynamic activation rounding. A wrong scale or layout would err by O(logits).
    assert 0 < max(errors) <= 1.5 * weight_rounding_error(model, rounded_weights(model), steps)


@torch.no_grad()
def test_int4_decoder_takes_the_specs_blocks(exported, tmp_path):
    """The int4 recipe quantizes in blocks of the spec's block size (LiteRT's default, 64: DEFAULT_BLOCK_SIZE), every
    weight whose input it divides int4 and the others int8, and errs about as much as that rounding does eagerly."""
    from ai_edge_litert import schema_py_generated as schema

    model, path = exported
    spec = ExportSpec("litert", quant="int4-blockwise")
    assert spec.block_size == 64
    decoder = shutil.copy(path.parent / litert.DECODER_FILE, tmp_path / "int4.tflite")
    litert.quantize(decoder, spec.recipe)
    flat = schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(decoder.read_bytes(), 0))
    blocks = {}
    for tensor in flat.subgraphs[0].tensors:
        if tensor.type in (schema.TensorType.INT4, schema.TensorType.INT8) and tensor.quantization is not None:
            details = tensor.quantization.details
            blocks[tensor.name] = (tensor.type, tensor.shape[-1] % 64 == 0, getattr(details, "blockSize", None))
    assert {kind for kind, _, _ in blocks.values()} == {schema.TensorType.INT4, schema.TensorType.INT8}
    for name, (kind, divides, block) in blocks.items():
        assert (kind, block) == ((schema.TensorType.INT4, 64) if divides else (schema.TensorType.INT8, None)), name
    steps = 4
    errors = logit_errors(decoder, model, steps)
    assert 0 < max(errors) <= 1.5 * weight_rounding_error(model, rounded_weights(model, 4, 64), steps)
    with pytest.raises(InputError, match="block_size: litert quantizes in blocks of 32 or 64, got 128"):
        ExportSpec("litert", quant="int4-blockwise", block_size=128)


def test_caches_are_written_as_slices_and_read_without_copies(exported):
    """Each cache-owning layer writes K and V with one DYNAMIC_UPDATE_SLICE (done in place by the runtime) and reads
    them through BATCH_MATMUL's adj_y, as litert-torch's export_hf does. With index_copy caches (STABLEHLO_SCATTER,
    which XNNPACK does not run) and whole-cache transposes of V, prefill ran 2.5x slower on an E2B-shaped model.
    Whole-cache transposes are left only where the converter shares one between the layers that read a KV-sharing
    source (export_hf's graph has the same)."""
    import ai_edge_litert.schema_py_generated as schema
    from ai_edge_litert.tools import flatbuffer_utils

    model, path = exported
    cfg = model.config
    names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    flat = flatbuffer_utils.read_model(str(path.parent / litert.DECODER_FILE))
    cache_shapes = ([1, cfg.num_kv_heads, CACHE_LEN, cfg.head_dim], [1, cfg.num_kv_heads, cfg.head_dim, CACHE_LEN])
    shared_sources = {s for s in cfg.kv_shared_from if s is not None}
    for graph in flat.subgraphs[:2]:  # prefill_8, decode
        ops = [(names[max(flat.operatorCodes[op.opcodeIndex].builtinCode,
                          flat.operatorCodes[op.opcodeIndex].deprecatedBuiltinCode)], op) for op in graph.operators]
        kinds = [kind for kind, _ in ops]
        assert "STABLEHLO_SCATTER" not in kinds, graph.name
        assert kinds.count("DYNAMIC_UPDATE_SLICE") == 2 * len(cfg.cache_owning_layers), graph.name
        cache_transposes = [op for kind, op in ops if kind == "TRANSPOSE"
                            and list(graph.tensors[op.inputs[0]].shape) in cache_shapes]
        assert len(cache_transposes) <= 2 * len(shared_sources), graph.name


def test_every_weight_is_written_once(exported):
    """The decoder's signatures (prefill_8, decode) read one copy of each weight, in the lightweight conversion's
    path (the fixture's): converting the whole TextDecoder that way wrote E2B's LM head and per-layer projection once
    per signature (exporters.weights.decoder_half)."""
    import hashlib

    from ai_edge_litert import schema_py_generated as schema

    _, path = exported
    data = (path.parent / litert.DECODER_FILE).read_bytes()
    tflite = schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(data, 0))
    assert len(tflite.subgraphs) == 2
    weights = [bytes(b.data) if b.data is not None else data[b.offset:b.offset + b.size] for b in tflite.buffers]
    digests = [hashlib.sha256(w).hexdigest() for w in weights if len(w) >= 4096]
    cfg = exported[0].config
    assert len(digests) >= 2 * cfg.num_layers and len(set(digests)) == len(digests)


def test_a_bf16_model_converts_as_its_float32_copy_would(exported):
    """`g3n export --target litert` keeps a bf16 checkpoint bf16 and casts each part to float32 while it converts (a
    float32 E2B does not fit in 24 GB beside its conversion): the modules it converts (decoder with its scales
    folded into the weights, token embedder) equal those of the float32 copy of the same bf16 weights, which the CLI
    loaded before, and the caller's bf16 model is left as it was. The folded decoder equals the model's own graph
    to float32 rounding. Eager, not converted: what differs is the casting, which the converter does not touch."""
    from exporters.weights import decoder_half
    from models.float32 import float32_
    from models.text import TextDecoder

    model = exported[0]

    def loaded(state: dict) -> TextDecoder:  # as load_pretrained builds one: the rotary buffers computed in float32
        m = TextDecoder(model.config)
        m.load_state_dict(state, assign=True)
        m.init_buffers()
        return m.eval()

    bf16 = loaded({k: v.to(torch.bfloat16) for k, v in model.state_dict().items()})
    before = {k: v.clone() for k, v in bf16.state_dict().items()}
    float_copy = loaded({k: v.float() for k, v in before.items()})
    sample = litert.decoder_sample_inputs(model, 3, CACHE_LEN)
    g = torch.Generator().manual_seed(0)
    sample["embeddings"] = torch.randn(sample["embeddings"].shape, generator=g)
    sample["per_layer_embeddings"] = torch.randn(sample["per_layer_embeddings"].shape, generator=g)
    ids = torch.tensor([[2, 17, model.config.vocab_size - 1]])
    outputs = []
    with torch.no_grad():
        for m in (bf16, float_copy):
            decoder = litert.LiteRtLmDecoder(float32_(decoder_half(m, fold_scales=True)), last_position_only=False)
            outputs.append([decoder(**sample), litert.TableLookup(m)(ids)])
        unfolded = litert.LiteRtLmDecoder(float_copy, last_position_only=False)(**sample)
    for ours, theirs in zip(*outputs):
        assert all(v.dtype == torch.float32 and torch.equal(v, theirs[k]) for k, v in ours.items())
    assert all(torch.allclose(outputs[1][0][k], v, rtol=1e-5, atol=1e-5) for k, v in unfolded.items())
    assert torch.equal(outputs[1][1]["embeddings"], float_copy.embed(ids))  # the scale is a product either way
    after = bf16.state_dict()
    assert all(after[k].dtype == torch.bfloat16 or not v.is_floating_point() for k, v in before.items())
    assert all(torch.equal(after[k], v) for k, v in before.items())
