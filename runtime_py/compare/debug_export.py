"""Debug exports: the production decoder graphs with every layer's output as an extra output, to find the first layer
where a backend's numerics leave the float model's.

A debug export is lowered exactly like the target's own decoder (same wrapper, same cache layout, same quantization
recipe), plus one output per decoder layer: `layer_<i>`, the layer's AltUp streams at the last position of the call,
[A, 1, H]. The layer outputs are taken with forward hooks on the model's own `DecoderLayer`s while the graph is traced
(torch.export's non-strict tracing runs them as plain Python), so nothing in models/ changes for debugging and the
debug graph computes what the production graph computes.

Token-embedding and PLE lookups are not in a debug export: its executor feeds the float model's lookups, so the layer
outputs isolate the decoder graph (the comparer checks each backend's own lookups separately).

    export_debug(model, spec, out_dir) -> path     litert: debug_decoder.tflite; executorch: debug_decoder.pte
    open_debug(path, model, spec) -> executor      the executor interface (runtime_py/executors) + `layer_outputs`
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch import Tensor, nn

from exporters.spec import ExportSpec
from models.errors import InputError
from models.text import TextDecoder
from runtime_py.executors.litert_executor import LiteRtExecutor

LITERT_FILE = "debug_decoder.tflite"
EXECUTORCH_FILE = "debug_decoder.pte"


def layer_output_name(i: int) -> str:
    return f"layer_{i}"


@contextmanager
def tapped_layers(model: TextDecoder) -> Iterator[list[Tensor]]:
    """Collects every DecoderLayer's output streams at the last position, [A, B, H], in layer order, while the block
    runs: eagerly on the float model, or while a wrapper's forward is traced for export."""
    taps: list[Tensor] = []

    def record(module, args, output):
        taps.append(output[0][:, :, -1])

    handles = [layer.register_forward_hook(record) for layer in model.layers]
    try:
        yield taps
    finally:
        for handle in handles:
            handle.remove()


# --- LiteRT ----------------------------------------------------------------------------------------------------------


class LiteRtDebugDecoder(nn.Module):
    """exporters.litert.LiteRtLmDecoder (LiteRT-LM's names and cache layout) with the layer outputs added."""

    def __init__(self, model: TextDecoder, last_position_only: bool):
        from exporters.litert import LiteRtLmDecoder

        super().__init__()
        self.step = LiteRtLmDecoder(model, last_position_only)

    def forward(self, embeddings: Tensor, per_layer_embeddings: Tensor, input_pos: Tensor, mask: Tensor, **kv: Tensor):
        with tapped_layers(self.step.model) as taps:
            out = self.step(embeddings, per_layer_embeddings, input_pos, mask, **kv)
        return out | {layer_output_name(i): t for i, t in enumerate(taps)}


def export_litert_debug(model: TextDecoder, spec: ExportSpec, out_dir: Path) -> Path:
    """debug_decoder.tflite: signatures prefill_<T> and decode as exporters.litert.convert_decoder writes them, with
    the layer outputs, quantized with spec's recipe."""
    import litert_torch

    from exporters.litert import decoder_sample_inputs, quantize

    path = Path(out_dir) / LITERT_FILE
    model = model.eval().float()
    converter = litert_torch.Converter()
    with torch.no_grad():
        for tokens in spec.prefill_lengths:
            converter.signature(f"prefill_{tokens}", LiteRtDebugDecoder(model, spec.kv_shared_prefill),
                                sample_kwargs=decoder_sample_inputs(model, tokens, spec.cache_len))
        converter.signature("decode", LiteRtDebugDecoder(model, False),
                            sample_kwargs=decoder_sample_inputs(model, 1, spec.cache_len))
        converter.convert().export(str(path))
    if spec.recipe:
        quantize(path, spec.recipe)
    return path


class LiteRtDebugExecutor(LiteRtExecutor):
    """Runs debug_decoder.tflite as runtime_py's LiteRtExecutor runs the decoder section (the KV cache carried between
    calls as numpy arrays), with the float model's lookups, keeping the last call's layer outputs."""

    name = "litert-debug"

    def __init__(self, path: Path, lookups: "FloatLookups", cache_len: int, prefill_lengths: tuple[int, ...],
                 threads: int = 2):
        from runtime_py.executors.litert_executor import load_interpreter

        self.decoder = load_interpreter(Path(path), threads)
        self._runners = {name: self.decoder.get_signature_runner(name) for name in self.decoder.get_signature_list()}
        self._cache_inputs = {name: d for name, d in self._runners["decode"].get_input_details().items()
                              if name.startswith("kv_cache_")}
        self.lookups, self.num_layers = lookups, lookups.num_layers
        self.cache_len, self.prefill_lengths = cache_len, tuple(prefill_lengths)
        self.layer_outputs: list[np.ndarray] = []
        self.reset()

    def embed(self, ids):
        return self.lookups.embed(ids)

    def per_layer_rows(self, ids):
        return self.lookups.per_layer_rows(ids)

    def _run(self, signature: str, embeds, rows, start: int) -> np.ndarray:
        out = self._call(signature, embeds, rows, start)
        self.layer_outputs = [out[layer_output_name(i)] for i in range(self.num_layers)]
        return out["logits"][0, -1]


# --- ExecuTorch ------------------------------------------------------------------------------------------------------


class ExecuTorchDebugStep(nn.Module):
    """The decoder graph of exporters.executorch.DecoderStep (mutable-buffer KV cache) on the embeddings and
    per-layer rows apart (the float lookups feed them), returning (logits, layer_0, ..., layer_<L-1>)."""

    def __init__(self, decoder: TextDecoder, last_position_only: bool):
        super().__init__()
        self.decoder, self.last_position_only = decoder, last_position_only

    def forward(self, inputs_embeds: Tensor, per_layer_rows: Tensor, input_pos: Tensor):
        with tapped_layers(self.decoder) as taps:
            logits = self.decoder.forward_embeddings(inputs_embeds, per_layer_rows, input_pos, self.last_position_only)
        return (logits, *taps)


def export_executorch_debug(model: TextDecoder, spec: ExportSpec, out_dir: Path) -> Path:
    """debug_decoder.pte: methods prefill_<T> and decode as exporters.executorch.decoder_programs exports them (the
    same decoder copy, quantization, GELU decomposition and XNNPACK lowering), with the layer outputs."""
    from exporters.executorch import export_decoder, gelu_tanh, lower, quantize_decoder_

    cfg = model.config
    decoder = export_decoder(model.eval(), spec.cache_len)
    quantize_decoder_(decoder, spec)
    H, L, P = cfg.hidden_size, cfg.num_layers, cfg.hidden_size_per_layer_input

    def export(T: int, last_position_only: bool) -> torch.export.ExportedProgram:
        args = torch.zeros(1, T, H), torch.zeros(1, T, L, P), torch.arange(T)
        ep = torch.export.export(ExecuTorchDebugStep(decoder, last_position_only), args, strict=False)
        return ep.run_decompositions({torch.ops.aten.gelu.default: gelu_tanh})

    with torch.no_grad():
        programs = {f"prefill_{T}": export(T, spec.kv_shared_prefill) for T in spec.prefill_lengths}
        programs["decode"] = export(1, True)
    program = lower(programs, {})
    path = Path(out_dir) / EXECUTORCH_FILE
    with open(path, "wb") as f:
        program.write_to_file(f)
    return path


class ExecuTorchDebugExecutor:
    """Runs debug_decoder.pte with executorch.runtime, keeping the last call's layer outputs."""

    name = "executorch-debug"

    def __init__(self, path: Path, lookups: "FloatLookups", cache_len: int, prefill_lengths: tuple[int, ...]):
        import executorch.kernels.quantized  # noqa: F401  (registers the kernels quantized programs call)
        from executorch.runtime import Runtime

        program = Runtime.get().load_program(path)
        self.methods = {name: program.load_method(name) for name in program.method_names}
        self.lookups, self.num_layers = lookups, lookups.num_layers
        self.cache_len, self.prefill_lengths = cache_len, tuple(prefill_lengths)
        self.layer_outputs: list[np.ndarray] = []

    def embed(self, ids):
        return self.lookups.embed(ids)

    def per_layer_rows(self, ids):
        return self.lookups.per_layer_rows(ids)

    def _run(self, method: str, embeds, rows, start: int) -> np.ndarray:
        T = embeds.shape[1]
        out = self.methods[method].execute([torch.from_numpy(np.ascontiguousarray(embeds, np.float32)),
                                            torch.from_numpy(np.ascontiguousarray(rows, np.float32)),
                                            torch.arange(start, start + T)])
        self.layer_outputs = [t.numpy().copy() for t in out[1:]]
        return out[0][0, -1].numpy().copy()

    def prefill(self, embeds, rows, start: int) -> np.ndarray:
        return self._run(f"prefill_{embeds.shape[1]}", embeds, rows, start)

    def decode(self, embeds, rows, pos: int) -> np.ndarray:
        return self._run("decode", embeds, rows, pos)

    def reset(self) -> None:
        """Nothing to clear, as in ExecuTorchExecutor: every position is written before a query reads it."""


# --- both --------------------------------------------------------------------------------------------------------------


class FloatLookups:
    """The float model's token-embedding and PLE lookups, in the executor interface's shapes."""

    def __init__(self, model: TextDecoder):
        self.model, self.num_layers = model, model.config.num_layers

    def embed(self, ids) -> np.ndarray:
        with torch.no_grad():
            return self.model.embed(torch.as_tensor(np.asarray(ids), dtype=torch.long)[None]).float().numpy()

    def per_layer_rows(self, ids) -> np.ndarray:
        with torch.no_grad():
            return self.model.per_layer_embedding(torch.as_tensor(np.asarray(ids), dtype=torch.long)[None])[0].numpy()


DEBUG_EXPORTS = {"litert": (export_litert_debug, LITERT_FILE), "executorch": (export_executorch_debug, EXECUTORCH_FILE)}


def export_debug(model: TextDecoder, spec: ExportSpec, out_dir: str | Path) -> Path:
    """Writes the debug export of `spec.target` into out_dir (created if needed); returns its path."""
    if spec.target not in DEBUG_EXPORTS:
        raise InputError(f"no debug export for target {spec.target!r} (only {', '.join(DEBUG_EXPORTS)})")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return DEBUG_EXPORTS[spec.target][0](model, spec, out_dir)


def open_debug(path: str | Path, model: TextDecoder, spec: ExportSpec, threads: int = 2):
    """An executor over a debug export, fed `model`'s float lookups; after each prefill/decode call its
    `layer_outputs` hold every layer's output streams at the call's last position."""
    lookups = FloatLookups(model.float().eval())
    if spec.target == "litert":
        return LiteRtDebugExecutor(Path(path), lookups, spec.cache_len, spec.prefill_lengths, threads)
    if spec.target == "executorch":
        return ExecuTorchDebugExecutor(Path(path), lookups, spec.cache_len, spec.prefill_lengths)
    raise InputError(f"no debug export for target {spec.target!r} (only {', '.join(DEBUG_EXPORTS)})")
