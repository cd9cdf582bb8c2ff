"""Core ML target: one multifunction `.mlpackage` (iOS 18) whose functions share weights and the KV cache state.

Functions of `model.mlpackage` (T: every length of spec.prefill_lengths):

  prefill_<T>(inputs_embeds [1,T,H], per_layer_rows [1,T,L,P], input_pos [T] int32) -> logits [1,1,V]
                                                              (or [1,T,V] when spec.kv_shared_prefill is off)
  decode(inputs_embeds [1,1,H], per_layer_rows [1,1,L,P], input_pos [1] int32)       -> logits [1,1,V]

input_pos must be consecutive (start, start+1, ...): the caches are written as one slice at input_pos[0]. Masks and
RoPE are computed in-graph from input_pos, so there is no mask input. The KV cache is one pair of fp16 states
`<layer>_k_cache` / `<layer>_v_cache` [1, K, C, D] per cache-owning layer, with the same names in every function.
Neither table lookup is in the package: an app reads the PLE rows from the safetensors asset (exporters.ple) and the
token embeddings from its own copy of the table; the tied LM head keeps its weight inside the graph.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from collections import Counter
from pathlib import Path

import coremltools as ct
import coremltools.optimize.coreml as cto
import torch
from coremltools.converters.mil.frontend.milproto.load import load as load_mil_program
from torch import Tensor, nn

from exporters.spec import ExportSpec
from models.text import KVCache, TextDecoder

PACKAGE_NAME = "model.mlpackage"
DECODE = "decode"
WEIGHTS_DIR = Path("Data", "com.apple.CoreML", "weights")
# Only weights of more than this many elements are compressed; the rest (norm scales, AltUp coefficients, small
# projections) stay fp16, since compressing them saves almost nothing. coremltools' own default.
MIN_QUANTIZED_ELEMENTS = 2048


def prefill_function_name(length: int) -> str:
    return f"prefill_{length}"


class SliceWriteKVCache(KVCache):
    """The model's KVCache written as one slice at input_pos[0] instead of index_put at input_pos.

    coremltools lowers `cache[:, :, input_pos] = k` (index_put) only for a single position; a slice assignment with a
    runtime start becomes `slice_update` on the state for any T, which is also the op Core ML updates in place."""

    def update(self, input_pos: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        start, length = input_pos[0].item(), k.shape[2]
        torch._check(start >= 0)
        torch._check(start + length <= self.k_cache.shape[2])
        self.k_cache[:, :, start : start + length] = k
        self.v_cache[:, :, start : start + length] = v
        return self.k_cache, self.v_cache


class CoreMLStep(nn.Module):
    """forward_embeddings of `decoder` over its slice-written cache buffers, which become Core ML states."""

    def __init__(self, decoder: TextDecoder, last_position_only: bool):
        super().__init__()
        self.decoder, self.last_position_only = decoder, last_position_only

    def forward(self, inputs_embeds: Tensor, per_layer_rows: Tensor, input_pos: Tensor) -> Tensor:
        return self.decoder.forward_embeddings(inputs_embeds, per_layer_rows, input_pos, self.last_position_only)


def install_slice_write_caches(model: TextDecoder, cache_len: int) -> tuple[int | None, dict[int, KVCache | None]]:
    """Gives every cache-owning layer a SliceWriteKVCache (what setup_caches does with KVCache); returns the cache
    length and caches it replaced, for restore_caches."""
    cfg, dtype = model.config, model.embed_tokens.weight.dtype
    replaced = model.cache_len, {}
    for i in cfg.cache_owning_layers:
        attn = model.layers[i].self_attn
        replaced[1][i] = attn.kv_cache
        attn.kv_cache = SliceWriteKVCache(1, cfg.num_kv_heads, cache_len, cfg.head_dim, dtype)
    model.cache_len = cache_len
    return replaced


def restore_caches(model: TextDecoder, replaced: tuple[int | None, dict[int, KVCache | None]]) -> None:
    model.cache_len, caches = replaced
    for i, cache in caches.items():
        model.layers[i].self_attn.kv_cache = cache


def sample_inputs(model: TextDecoder, length: int, start: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    cfg = model.config
    return (
        torch.zeros(1, length, cfg.hidden_size),
        torch.zeros(1, length, cfg.num_layers, cfg.hidden_size_per_layer_input),
        torch.arange(start, start + length),
    )


def convert_step(model: TextDecoder, length: int, last_position_only: bool) -> ct.models.MLModel:
    """One function: torch.export of the decoder step for `length` new tokens, converted with fp16 compute."""
    with torch.no_grad():
        program = torch.export.export(CoreMLStep(model, last_position_only), sample_inputs(model, length))
    return ct.convert(
        program.run_decompositions(),
        minimum_deployment_target=ct.target.iOS18,
        compute_precision=ct.precision.FLOAT16,
        outputs=[ct.TensorType(name="logits")],
        skip_model_load=True,  # Linux cannot load Core ML models; macOS loads the saved package when it is used
    )


def compression_config(spec: ExportSpec) -> cto.OptimizationConfig | None:
    """The coremltools config for spec.quant (a scheme of QUANT_SCHEMES["coreml"]); None for "none"."""
    kw = {"weight_threshold": MIN_QUANTIZED_ELEMENTS}
    op_config = {
        "": None,
        "linear_quantize_int8_per_channel": cto.OpLinearQuantizerConfig(
            mode="linear_symmetric", dtype="int8", granularity="per_channel", **kw
        ),
        "linear_quantize_int4_per_block": cto.OpLinearQuantizerConfig(
            mode="linear_symmetric", dtype="int4", granularity="per_block", block_size=spec.block_size, **kw
        ),
        # A 16-entry lookup table per group of 16 output channels: Apple's recommended 4-bit LLM palettisation.
        "palettize_4bit": cto.OpPalettizerConfig(
            mode="kmeans", nbits=4, granularity="per_grouped_channel", group_size=16, **kw
        ),
    }[spec.recipe]
    return None if op_config is None else cto.OptimizationConfig(global_config=op_config)


def compress(functions: dict[str, ct.models.MLModel], spec: ExportSpec) -> dict[str, ct.models.MLModel]:
    """Every function compressed with spec.quant's scheme. Each function is compressed on its own, deterministically,
    so the shared weights come out bit-identical and save_multifunction still stores them once."""
    config = compression_config(spec)
    if config is None:
        return functions
    palettize = isinstance(config.global_config, cto.OpPalettizerConfig)
    method = cto.palettize_weights if palettize else cto.linear_quantize_weights
    return {name: method(mlmodel, config) for name, mlmodel in functions.items()}


def convert_functions(model: TextDecoder, spec: ExportSpec) -> dict[str, ct.models.MLModel]:
    """Every function of the package with fp16 weights, by function name (prefills first, then decode)."""
    replaced = install_slice_write_caches(model, spec.cache_len)
    try:
        steps = {prefill_function_name(t): (t, spec.kv_shared_prefill) for t in spec.prefill_lengths}
        steps[DECODE] = (1, False)
        return {name: convert_step(model, t, last) for name, (t, last) in steps.items()}
    finally:
        restore_caches(model, replaced)


def write_package(functions: dict[str, ct.models.MLModel], out_dir: str | os.PathLike) -> Path:
    """out_dir/model.mlpackage holding `functions`, staged in a temporary folder and renamed into place at the end.
    save_multifunction deduplicates the functions' identical weights, so they are stored once."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".coreml-") as scratch:
        descriptor = ct.utils.MultiFunctionDescriptor()
        for name, mlmodel in functions.items():
            path = os.path.join(scratch, f"{name}.mlpackage")
            mlmodel.save(path)
            descriptor.add_function(path, src_function_name="main", target_function_name=name)
        descriptor.default_function_name = DECODE
        staged = Path(scratch) / PACKAGE_NAME
        ct.utils.save_multifunction(descriptor, str(staged))
        make_reproducible(staged)
        target = out_dir / PACKAGE_NAME
        if target.exists():
            shutil.rmtree(target)
        staged.rename(target)
    return target


def make_reproducible(package: Path) -> None:
    """The same model must always give the same bytes (bundles rebuild byte-identically). coremltools writes the spec
    with protobuf's default, unordered map serialization, and names the package's items with random UUIDs: rewrite
    the spec deterministically and derive the ids from each item's path (Core ML only needs them unique)."""
    spec_path = package / "Data" / "com.apple.CoreML" / "model.mlmodel"
    spec_path.write_bytes(ct.utils.load_spec(str(package)).SerializeToString(deterministic=True))
    manifest_path = package / "Manifest.json"
    manifest = json.loads(manifest_path.read_text())
    renamed = {old: str(uuid.uuid5(uuid.NAMESPACE_URL, item["path"]))
               for old, item in manifest["itemInfoEntries"].items()}
    manifest["itemInfoEntries"] = {renamed[k]: v for k, v in sorted(manifest["itemInfoEntries"].items(),
                                                                     key=lambda kv: renamed[kv[0]])}
    manifest["rootModelIdentifier"] = renamed[manifest["rootModelIdentifier"]]
    manifest_path.write_text(json.dumps(manifest, indent=4) + "\n")


def export_coreml(model: TextDecoder, spec: ExportSpec, out_dir: str | os.PathLike) -> Path:
    """Writes out_dir/model.mlpackage (prefill_<T> and decode over one KV-cache state) and returns its path.
    The model is left as it was, its own caches included."""
    return write_package(compress(convert_functions(model.eval(), spec), spec), out_dir)


# --- inspection (what Linux can check of a package; the bundle manifest reads the same summary) -----------------


def describe_feature(feature) -> dict:
    """An input, output or state of a function description: name, shape, element type."""
    is_state = feature.type.WhichOneof("Type") == "stateType"
    array = feature.type.stateType.arrayType if is_state else feature.type.multiArrayType
    dtype = ct.proto.FeatureTypes_pb2.ArrayFeatureType.ArrayDataType.Name(array.dataType)
    return {"name": feature.name, "shape": list(array.shape), "dtype": dtype.lower()}


def weight_bytes(package: Path) -> int:
    """Bytes of the package's weight blobs (one file for all functions)."""
    weights = Path(package) / WEIGHTS_DIR
    return sum(f.stat().st_size for f in weights.rglob("*") if f.is_file())


def op_counts(package: Path) -> dict[str, Counter]:
    """MIL op types per function, from the program rebuilt out of the package's protobuf (no Core ML runtime needed)."""
    spec = ct.utils.load_spec(str(package))
    program = load_mil_program(spec, spec.specificationVersion, str(Path(package) / WEIGHTS_DIR))
    return {name: Counter(op.op_type for op in fn.operations) for name, fn in program.functions.items()}


def summarize_mlpackage(package: str | os.PathLike) -> dict:
    """Functions (inputs, outputs, states with shapes and dtypes; op counts), the default function and weight bytes."""
    package = Path(package)
    spec = ct.utils.load_spec(str(package))
    ops = op_counts(package)
    functions = {
        fn.name: {
            "inputs": [describe_feature(f) for f in fn.input],
            "outputs": [describe_feature(f) for f in fn.output],
            "states": [describe_feature(f) for f in fn.state],
            "ops": dict(sorted(ops[fn.name].items())),
            "num_ops": sum(ops[fn.name].values()),
        }
        for fn in spec.description.functions
    }
    return {
        "specification_version": spec.specificationVersion,
        "default_function": spec.description.defaultFunctionName,
        "functions": functions,
        "weight_bytes": weight_bytes(package),
    }
