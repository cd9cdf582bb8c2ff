"""Core ML target: one multifunction `.mlpackage` (iOS 18) whose functions share weights and the KV cache state, and
one package per encoder of spec.encoders beside it.

Functions of `model.mlpackage` (T: every length of spec.prefill_lengths):

  prefill_<T>(inputs_embeds [1,T,H], per_layer_rows [1,T,L,P], input_pos [T] int32) -> logits [1,1,V]
                                                              (or [1,T,V] when spec.kv_shared_prefill is off)
  decode(inputs_embeds [1,1,H], per_layer_rows [1,1,L,P], input_pos [1] int32)       -> logits [1,1,V]

input_pos must be consecutive (start, start+1, ...): the caches are written as one slice at input_pos[0]. Masks and
RoPE are computed in-graph from input_pos, so there is no mask input. The KV cache is one pair of fp16 states
`<layer>_k_cache` / `<layer>_v_cache` [1, K, C, D] per cache-owning layer, with the same names in every function.
Neither table lookup is in the package: an app reads the PLE rows and the token rows from two memory-mappable
assets beside it (per_layer_embeddings.safetensors and embeddings.safetensors, both in contract.ple's format); the
tied LM head keeps its weight inside the graph.

The encoders (models.encoders: each the tower and its embedder into the text width, as one graph), fp16 compute,
float32 inputs and outputs (the outputs are rows of the decoder's float32 inputs_embeds):

  vision_encoder.mlpackage  vision_encoder_<S>(pixel_values [1,3,S,S]) -> image_embeddings [1,256,H]
                            one function per size of spec.image_sizes, sharing the weights; default: the first size
  audio_encoder.mlpackage   audio_encoder(features [1,2997,128], padding_mask [1,2997] (1.0 = padded))
                                                                            -> audio_embeddings [1,188,H]

Weights are fp16, or with spec.encoder_quant "int8-per-channel" int8 per output channel (convolution, linear and
matmul weights of more than MIN_QUANTIZED_ELEMENTS elements; ENCODER_WEIGHT_OPS).
"""

from __future__ import annotations

import copy
import gc
import json
import os
import shutil
import tempfile
import uuid
from collections import Counter
from pathlib import Path

import coremltools as ct
import coremltools.optimize.coreml as cto
import numpy as np
import torch
from coremltools.converters.mil import Builder as mb
from coremltools.converters.mil.frontend.milproto.load import load as load_mil_program
from coremltools.converters.mil.frontend.torch.ops import _get_inputs
from coremltools.converters.mil.frontend.torch.torch_op_registry import (
    register_torch_op,
)
from coremltools.converters.mil.mil.passes.defs.quantization import FP16ComputePrecision
from torch import Tensor, nn

from contract.bundle import AUDIO_ENCODER as AUDIO_FUNCTION
from contract.bundle import AUDIO_PACKAGE, COREML_WEIGHTS_DIR, DECODE, EMBEDDINGS_FILE, VISION_PACKAGE
from contract.bundle import COREML_PACKAGE as PACKAGE_NAME
from contract.bundle import prefill_name as prefill_function_name
from contract.bundle import vision_encoder_name as vision_function_name
from exporters import memo
from exporters.ple import write_ple_asset, write_ple_table
from exporters.spec import EMBEDDING_BLOCK, ExportSpec, check_target, export_folder, split_model
from exporters.weights import decoder_half, float32_copy
from models.encoders import (
    AudioEmbedder,
    VisionEmbedder,
    audio_sample_inputs,
    golden_media,
    vision_sample_inputs,
)
from models.multimodal import Gemma3n
from models.text import KVCache, TextDecoder

# The encoders quantize the weights of convolutions and linear layers only (coremltools lowers the vision embedder's
# projection to a matmul). Other large constants are activations folded at conversion (the audio adapter's padding
# row broadcast to [1, 188, H]): rounded per tensor they would cost every padded position accuracy for a few kB.
ENCODER_WEIGHT_OPS = ("conv", "linear", "matmul")
WEIGHTS_DIR = Path(COREML_WEIGHTS_DIR)
# Only weights of more than this many elements are compressed; the rest (norm scales, AltUp coefficients, small
# projections) stay fp16, since compressing them saves almost nothing. coremltools' own default.
MIN_QUANTIZED_ELEMENTS = 2048
# The token table's storage beside each decoder scheme: fp16, and for the 4-bit schemes int4 in groups of
# EMBEDDING_BLOCK (the other targets' token embedders' block): in fp16 E2B's table is 1.07 GB of an int4 bundle that
# must stay under Google's 3.66 GB. At int8 an int8 table took g3n compare's coreml-mil/int8 decode cosine from
# 0.994 to 0.984 (limit 0.988, measured with the fp16 table): int8 waits for its limits to be re-derived.
TOKEN_TABLE_STORAGE = {"none": "fp16", "int8-per-channel": "fp16", "int4-per-block": "int4", "palettize-4bit": "int4"}
aten = torch.ops.aten


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


def install_slice_write_caches(model: TextDecoder, cache_len: int) -> None:
    """Gives every cache-owning layer of `model` (the conversion's own copy) a SliceWriteKVCache, as setup_caches
    gives a KVCache."""
    cfg, dtype = model.config, model.norm.weight.dtype
    for i in cfg.cache_owning_layers:
        model.layers[i].self_attn.kv_cache = SliceWriteKVCache(1, cfg.num_kv_heads, cache_len, cfg.head_dim, dtype)
    model.cache_len = cache_len


def sample_inputs(model: TextDecoder, length: int, start: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    cfg = model.config
    return (
        torch.zeros(1, length, cfg.hidden_size),
        torch.zeros(1, length, cfg.num_layers, cfg.hidden_size_per_layer_input),
        torch.arange(start, start + length),
    )


# Ops whose fp16 result is wrong where the model's float32 is right (all found by the coreml-mil executor, fp16 vs
# fp32 op by op): RoPE's angles (position x inverse frequency: at position 216 fp16 already rounds them by 0.06 rad,
# past 2048 the positions themselves), running sums (the audio stem's cumulative group norm sums 512 values per
# frame over 1,499 frames: 1e6, beyond fp16's 65,504, then inf and NaN) and an RMS norm's mean of squares (its
# squares overflow past |x| = 256: the vision embedder normalises the tower's output scaled by sqrt(2048), values up
# to 312 on the default model: their squares overflowed and the image embeddings came out wrong by 2.7 of 3.0).
FP32_SINKS = ("cos", "sin", "cumsum", "reduce_mean")
# The cheap ops on the way into a sink, kept float32 with it when every use of their result leads there.
FP32_CHAIN = ("cast", "mul", "add", "sub", "real_div", "concat", "expand_dims", "reshape", "squeeze", "transpose",
              "tile", "slice_by_index", "reduce_sum", "pow")


def fp16_op_selector():
    """coremltools' op selector for fp16 compute (True: fp16): every op but the FP32_SINKS, the FP32_CHAIN ops all of
    whose uses lead into one, and the ops that read a running sum (its count's reciprocal reaches 1e-6)."""
    leads_to_sink: dict = {}

    def leads(op) -> bool:
        if op not in leads_to_sink:
            leads_to_sink[op] = False
            children = [child for out in op.outputs for child in out.child_ops]
            leads_to_sink[op] = op.op_type in FP32_SINKS or (
                op.op_type in FP32_CHAIN and bool(children) and all(leads(child) for child in children))
        return leads_to_sink[op]

    def computes_in_fp16(op) -> bool:
        reads_a_sum = any(getattr(var, "op", None) is not None and var.op.op_type == "cumsum"
                          for value in op.inputs.values()
                          for var in (value if isinstance(value, (list, tuple)) else [value]))
        return not (leads(op) or reads_a_sum)

    return computes_in_fp16


coremltools_fp16_overflow = FP16ComputePrecision.fp16_overflow


def fp16_overflow(op) -> bool:
    """coremltools' FP16ComputePrecision.fp16_overflow (an op with an fp32 constant input whose finite values
    exceed fp16's range stays fp32), a slice of each constant at a time: coremltools' own takes np.where of the
    whole constant, three int64 index arrays per element (13 GB for E2B's LM head), which ran the real-size
    conversion out of memory."""
    for inputs in op.inputs.values():
        for var in inputs if isinstance(inputs, (list, tuple)) else [inputs]:
            if var.op is None or var.op.op_type != "const" or not var.is_tensor_or_scalar_of(dtype="fp32"):
                continue
            flat = np.asarray(var.op.val.val).reshape(-1)
            for start in range(0, flat.size, 1 << 24):
                magnitude = np.abs(flat[start:start + (1 << 24)])
                if np.max(magnitude, where=magnitude < 1e38, initial=0.0) > 65504:
                    return True
    return False


FP16ComputePrecision.fp16_overflow = staticmethod(fp16_overflow)


@register_torch_op(override=True)
def gelu(context, node):
    """coremltools' gelu converter, reading the mode from torch.export's keyword too. Its own reads the arguments
    only, so the model's tanh approximation (approximate="tanh", a keyword in the exported graph) became MIL's EXACT
    gelu (found by the coreml-mil executor: up to 5e-4 per activation, in every FFN and the vision blocks)."""
    inputs = _get_inputs(context, node)
    approximate = (node.kwinputs or {}).get("approximate", inputs[1:] or ("none",))[0]
    approximate = getattr(approximate, "val", approximate)
    context.add(mb.gelu(x=inputs[0], mode="TANH_APPROXIMATION" if approximate == "tanh" else "EXACT", name=node.name))


def decompositions():
    """torch.export's default decompositions but aten.linear's: decomposed, each Linear's weight is permuted in the
    graph, which coremltools folds into a transposed copy of every weight (E2B's LM head: 2.1 GB in float32, and
    copies of the copy), where MIL's linear takes the weight as it is."""
    table = torch.export.default_decompositions()
    del table[aten.linear.default]
    return table


def convert_program(program: torch.export.ExportedProgram, outputs: list[ct.TensorType] | None = None,
                    fp16: bool = True) -> ct.models.MLModel:
    """One function with fp16 compute but for the ops fp16_op_selector keeps float32 (fp16=False: all float32);
    iOS 18: states, multifunction packages, int8 per-channel constexprs."""
    precision = ct.transform.FP16ComputePrecision(op_selector=fp16_op_selector()) if fp16 else ct.precision.FLOAT32
    return ct.convert(
        program.run_decompositions(decompositions()),
        minimum_deployment_target=ct.target.iOS18,
        compute_precision=precision,
        outputs=outputs,
        skip_model_load=True,  # Linux cannot load Core ML models; macOS loads the saved package when it is used
    )


def convert_module(module: nn.Module, sample_args: tuple[Tensor, ...], output_name: str, output_dtype=None,
                   prepare=lambda program: program) -> ct.models.MLModel:
    """One function: the fixed-shape torch.export of `module` (`prepare` rewrites the program), converted with
    convert_program, saved, and returned as its package without the MIL program coremltools keeps in memory (E2B's
    decoder: 4.8 GB per function; compress rebuilds it from the package). With the conversion memo on
    (exporters.memo), the same module converted again -- the float functions of every compression level, the
    encoders of several bundles -- is a copy of the package converted first."""

    def convert(path: Path) -> None:
        with torch.no_grad():
            program = torch.export.export(module.eval(), sample_args)
        convert_program(prepare(program), [ct.TensorType(name=output_name, dtype=output_dtype)]).save(str(path))

    version = f"coremltools {ct.__version__} {output_name} {output_dtype}"
    return saved_package(lambda path: memo.memoized([(output_name, module, sample_args)], version, path, convert))


def saved_package(write) -> ct.models.MLModel:
    """The package write(path) saves into a new temporary path, loaded without its MIL program; deleted with the
    returned model."""
    path = Path(tempfile.mkdtemp(prefix="g3n-coreml-", suffix=".mlpackage"))
    path.rmdir()  # the memo copies a package into a path that does not exist yet
    write(path)
    return ct.models.MLModel(str(path), skip_model_load=True, is_temp_package=True)


def compression_config(recipe: str, block_size: int = 32,
                       weight_ops: tuple[str, ...] | None = None) -> cto.OptimizationConfig | None:
    """The coremltools config for a recipe (spec.recipe or spec.encoder_recipe); None for "" (no compression).
    Per channel means per output channel (coremltools infers the axis from the consuming op). weight_ops: compress
    only the constants these MIL ops consume (None: every large constant)."""
    kw = {"weight_threshold": MIN_QUANTIZED_ELEMENTS}
    op_config = {
        "": None,
        "linear_quantize_int8_per_channel": cto.OpLinearQuantizerConfig(
            mode="linear_symmetric", dtype="int8", granularity="per_channel", **kw
        ),
        "linear_quantize_int4_per_block": cto.OpLinearQuantizerConfig(
            mode="linear_symmetric", dtype="int4", granularity="per_block", block_size=block_size, **kw
        ),
        # A 16-entry lookup table per group of 16 output channels: Apple's recommended 4-bit LLM palettisation.
        "palettize_4bit": cto.OpPalettizerConfig(
            mode="kmeans", nbits=4, granularity="per_grouped_channel", group_size=16, **kw
        ),
    }[recipe]
    if op_config is None:
        return None
    if weight_ops is None:
        return cto.OptimizationConfig(global_config=op_config)
    return cto.OptimizationConfig(op_type_configs={op: op_config for op in weight_ops})


def compress(functions: dict[str, ct.models.MLModel], spec: ExportSpec, recipe: str | None = None,
             weight_ops: tuple[str, ...] | None = None) -> dict[str, ct.models.MLModel]:
    """Every function compressed with `recipe` (default spec.recipe, the decoder's scheme; the encoders take
    spec.encoder_recipe) on the constants `weight_ops` consume (compression_config). Each function is compressed on
    its own, deterministically, so the shared weights come out bit-identical and save_multifunction still stores them
    once."""
    config = compression_config(spec.recipe if recipe is None else recipe, spec.block_size, weight_ops)
    if config is None:
        return functions
    op_configs = [config.global_config, *config.op_type_configs.values()]
    palettize = any(isinstance(op_config, cto.OpPalettizerConfig) for op_config in op_configs)
    method = cto.palettize_weights if palettize else cto.linear_quantize_weights
    return {name: saved_package(lambda path: method(mlmodel, config).save(str(path)))
            for name, mlmodel in functions.items()}


def decoder_steps(spec: ExportSpec) -> dict[str, tuple[int, bool]]:
    """Function name -> (new tokens, last position only), prefills first, then decode."""
    steps = {prefill_function_name(t): (t, spec.kv_shared_prefill) for t in spec.prefill_lengths}
    steps[DECODE] = (1, False)
    return steps


def decoder_step(model: TextDecoder, spec: ExportSpec, length: int, last_position_only: bool
                 ) -> tuple[CoreMLStep, tuple[Tensor, ...]]:
    """(The step a function converts, its sample inputs): over a float32 copy of the decoder's half of its own
    (exporters.weights.decoder_half: no PLE table, the token table only as the LM head; E2B's is 9.6 GB in float32,
    its whole decoder 17.7 GB) with slice-written caches. `model` is left in its dtype, with its own caches."""
    half = float32_copy(decoder_half(model))
    install_slice_write_caches(half, spec.cache_len)
    return CoreMLStep(half, last_position_only), sample_inputs(half, length)


def convert_functions(model: TextDecoder, spec: ExportSpec) -> dict[str, ct.models.MLModel]:
    """Every function of the package converted with fp16 compute, by function name, each from a float32 copy of its
    own (decoder_step): one copy of E2B's half (9.6 GB) at a time."""
    functions = {}
    for name, (length, last) in decoder_steps(spec).items():
        functions[name] = convert_module(*decoder_step(model, spec, length, last), "logits")
        # The copy is in reference cycles through torch.export's graph modules: only a collection frees it, and at
        # E2B the next conversion, or compress, beside it ran out of memory.
        gc.collect()
    return functions


def write_package(functions: dict[str, ct.models.MLModel], out_dir: str | os.PathLike,
                  package_name: str = PACKAGE_NAME, default_function: str = DECODE) -> Path:
    """out_dir/<package_name> holding `functions`, staged in a temporary folder and renamed into place at the end.
    save_multifunction deduplicates the functions' identical weights, so they are stored once."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".coreml-") as scratch:
        descriptor = ct.utils.MultiFunctionDescriptor()
        for name, mlmodel in functions.items():
            path = os.path.join(scratch, f"{name}.mlpackage")
            mlmodel.save(path)
            descriptor.add_function(path, src_function_name="main", target_function_name=name)
        descriptor.default_function_name = default_function
        staged = Path(scratch) / package_name
        ct.utils.save_multifunction(descriptor, str(staged))
        make_reproducible(staged)
        target = out_dir / package_name
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


def export_coreml(model: TextDecoder | Gemma3n, spec: ExportSpec, out_dir: str | os.PathLike) -> Path:
    """Writes out_dir/model.mlpackage (prefill_<T> and decode over one KV-cache state), beside it the packages of
    spec.encoders (of a whole Gemma3n), per_layer_embeddings.safetensors, embeddings.safetensors (the token table)
    and export.json; returns the decoder package's path. out_dir must not exist (exporters.spec.export_folder). The
    model is left as it was, its own caches included."""
    check_target(spec, "coreml")
    decoder, whole = split_model(model, spec)
    with export_folder(out_dir, spec) as tmp:
        write_package(compress(convert_functions(decoder.eval(), spec), spec), tmp)
        for name, (functions, default) in convert_encoder_packages(whole, spec).items():
            write_package(compress(functions, spec, spec.encoder_recipe, ENCODER_WEIGHT_OPS), tmp, name, default)
        # The app reads the PLE rows and the token rows from these memory-mappable assets (the other targets carry
        # both tables inside).
        write_ple_asset(decoder, tmp, spec.ple_storage)
        write_token_table(decoder, tmp, TOKEN_TABLE_STORAGE[spec.quant])
    return Path(out_dir) / PACKAGE_NAME


def write_token_table(model: TextDecoder, directory: str | os.PathLike, storage: str) -> Path:
    """directory/embeddings.safetensors: the token-embedding table whose rows the app feeds the package, in the PLE
    asset's format (contract.ple), each row in groups of EMBEDDING_BLOCK where the PLE table's are its layers."""
    h = model.config.hidden_size
    groups = h // EMBEDDING_BLOCK if h % EMBEDDING_BLOCK == 0 else 1
    return write_ple_table(model.embed_tokens.weight.detach(), Path(directory) / EMBEDDINGS_FILE, storage,
                           model.config.vocab_size, groups, model.embed_scale)


# --- encoders ------------------------------------------------------------------------------------------------------


def gather_without_bools(program: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    """Rewrites every index_select of a bool tensor (the audio encoder subsamples its padding mask so) as one of int32
    with int32 indices, in place. Core ML's gather takes neither bool data nor the float indices that coremltools
    makes of a clamped int64 arange."""
    graph = program.graph_module.graph
    for node in list(graph.nodes):
        if node.target != aten.index_select.default or node.args[0].meta["val"].dtype != torch.bool:
            continue
        data, index = node.args[0], node.args[2]
        with graph.inserting_before(node):
            data_int = graph.call_function(aten._to_copy.default, (data,), {"dtype": torch.int32})
            data_int.meta["val"] = data.meta["val"].to(torch.int32)
            index_int = graph.call_function(aten._to_copy.default, (index,), {"dtype": torch.int32})
            index_int.meta["val"] = index.meta["val"].to(torch.int32)
        node.replace_input_with(data, data_int)
        node.replace_input_with(index, index_int)
        selected = node.meta["val"]
        node.meta["val"] = selected.to(torch.int32)
        with graph.inserting_after(node):
            as_bool = graph.call_function(aten._to_copy.default, (node,), {"dtype": torch.bool})
            as_bool.meta["val"] = selected
        node.replace_all_uses_with(as_bool, delete_user_cb=lambda user: user is not as_bool)
    program.graph_module.recompile()
    return program


def convert_encoder(module: nn.Module, sample_args: tuple[Tensor, ...], output_name: str) -> ct.models.MLModel:
    """One encoder function: fp16 compute, a float32 output named `output_name`."""
    return convert_module(module, sample_args, output_name, np.float32, gather_without_bools)


def convert_encoder_packages(whole: Gemma3n | None, spec: ExportSpec) -> dict[str, tuple[dict, str]]:
    """Package name -> (fp16 functions by name, default function) for every encoder of spec.encoders."""
    packages = {}
    if "vision" in spec.encoders:
        vision = float32_copy(VisionEmbedder(whole))
        functions = {vision_function_name(size): convert_encoder(vision, vision_sample_inputs(size), "image_embeddings")
                     for size in spec.image_sizes}
        packages[VISION_PACKAGE] = functions, vision_function_name(spec.image_sizes[0])
    if "audio" in spec.encoders:
        audio = convert_encoder(float32_copy(AudioEmbedder(whole)), audio_sample_inputs(), "audio_embeddings")
        packages[AUDIO_PACKAGE] = {AUDIO_FUNCTION: audio}, AUDIO_FUNCTION
    return packages


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


# --- what the encoders' numerics will be: an eager simulation (Linux cannot run Core ML) ---------------------------


@torch.no_grad()
def fake_quantize_int8_per_channel_(module: nn.Module) -> int:
    """Rounds, in place, every convolution and linear weight of more than MIN_QUANTIZED_ELEMENTS elements through int8
    as coremltools' linear_symmetric per-channel scheme does (in the weight's own dtype: scale = max|w| / 127 per
    output channel, round, clip to +-127); returns how many weights it rounded."""
    rounded = 0
    for layer in module.modules():
        if isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Linear)) and layer.weight.numel() > MIN_QUANTIZED_ELEMENTS:
            w = layer.weight
            scale = w.abs().amax(dim=tuple(range(1, w.ndim)), keepdim=True) / 127
            scale = torch.where(scale > 0, scale, torch.ones_like(scale))
            w.copy_((w / scale).round().clamp(-127, 127) * scale)
            rounded += 1
    return rounded


def embedding_errors(expected: Tensor, actual: Tensor) -> dict[str, float]:
    """max abs error, cosine similarity of the flattened embeddings, and the largest reference magnitude for scale."""
    expected, actual = expected.double().flatten(), actual.double().flatten()
    return {
        "max_abs": (actual - expected).abs().max().item(),
        "cosine": torch.nn.functional.cosine_similarity(actual, expected, dim=0).item(),
        "ref_max_abs": expected.abs().max().item(),
    }


SIMULATIONS = ("fp16", "int8-weights", "int8-weights+fp16")


@torch.no_grad()
def simulate_encoder_errors(whole: Gemma3n, image_sizes: tuple[int, ...] = (768,), audio: bool = True,
                            simulations: tuple[str, ...] = SIMULATIONS) -> dict[str, dict]:
    """Errors the Core ML encoders should show against the float embedders on golden_media() inputs, simulated in
    eager PyTorch on the CPU: "fp16" (weights and compute, the float package), "int8-weights" (int8 per-channel
    weights, float32 compute: the quantization alone) and "int8-weights+fp16" (what the int8 package computes).
    Core ML's own kernels (fused ops, accumulation order, the ANE) differ; these are estimates, not measurements.
    Returns {"vision_<S>" for each of image_sizes, and "audio" if audio: {simulation: embedding_errors}}."""
    golden = golden_media(whole, image_sizes)
    cases = {f"vision_{s}": (VisionEmbedder, (golden[f"pixel_values_{s}"],), golden[f"image_embeddings_{s}"])
             for s in image_sizes}
    if audio:
        cases["audio"] = (AudioEmbedder, (golden["audio_features"], golden["audio_padding_mask"]),
                          golden["audio_embeddings"])
    errors = {}
    for case, (embedder_class, inputs, expected) in cases.items():
        errors[case] = {}
        for simulation in simulations:
            embedder = copy.deepcopy(embedder_class(whole)).eval()
            dtype = torch.float16 if simulation.endswith("fp16") else torch.float32
            embedder.to(dtype)  # int8 scales are then computed in fp16, as coremltools computes them on fp16 weights
            for layer in embedder.modules():  # the conformer clamps at +-1e10, beyond fp16: fp16's range bounds it
                if isinstance(getattr(layer, "clip", None), float):
                    layer.clip = min(layer.clip, torch.finfo(dtype).max)
            if simulation.startswith("int8"):
                fake_quantize_int8_per_channel_(embedder)
            errors[case][simulation] = embedding_errors(expected, embedder(*(x.to(dtype) for x in inputs)).float())
    return errors
