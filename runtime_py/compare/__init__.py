"""The delegate-comparison report: every backend and quantization against the float PyTorch model, on the same inputs.

Inputs. One chat prompt (the bundles' golden prompt unless told otherwise) goes through each backend's own lookups
and graphs with the session's prefill schedule (runtime_py.session), then N decode steps fed the float model's greedy
tokens (teacher forcing: every backend sees the same inputs at every step, so its errors do not compound through
different token choices). Positions: 0 is the prefill's last position, 1..N the decode steps.

Metrics per component, against the float model's logits at the same positions:
    max_abs, mean_abs   |logit error|: the largest, and the mean over the vocabulary (then max / mean over steps)
    cosine              cosine similarity of the logit vectors (the lowest step)
    kl                  KL(float || backend) of the next-token distributions, in nats (the largest step)
    top1                the fraction of positions whose argmax is the float model's
    greedy              the fraction of the N + 1 greedy tokens that a free-running greedy generation on the backend
                        reproduces before its first different token. With teacher forcing this is the number of leading
                        positions whose argmax agrees: up to the first disagreement both generations saw the same tokens.
The litertlm backend (Google's LiteRT-LM engine) returns text only: for it `greedy` alone is measured, as the number of
the float model's greedy tokens whose detokenized text the engine's greedy text starts with.

Components: the decoder's prefill and decode, and, for bundles that carry them, the vision and audio encoders (each
with its adapter into the text width, as the bundle lowers them). The encoders run the bundle's golden media
(golden_media.safetensors: the fixed image preprocessed to each of the bundle's image sizes, the fixed clip as one
30 s window of log-mel features) on the backend and on the float PyTorch encoders of the bundle's reference model
(runtime_py.executors.torch_executor.TorchEncoders); per image size and for the audio window:
    max_abs, mean_abs   |embedding error|: the largest, and the mean over every element of the [1, N, H] output
    cosine              cosine similarity of the whole output, flattened
A row's vision limits hold at every image size. litertlm runs the same .litertlm sections as litert and returns text
only, so the litert rows stand for its encoders. A component no compared bundle carries is reported "not in bundle".

Thresholds (ci/thresholds.json) hold a limit per cell (backend/quant), component and metric; a row past any limit
fails, and its first divergent stage is found from a debug export (runtime_py.compare.debug_export): every stage (token embedding, PLE
rows, each decoder layer's output streams, the logits) is compared with the float model's, and the first stage whose
relative error exceeds its limit is named.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from models.errors import InputError

SCHEMA = "g3n-compare/1"
DEFAULT_THRESHOLDS = Path(__file__).resolve().parents[2] / "ci" / "thresholds.json"
DEFAULT_STEPS = 16
COMPONENTS = {
    "decoder.prefill": "last-position logits of the prompt's prefill",
    "decoder.decode": "logits of the teacher-forced decode steps, and greedy-token agreement",
    "vision_encoder": "image embeddings of the golden image at each of the bundle's image sizes",
    "audio_encoder": "audio embeddings of the golden clip (one 30 s window)",
}
ENCODER_COMPONENTS = {"vision": "vision_encoder", "audio": "audio_encoder"}  # manifest name -> component
NOT_IN_BUNDLE = "not in bundle"
# Backends that run a bundle's encoders themselves (litertlm: Google's engine returns text; see the docstring).
ENCODER_BACKENDS = ("litert", "executorch", "coreml")
ENCODER_METRICS = ("max_abs", "mean_abs", "cosine")
# The bar for int8 encoders (MobileNet-V5 is a convnet): derived cosine limits of quantized cells never go
# below it.
QUANTIZED_ENCODER_COSINE = 0.99
# Which way each metric may drift: an upper limit ("max") for errors, a lower limit ("min") for agreements.
METRICS = {"max_abs": "max", "mean_abs": "max", "cosine": "min", "kl": "max", "top1": "min", "greedy": "min"}
STAGES_KEY = "stages"  # the cell's per-stage relative-error limits for localisation
DEFAULT_STAGE_LIMIT = 1e-3  # relative error of a stage when a cell names no limit for it
# Bundle target -> the backends that run it, in report order.
TARGET_BACKENDS = {"android": ("litert", "litertlm"), "executorch": ("executorch",), "ios": ("coreml",)}
# Backends whose graphs have a debug export (runtime_py.compare.debug_export); litertlm runs the litert graphs.
DEBUGGABLE = ("litert", "litertlm", "executorch")
LITERTLM_NOTE = ("litertlm is Google's LiteRT-LM engine, which returns text only: for it greedy-token agreement alone is "
                 "measured (its greedy text against the float model's detokenized greedy tokens).")


# --- metrics -----------------------------------------------------------------------------------------------------


def position_metrics(reference: np.ndarray, got: np.ndarray) -> dict[str, np.ndarray]:
    """reference, got: logits [S, V] at the same S positions -> per-position metrics, each [S]."""
    ref, out = reference.astype(np.float64), got.astype(np.float64)
    diff = np.abs(out - ref)
    norms = np.linalg.norm(ref, axis=-1) * np.linalg.norm(out, axis=-1)
    cosine = np.where(norms > 0, (ref * out).sum(-1) / np.maximum(norms, 1e-300), 1.0)
    log_p, log_q = _log_softmax(ref), _log_softmax(out)
    kl = np.maximum((np.exp(log_p) * (log_p - log_q)).sum(-1), 0.0)
    return {"max_abs": diff.max(-1), "mean_abs": diff.mean(-1), "cosine": cosine, "kl": kl,
            "top1": (out.argmax(-1) == ref.argmax(-1)).astype(np.float64)}


def _log_softmax(x: np.ndarray) -> np.ndarray:
    shifted = x - x.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def leading_agreement(reference_tokens, tokens) -> int:
    count = 0
    for a, b in zip(reference_tokens, tokens):
        if a != b:
            break
        count += 1
    return count


def decoder_metrics(reference_logits: np.ndarray, got_logits: np.ndarray) -> dict[str, dict]:
    """Logits [N + 1, V] (prefill, then N decode steps) -> {"decoder.prefill": ..., "decoder.decode": ...}."""
    per = position_metrics(reference_logits, got_logits)
    steps = len(reference_logits) - 1
    greedy = leading_agreement(reference_logits.argmax(-1), got_logits.argmax(-1))
    decode = {"max_abs": float(per["max_abs"][1:].max()), "mean_abs": float(per["mean_abs"][1:].mean()),
              "cosine": float(per["cosine"][1:].min()), "kl": float(per["kl"][1:].max()),
              "top1": float(per["top1"][1:].mean()), "greedy": greedy / (steps + 1),
              "top1_count": f"{int(per['top1'][1:].sum())}/{steps}", "greedy_count": f"{greedy}/{steps + 1}"}
    prefill = {k: float(per[k][0]) for k in ("max_abs", "mean_abs", "cosine", "kl", "top1")}
    return {"decoder.prefill": prefill, "decoder.decode": decode}


def relative_error(got: np.ndarray, reference: np.ndarray) -> float:
    """||got - reference|| / ||reference||, in float64."""
    ref, out = np.asarray(reference, np.float64), np.asarray(got, np.float64)
    return float(np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-30))


def embedding_metrics(reference: np.ndarray, got: np.ndarray) -> dict[str, float]:
    """An encoder's output against the float encoders' (same shape): max and mean |error| over every element, and
    the cosine similarity of the two outputs flattened, in float64."""
    ref, out = np.asarray(reference, np.float64).ravel(), np.asarray(got, np.float64).ravel()
    if ref.shape != out.shape:
        raise RuntimeError(f"encoder output of {np.asarray(got).size} values, the float encoder's {np.asarray(reference).size}")
    diff = np.abs(out - ref)
    norms = np.linalg.norm(ref) * np.linalg.norm(out)
    cosine = float(ref @ out / norms) if norms > 0 else float(np.array_equal(ref, out))
    return {"max_abs": float(diff.max()), "mean_abs": float(diff.mean()), "cosine": cosine}


# --- inputs and traces --------------------------------------------------------------------------------------------


@dataclass
class Trace:
    """One backend's run over the comparison inputs: logits [N + 1, V] and, per graph call, its layer outputs."""

    logits: np.ndarray
    calls: list[list[np.ndarray]] = field(default_factory=list)
    call_logits: list[np.ndarray] = field(default_factory=list)


class _Recording:
    """An executor whose prefill/decode calls are recorded: their logits and `layer_outputs()` after each call.
    media_rows (runtime_py.components.media.MediaTokenRows): a whole model's embedders' rows, which the ids of their
    vocabularies embed as (see embed_as_whole_model)."""

    def __init__(self, executor, layer_outputs, media_rows=None):
        self.executor, self.layer_outputs, self.media_rows = executor, layer_outputs, media_rows
        self.cache_len, self.prefill_lengths = executor.cache_len, executor.prefill_lengths
        self.calls, self.call_logits = [], []

    def embed(self, ids):
        return embed_as_whole_model(self.executor, ids, self.media_rows)

    def reset(self):
        self.executor.reset()

    def _record(self, logits):
        self.calls.append(self.layer_outputs())
        self.call_logits.append(np.asarray(logits, np.float32))
        return logits

    def prefill(self, embeds, rows, start):
        return self._record(self.executor.prefill(embeds, rows, start))

    def decode(self, embeds, rows, pos):
        return self._record(self.executor.decode(embeds, rows, pos))


def embed_as_whole_model(executor, ids: np.ndarray, media_rows=None) -> np.ndarray:
    """The executor's token embeddings [1, T, H] of ids [T]; with media_rows, the ids of a whole model's vision and
    audio vocabularies take their embedders' rows, as Gemma3n.embed_prompt (and transformers' Gemma3nModel) embeds
    every prompt. Only a model whose text pieces share ids with those vocabularies (the tiny default's 384-id
    vocabulary) sees a difference; the published vocabulary keeps its media ids for media."""
    embeds = executor.embed(ids)
    return embeds if media_rows is None else media_rows.apply(np.asarray(ids, np.int64), np.asarray(embeds))


def run_trace(executor, per_layer_rows, prompt_ids: list[int], steps: int, forced_tokens: list[int] | None = None,
              layer_outputs=lambda: [], media_rows=None) -> tuple[Trace, list[int]]:
    """Prefill (the session's chunk schedule), then `steps` decode steps. The decode inputs are `forced_tokens`
    (teacher forcing) or, without them, the trace's own greedy tokens. media_rows: embed as a whole model
    (embed_as_whole_model). Returns the trace and its argmax tokens."""
    from runtime_py.session import Session

    if len(prompt_ids) + steps > executor.cache_len:
        raise InputError(f"prompt of {len(prompt_ids)} tokens plus {steps} decode steps does not fit the KV cache of "
                         f"{executor.cache_len}; use fewer --steps or a bundle with a larger --cache-len")
    recording = _Recording(executor, layer_outputs, media_rows)
    # Only the session's prefill schedule is used: no tokenizer, stop ids or id check (the ids are the caller's).
    session = Session(recording, None, per_layer_rows, bos_id=prompt_ids[0], stop_ids=[], vocab_size=0)
    logits = [np.asarray(session.prefill(prompt_ids), np.float32)]
    tokens = [int(logits[0].argmax())]
    for s in range(steps):
        token = forced_tokens[s] if forced_tokens is not None else tokens[-1]
        arr = np.asarray([token], dtype=np.int64)
        logits.append(np.asarray(recording.decode(recording.embed(arr), per_layer_rows(arr)[None], len(prompt_ids) + s),
                                 np.float32))
        tokens.append(int(logits[-1].argmax()))
    return Trace(np.stack(logits), recording.calls, recording.call_logits), tokens


def prompt_ids_for(prompt: str, tokenizer, bos_id: int) -> list[int]:
    """The prompt as one user turn of the chat template, with BOS: what every backend (and Google's engine) sees."""
    from runtime_py.components.chat_template import render

    return [bos_id] + tokenizer.encode(render([{"role": "user", "content": prompt}]))


class FloatReference:
    """The float PyTorch model as the reference runtime: its trace for one cache schedule, with layer outputs.
    model: a TextDecoder, or a whole Gemma3n, whose prompts embed the ids of its media vocabularies as the
    embedders' rows (embed_as_whole_model); the decoder is traced either way."""

    def __init__(self, model):
        from runtime_py.compare.debug_export import FloatLookups
        from runtime_py.components.media import MediaTokenRows

        whole = model if hasattr(model, "language_model") else None
        self.model = (whole.language_model if whole is not None else model).float().eval()
        self.media_rows = MediaTokenRows.from_model(whole.float().eval()) if whole is not None else None
        self.lookups = FloatLookups(self.model)
        self._traces: dict = {}

    def embed(self, ids: np.ndarray) -> np.ndarray:
        return embed_as_whole_model(self.lookups, ids, self.media_rows)

    def trace(self, prompt_ids: list[int], steps: int, cache_len: int, prefill_lengths) -> tuple[Trace, list[int]]:
        from runtime_py.compare.debug_export import tapped_layers
        from runtime_py.executors.torch_executor import TorchExecutor

        key = (tuple(prompt_ids), steps, cache_len, tuple(prefill_lengths))
        if key not in self._traces:
            executor = TorchExecutor(self.model, cache_len, tuple(prefill_lengths))
            with tapped_layers(self.model) as taps:
                def layer_outputs():
                    out = [t.numpy().copy() for t in taps]
                    taps.clear()
                    return out

                self._traces[key] = run_trace(executor, self.lookups.per_layer_rows, prompt_ids, steps,
                                              layer_outputs=layer_outputs, media_rows=self.media_rows)
        return self._traces[key]


class EncoderReference:
    """The float PyTorch encoders of a bundle's reference model (the whole Gemma3n), each output on a golden input
    computed once however many bundles and backends are compared with it."""

    def __init__(self, model):
        from runtime_py.executors.torch_executor import TorchEncoders

        self.encoders = TorchEncoders(model)
        self._outputs: dict = {}

    def run(self, component: str, *inputs: np.ndarray) -> np.ndarray:
        import hashlib

        key = (component, *(hashlib.sha256(np.ascontiguousarray(x).tobytes()).hexdigest() for x in inputs))
        if key not in self._outputs:
            fn = self.encoders.image if component == "vision_encoder" else self.encoders.audio
            self._outputs[key] = fn(*inputs)
        return self._outputs[key]


def golden_media_inputs(bundle: Path, manifest: dict) -> list[tuple[str, str, int | None, tuple[np.ndarray, ...]]]:
    """(component, input label, image size or None, encoder inputs) for every encoder input the bundle's golden media
    give: the golden image at each of the bundle's image sizes, then the golden clip's window."""
    from safetensors.numpy import load_file

    from models.audio import SAMPLE_RATE

    entry = manifest["encoders"]
    path = Path(bundle) / entry["golden_media"]["file"]
    media = load_file(str(path))
    components = set(entry["components"])
    inputs = []
    try:
        if "vision" in components:
            for size in entry["image_sizes"]:
                inputs.append(("vision_encoder", f"{size} px", int(size), (media[f"pixel_values_{size}"],)))
        if "audio" in components:
            seconds = media["audio_waveform"].size / SAMPLE_RATE
            inputs.append(("audio_encoder", f"{seconds:.3g} s clip in a 30 s window", None,
                           (media["audio_features"], media["audio_padding_mask"])))
    except KeyError as e:
        raise InputError(f"{path}: no tensor {e.args[0]!r} (golden media of a bundle with encoders "
                         f"{sorted(components)})") from None
    return inputs


def encoder_entries(runner, reference: EncoderReference, inputs) -> list[dict]:
    """Each golden input through the backend's encoders and the float ones -> one entry per input."""
    entries = []
    for component, label, size, args in inputs:
        got = runner.image(*args) if component == "vision_encoder" else runner.audio(*args)
        entries.append({"component": component, "input": label, "size": size,
                        "metrics": embedding_metrics(reference.run(component, *args), got), "breaches": []})
    return entries


# --- thresholds ---------------------------------------------------------------------------------------------------


@dataclass
class Breach:
    cell: str
    component: str
    metric: str
    value: float
    limit: float
    where: str = ""  # which input, where a component is measured on several (an encoder's image size)

    def __str__(self) -> str:
        sign = ">" if METRICS[self.metric] == "max" else "<"
        component = f"{self.component} ({self.where})" if self.where else self.component
        return f"{self.cell} {component} {self.metric} = {self.value:.4g} {sign} limit {self.limit:.4g}"


def load_thresholds(path: str | Path) -> dict:
    """Reads and checks a thresholds file: {"comment": ..., "cells": {"<backend>/<quant>": {component: {metric:
    limit}, "stages": {stage or "*": relative-error limit}}}}. Any problem is one InputError naming the file and key."""
    from models.fileio import read_json_object

    path = Path(path)
    raw = read_json_object(path.parent, path.name, "thresholds", "the per-backend limits of g3n compare")
    cells = raw.get("cells")
    if not isinstance(cells, dict) or not cells:
        raise InputError(f"{path}: expected a non-empty object \"cells\" of \"<backend>/<quant>\" entries")
    for cell, limits in cells.items():
        backend, _, quant = cell.partition("/")
        if not backend or not quant or not isinstance(limits, dict):
            raise InputError(f"{path}: cells.{cell}: expected a \"<backend>/<quant>\" key holding an object")
        for component, metrics in limits.items():
            where = f"{path}: cells.{cell}.{component}"
            if component == "measured":
                continue  # what the limits were derived from: kept for the reader, not checked
            if component not in COMPONENTS and component != STAGES_KEY:
                raise InputError(f"{where}: unknown component (expected one of {', '.join([*COMPONENTS, STAGES_KEY])})")
            if not isinstance(metrics, dict):
                raise InputError(f"{where}: expected an object of limits")
            for metric, limit in metrics.items():
                if component != STAGES_KEY and metric not in METRICS:
                    raise InputError(f"{where}.{metric}: unknown metric (expected one of {', '.join(METRICS)})")
                if isinstance(limit, bool) or not isinstance(limit, (int, float)) or not math.isfinite(limit):
                    raise InputError(f"{where}.{metric}: expected a finite number, got {limit!r}")
    return {"path": str(path), "comment": raw.get("comment", ""), "cells": cells}


def check_cell(cell: str, metrics: dict[str, dict], limits: dict) -> list[Breach]:
    """The limits of one cell that `metrics` ({component: {metric: value}}) exceed."""
    breaches = []
    for component, component_limits in limits.items():
        if component not in COMPONENTS:
            continue
        for metric, limit in component_limits.items():
            value = metrics.get(component, {}).get(metric)
            if value is None:
                continue
            over = value > limit if METRICS[metric] == "max" else value < limit
            if over or (isinstance(value, float) and math.isnan(value)):
                breaches.append(Breach(cell, component, metric, value, limit))
    return breaches


def check_encoders(cell: str, entries: list[dict], limits: dict) -> list[Breach]:
    """The limits of one cell that its encoder entries exceed (each entry: one component on one input), each breach
    naming its input; the entries get their own breaches as strings too."""
    breaches = []
    for entry in entries:
        component = entry["component"]
        found = check_cell(cell, {component: entry["metrics"]}, {component: limits.get(component, {})})
        for breach in found:
            breach.where = entry["input"]
        entry["breaches"] = [str(b) for b in found]
        breaches += found
    return breaches


def stage_limit(limits: dict, stage: str) -> float:
    stages = limits.get(STAGES_KEY, {})
    return float(stages.get(stage, stages.get("*", DEFAULT_STAGE_LIMIT)))


# --- localisation -------------------------------------------------------------------------------------------------


def stage_errors(reference: Trace, debug: Trace, lookup_errors: dict[str, float] | None = None) -> list[tuple[str, float]]:
    """Relative error per stage, in the order data flows: the backend's own lookups (when given), each decoder
    layer's output streams and the logits of the debug export, each the largest over the graph calls."""
    if len(reference.calls) != len(debug.calls):
        raise RuntimeError(f"the debug run made {len(debug.calls)} graph calls, the reference {len(reference.calls)}")
    errors = list((lookup_errors or {}).items())
    num_layers = len(reference.calls[0])
    for i in range(num_layers):
        worst = max(relative_error(d[i].reshape(r[i].shape), r[i]) for r, d in zip(reference.calls, debug.calls))
        errors.append((f"layer_{i}", worst))
    errors.append(("logits", max(relative_error(d, r) for r, d in zip(reference.call_logits, debug.call_logits))))
    return errors


def first_divergent(errors: list[tuple[str, float]], limits: dict) -> dict | None:
    for stage, error in errors:
        limit = stage_limit(limits, stage)
        if not error <= limit:
            return {"stage": stage, "relative_error": error, "limit": limit}
    return None


def localise(reference: FloatReference, debug_executor, prompt_ids: list[int], steps: int, forced_tokens: list[int],
             limits: dict, lookup_errors: dict[str, float] | None = None, media_rows=None) -> dict:
    """Runs a debug export (runtime_py.compare.debug_export.open_debug) over the comparison inputs next to the float model and names
    the first stage whose relative error exceeds its limit. media_rows: the bundle's, for a whole model's bundle."""
    ref_trace, _ = reference.trace(prompt_ids, steps, debug_executor.cache_len, debug_executor.prefill_lengths)
    debug_trace, _ = run_trace(debug_executor, debug_executor.per_layer_rows, prompt_ids, steps, forced_tokens,
                               layer_outputs=lambda: list(debug_executor.layer_outputs), media_rows=media_rows)
    errors = stage_errors(ref_trace, debug_trace, lookup_errors)
    return {"stages": [{"stage": s, "relative_error": e, "limit": stage_limit(limits, s)} for s, e in errors],
            "first_divergent": first_divergent(errors, limits)}


def lookup_errors(executor, per_layer_rows, reference: FloatReference, ids: list[int],
                  media_rows=None) -> dict[str, float]:
    """The backend's own token-embedding and PLE lookups against the float model's, over the ids of the run
    (media_rows: the bundle's, for a whole model's bundle)."""
    arr = np.asarray(ids, dtype=np.int64)
    # In chunks of at most the longest prefill: the ExecuTorch lookups take no more tokens than that at once.
    chunks = [arr[i : i + max(executor.prefill_lengths)] for i in range(0, len(arr), max(executor.prefill_lengths))]
    embeds = np.concatenate([embed_as_whole_model(executor, c, media_rows) for c in chunks], axis=1)
    rows = np.concatenate([per_layer_rows(c) for c in chunks], axis=0)
    return {"token_embedding": relative_error(embeds, reference.embed(arr)),
            "per_layer_embedding": relative_error(rows, reference.lookups.per_layer_rows(arr))}


# --- rows ---------------------------------------------------------------------------------------------------------


@dataclass
class Row:
    backend: str
    quant: str
    scheme: str = ""
    bundle: str = ""
    status: str = "pass"  # pass, fail, skipped
    reason: str = ""
    metrics: dict = field(default_factory=dict)
    per_step_max_abs: list = field(default_factory=list)
    breaches: list = field(default_factory=list)
    localisation: dict | None = None
    encoder_scheme: str = ""  # the encoders' quantization scheme, where the bundle has encoders
    encoders: list = field(default_factory=list)  # {component, input, size, metrics, breaches} per encoder input

    @property
    def cell(self) -> str:
        return f"{self.backend}/{self.quant}"

    def as_dict(self) -> dict:
        return {"cell": self.cell, "backend": self.backend, "quant": self.quant, "scheme": self.scheme,
                "bundle": self.bundle, "status": self.status, "reason": self.reason, "metrics": self.metrics,
                "per_step_max_abs": self.per_step_max_abs, "breaches": [str(b) for b in self.breaches],
                "localisation": self.localisation, "encoder_scheme": self.encoder_scheme, "encoders": self.encoders}


@dataclass
class Comparison:
    """What `g3n compare` compares: the bundles, the inputs, the limits, and how to localise."""

    bundles: list[Path]
    thresholds: dict
    prompt: str
    steps: int = DEFAULT_STEPS
    localise: str = "breach"  # breach, always or never
    debug_dir: Path | None = None
    threads: int = 2
    progress: object = lambda message: None
    source: str = ""
    skipped: list[Row] = field(default_factory=list)  # rows decided without running (coreml off macOS)
    enforce: bool = True  # False: measure only (every cell unlimited), e.g. to derive new limits
    started: float = field(default_factory=time.perf_counter)  # the report's run time counts bundle builds too


def skip_reason(backend: str) -> str:
    if backend == "coreml" and sys.platform != "darwin":
        return "skipped: needs macOS (coremltools cannot run Core ML models on Linux)"
    return ""


def planned_cells(bundles: list[Path]) -> list[tuple[Path, dict, str]]:
    """(bundle, manifest, backend) for every row the bundles give, manifests verified first."""
    from contract.bundle import verify_bundle

    planned = []
    for bundle in bundles:
        manifest = verify_bundle(bundle)
        if manifest["target"] not in TARGET_BACKENDS:
            raise InputError(f"{bundle}: a {manifest['target']!r} bundle; g3n compare reads {', '.join(TARGET_BACKENDS)}")
        for backend in TARGET_BACKENDS[manifest["target"]]:
            planned.append((Path(bundle), manifest, backend))
    return planned


def check_cells_present(cells: list[str], thresholds: dict) -> None:
    missing = [c for c in cells if c not in thresholds["cells"]]
    if missing:
        raise InputError(f"{thresholds['path']}: no limits for cell {missing[0]} (add \"{missing[0]}\" under \"cells\")")


def run_comparison(job: Comparison) -> dict:
    """Runs every row and returns the report (see write_report); rows past their limits are localised."""
    from runtime_py.components.tokenizer import Tokenizer
    from runtime_py.engine import open_bundle, reference_model

    planned = planned_cells(job.bundles)
    if job.enforce:
        check_cells_present([f"{backend}/{m['quantization']['level']}" for _, m, backend in planned
                             if not skip_reason(backend)], job.thresholds)
    references: dict[str, FloatReference] = {}
    encoder_references: dict[str, EncoderReference] = {}
    rows: list[Row] = []
    inputs = None
    debug_cache: dict = {}
    for bundle, manifest, backend in planned:
        quant = manifest["quantization"]["level"]
        row = Row(backend, quant, manifest["quantization"]["scheme"], str(bundle))
        rows.append(row)
        reason = skip_reason(backend)
        if reason:
            row.status, row.reason = "skipped", reason
            continue
        job.progress(f"{row.cell}: running")
        ref_key = json.dumps(manifest["reference"]["files"], sort_keys=True)
        has_encoders = bool(manifest.get("encoders"))
        if ref_key not in references or (has_encoders and ref_key not in encoder_references):
            # The reference checkpoint, checked against the manifest as the torch backend does; whole (with its
            # encoders) when the bundle carries encoders.
            model = reference_model(bundle, manifest, whole=has_encoders)
            references.setdefault(ref_key, FloatReference(model))
            if hasattr(model, "language_model"):
                encoder_references[ref_key] = EncoderReference(model)
        reference = references[ref_key]
        # A whole model's bundle: the runtime's rows for the media vocabularies (embed_as_whole_model).
        media_rows = None
        if has_encoders:
            from runtime_py.components.media import MediaTokenRows

            media_rows = MediaTokenRows.from_file(bundle / manifest["encoders"]["media_token_embeddings"]["file"])
        tokenizer = Tokenizer(bundle / manifest["tokenizer"]["file"])
        prompt_ids = prompt_ids_for(job.prompt, tokenizer, manifest["tokenizer"]["bos_id"])
        spec = manifest["export_spec"]
        ref_trace, ref_tokens = reference.trace(prompt_ids, job.steps, spec["cache_len"], spec["prefill_lengths"])
        if inputs is None:
            inputs = {"prompt": job.prompt, "prompt_ids": prompt_ids, "decode_steps": job.steps,
                      "reference_greedy_tokens": ref_tokens,
                      "positions": "0: the prefill's last position; 1..N: decode steps fed the float model's greedy "
                                   "tokens"}
        limits = job.thresholds["cells"][row.cell] if job.enforce else {}
        lookups = None
        if backend == "litertlm":
            row.metrics = {"decoder.decode": litertlm_greedy(bundle, manifest, tokenizer, job.prompt, ref_tokens,
                                                             manifest["tokenizer"]["stop_ids"], job.threads)}
        else:
            session = open_bundle(bundle, backend, job.threads)
            executor, per_layer_rows = session.executor, session.per_layer_rows
            trace, _ = run_trace(executor, per_layer_rows, prompt_ids, job.steps, ref_tokens[:-1],
                                 media_rows=media_rows)
            row.metrics = decoder_metrics(ref_trace.logits, trace.logits)
            row.per_step_max_abs = [float(v) for v in np.abs(trace.logits - ref_trace.logits).max(-1)]
            lookups = lookup_errors(executor, per_layer_rows, reference, prompt_ids + ref_tokens[:-1], media_rows)
        row.breaches = check_cell(row.cell, row.metrics, limits)
        decoder_breached = bool(row.breaches)
        if has_encoders and backend in ENCODER_BACKENDS:
            job.progress(f"{row.cell}: encoders")
            row.encoder_scheme = manifest["encoders"]["quantization"]["scheme"]
            row.encoders = encoder_entries(session.encoders,
                                           encoder_references[ref_key], golden_media_inputs(bundle, manifest))
            row.breaches += check_encoders(row.cell, row.encoders, limits)
        row.status = "fail" if row.breaches else "pass"
        # Localisation follows the decoder's graph: an encoder past its limit is named by its own row.
        wanted = job.localise == "always" or (job.localise == "breach" and decoder_breached)
        if wanted and backend not in DEBUGGABLE:
            row.reason = f"not localised: no debug export for {backend} yet"
        elif wanted:
            if lookups is None:  # litertlm: the same .litertlm's lookups, run by ai_edge_litert
                session = open_bundle(bundle, "litert", job.threads)
                executor, per_layer_rows = session.executor, session.per_layer_rows
                lookups = lookup_errors(executor, per_layer_rows, reference, prompt_ids + ref_tokens[:-1], media_rows)
            job.progress(f"{row.cell}: localising (debug export)")
            row.localisation = localise_bundle(job, bundle, manifest, backend, reference, prompt_ids, ref_tokens,
                                               limits, lookups, debug_cache, media_rows)
    rows = sorted(rows + job.skipped, key=_row_order)
    breaches = [str(b) for row in rows for b in row.breaches]
    return {
        "schema": SCHEMA,
        "model": job.source or (str(Path(job.bundles[0]).resolve().parent / "reference") if job.bundles else ""),
        "inputs": inputs,
        "thresholds": {"file": job.thresholds["path"], "comment": job.thresholds["comment"]},
        "components": component_status(planned, rows),
        "rows": [row.as_dict() for row in rows],
        "breaches": breaches,
        "passed": not breaches,
        "notes": encoder_notes(planned),
        "seconds": round(time.perf_counter() - job.started, 1),
    }


def encoder_notes(planned) -> list[str]:
    """Lines for the report on bundles without encoders beside bundles of the same target with them (g3n compare
    builds each encoder lowering once: encoder_builds)."""
    from runtime_py.bundle import ENCODER_QUANT_LEVELS, TARGETS

    bundles = {str(bundle): manifest for bundle, manifest, _ in planned}
    with_encoders = [m for m in bundles.values() if m.get("encoders")]
    notes = []
    for manifest in bundles.values():
        target, level = manifest["target"], manifest["quantization"]["level"]
        if manifest.get("encoders") or not any(m["target"] == target for m in with_encoders):
            continue
        note = f"The {level} {target} bundle carries no encoders"
        scheme = ENCODER_QUANT_LEVELS.get(level, {}).get(TARGETS.get(target))
        twin = next((m["quantization"]["level"] for m in with_encoders if m["target"] == target
                     and m["encoders"]["quantization"]["scheme"] == scheme), None)
        if twin:
            note += f": its encoders would be {scheme}, as in the {twin} bundle, whose rows compare them"
        notes.append(note + ".")
    return notes


def component_status(planned, rows: list[Row]) -> dict[str, str]:
    """Per component: "compared", or why not (no compared bundle carries it, or only rows that did not run do)."""
    carried = {ENCODER_COMPONENTS[c] for _, manifest, _ in planned
               for c in (manifest.get("encoders") or {}).get("components", [])}
    compared = {entry["component"] for row in rows for entry in row.encoders}
    status = {}
    for name in COMPONENTS:
        if name not in ENCODER_COMPONENTS.values() or name in compared:
            status[name] = "compared"
        else:
            status[name] = "in bundle, not run here (its rows were skipped)" if name in carried else NOT_IN_BUNDLE
    return status


# --- building bundles to compare (g3n compare without --bundle) ---------------------------------------------------------

# The vision encoder's sizes in the bundles g3n compare builds: the default size, at which the int8 encoders' bar
# (cosine >= 0.99) is set. Each further size is another lowering per bundle, and `make compare` has ~10 minutes.
COMPARE_IMAGE_SIZES = (768,)
# Longest lowering first, so that parallel builds end together: ExecuTorch's quantized lowerings take the longest.
_BUILD_COST = {("executorch", "int8"): 0, ("executorch", "int4"): 1, ("executorch", "none"): 2}


def build_for_comparison(checkpoint: Path | None, out: Path, builds: list[tuple[str, str]], tokenizer: Path | None,
                         cache_len: int, prefill_lengths: tuple[int, ...], source: str, jobs: int = 1,
                         progress=lambda message: None, image_sizes: tuple[int, ...] = COMPARE_IMAGE_SIZES) -> list[Path]:
    """One bundle per (quant level, target) under out/<level>-<target>/, each with its float reference beside it;
    returns the target folders in the order of `builds`. jobs > 1 builds in that many processes at once: conversion
    is mostly single-threaded Python, so on 2 cores two builds take about the time of one. image_sizes: the vision
    encoder's sizes in bundles of a whole model."""
    order = sorted(builds, key=lambda b: _BUILD_COST.get((b[1], b[0]), 3))
    encoders = encoder_builds(builds)
    args = [(checkpoint, out / f"{level}-{target}", target, level, tokenizer, cache_len, prefill_lengths, source,
             tuple(image_sizes), encoders[(level, target)]) for level, target in order]
    if jobs <= 1:
        for a in args:
            progress(f"building the {a[3]} {a[2]} bundle")
            _build_one(*a)
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        progress(f"building {len(args)} bundles, {jobs} at a time")
        # spawn, not fork: a forked child of a process whose torch thread pools already ran can deadlock.
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            for future in [pool.submit(_build_one, *a) for a in args]:
                future.result()
    return [out / f"{level}-{target}" / target for level, target in builds]


def encoder_builds(builds: list[tuple[str, str]]) -> dict[tuple[str, str], bool]:
    """Per (quant level, target): whether its bundle carries the encoders. A level whose encoders take the scheme of
    an earlier level of the same target (int4's are int8's: runtime_py.bundle.ENCODER_QUANT_LEVELS) is built without
    them: the same lowering would be compared twice, at minutes of conversion each."""
    from runtime_py.bundle import ENCODER_QUANT_LEVELS, TARGETS

    seen, out = set(), {}
    for level, target in builds:
        key = (target, ENCODER_QUANT_LEVELS[level][TARGETS[target]])
        out[(level, target)] = key not in seen
        seen.add(key)
    return out


def _build_one(checkpoint, out, target, level, tokenizer, cache_len, prefill_lengths, source, image_sizes,
               encoders: bool = True) -> None:
    import torch

    from runtime_py.bundle import build_bundles
    from models.checkpoint import load_pretrained
    from models.default import default_gemma3n

    # The whole model where there is one (the default; a Gemma3nForConditionalGeneration checkpoint): its bundles
    # carry the encoders, and the report compares them too.
    model = default_gemma3n() if checkpoint is None else load_pretrained(checkpoint, dtype=torch.float32)
    if not encoders:
        model = getattr(model, "language_model", model)
    build_bundles(model, out, [target], level, tokenizer, cache_len, prefill_lengths, {"name": source},
                  image_sizes=tuple(image_sizes))


def _row_order(row: Row) -> tuple:
    from runtime_py.bundle import QUANT_LEVELS

    backends = [b for bs in TARGET_BACKENDS.values() for b in bs]
    levels = list(QUANT_LEVELS)
    return (backends.index(row.backend), levels.index(row.quant) if row.quant in levels else len(levels), row.quant)


def renamed_paths(obj, old: str, new: str):
    """The report with every path under `old` (the report's temporary folder) moved under `new`."""
    if isinstance(obj, dict):
        return {k: renamed_paths(v, old, new) for k, v in obj.items()}
    if isinstance(obj, list):
        return [renamed_paths(v, old, new) for v in obj]
    if isinstance(obj, str) and obj.startswith(old):
        return new + obj[len(old):]
    return obj


def localise_bundle(job: Comparison, bundle: Path, manifest: dict, backend: str, reference: FloatReference,
                    prompt_ids, ref_tokens, limits, lookups, cache: dict, media_rows=None) -> dict:
    """Builds (once per bundle target and spec) the debug export of the bundle's own spec from its reference model,
    runs it, and names the first divergent stage."""
    import tempfile

    from runtime_py.compare.debug_export import export_debug, open_debug
    from exporters.spec import ExportSpec

    spec_dict = dict(manifest["export_spec"])
    spec_dict["prefill_lengths"] = tuple(spec_dict["prefill_lengths"])
    spec_dict["components"] = ("decoder",)  # the debug export follows the decoder's graph only
    spec = ExportSpec(**spec_dict)
    key = json.dumps(manifest["export_spec"], sort_keys=True)
    if key not in cache:
        folder = (Path(job.debug_dir) / f"{spec.target}-{manifest['quantization']['level']}" if job.debug_dir
                  else Path(tempfile.mkdtemp(prefix="g3n-debug-")))
        path = export_debug(reference.model, spec, folder)
        cache[key] = (path, open_debug(path, reference.model, spec, job.threads))
    path, debug_executor = cache[key]
    result = localise(reference, debug_executor, prompt_ids, job.steps, ref_tokens[:-1], limits, lookups, media_rows)
    result["debug_export"] = str(path)
    return result


def litertlm_greedy(bundle: Path, manifest: dict, tokenizer, prompt: str, ref_tokens: list[int], stop_ids,
                    threads: int) -> dict:
    """Google's engine generates greedily from the same prompt; its text is matched against the float model's greedy
    tokens, detokenized, up to the first stop token (where the engine stops too)."""
    from runtime_py.engine import open_bundle

    stops = set(stop_ids)
    expected = []
    for token in ref_tokens:
        if token in stops:
            break
        expected.append(token)
    session = open_bundle(bundle, "litertlm", threads)
    text = "".join(session.generate(prompt, max_new_tokens=len(ref_tokens)))
    agree = 0
    for k in range(1, len(expected) + 1):
        if not text.startswith(tokenizer.decode(expected[:k])):
            break
        agree = k
    total = max(len(expected), 1)
    return {"greedy": agree / total if expected else float(text == ""), "greedy_count": f"{agree}/{len(expected)}",
            "text": text}


# --- thresholds from a measurement --------------------------------------------------------------------------------

MARGIN = 2.0
CALIBRATION_COMMENT = (
    "Limits of `g3n compare` per cell (backend/quant level), component and metric, and per localisation stage "
    "(relative error of token_embedding, per_layer_embedding, layer_<i>, logits). Chosen as measured value times a "
    "margin (written by g3n compare --write-thresholds): errors (max_abs, mean_abs, kl, stage relative errors) may grow "
    "2x, with floors (1e-4 logit, 1e-5 mean, 1e-6 KL, 1e-3 stage) where float paths measured ~1e-6 and other CPUs round "
    "differently; agreements may lose 2x what they lost (1 - cosine; the disagreeing positions of top1 and greedy), and "
    "at least one position. Encoder components (vision_encoder, audio_encoder: embeddings of the golden media, the "
    "vision limits holding at every image size) take the same margins from their worst input; the cosine limit of a "
    "quantized cell's encoders is never below 0.99 (the int8 encoders' bar). `measured` keeps the values each cell's "
    "limits came from.")
FLOORS = {"max_abs": 1e-4, "mean_abs": 1e-5, "kl": 1e-6, "cosine": 1e-6, "stage": 1e-3}


def thresholds_from_report(report: dict, comment: str, margin: float = MARGIN) -> dict:
    """Limits = measured value times a margin: errors (max_abs, mean_abs, kl, stage relative errors) may grow
    `margin`-fold, with a floor for exact float paths that other CPUs round differently; agreements may lose
    `margin` times what they lost (1 - cosine, the disagreeing fraction of top1 and greedy), and at least one
    position. Encoders: the same from their worst input, and a cosine limit of at least QUANTIZED_ENCODER_COSINE in
    quantized cells."""
    cells = {}
    positions = report["inputs"]["decode_steps"] + 1 if report.get("inputs") else 1
    for row in report["rows"]:
        if row["status"] == "skipped":
            continue
        limits, measured = {}, {}
        for component, metrics in row["metrics"].items():
            limits[component] = {}
            for metric, value in metrics.items():
                if metric not in METRICS:
                    continue
                measured.setdefault(component, {})[metric] = value
                if METRICS[metric] == "max":
                    limit = _round_up(max(value * margin, FLOORS[metric]))
                else:
                    step = 1.0 / (positions - 1 if component == "decoder.decode" and metric == "top1" else positions)
                    floor = FLOORS["cosine"] if metric == "cosine" else step
                    limit = _cosine_limit(value, margin, floor)
                limits[component][metric] = limit
        for component, worst in worst_encoder_metrics(row.get("encoders", [])).items():
            measured[component] = worst
            limits[component] = {"max_abs": _round_up(max(worst["max_abs"] * margin, FLOORS["max_abs"])),
                                 "mean_abs": _round_up(max(worst["mean_abs"] * margin, FLOORS["mean_abs"])),
                                 "cosine": _cosine_limit(worst["cosine"], margin)}
            if row["quant"] != "none":
                limits[component]["cosine"] = max(limits[component]["cosine"], QUANTIZED_ENCODER_COSINE)
        if row.get("localisation"):
            limits[STAGES_KEY] = {s["stage"]: _round_up(max(s["relative_error"] * margin, FLOORS["stage"]))
                                  for s in row["localisation"]["stages"]}
        limits["measured"] = measured
        cells[row["cell"]] = limits
    return {"comment": comment, "margin": margin, "cells": cells}


def worst_encoder_metrics(entries: list[dict]) -> dict[str, dict[str, float]]:
    """Per encoder component, the worst of each metric over its inputs (the vision encoder's image sizes)."""
    worst: dict[str, dict[str, float]] = {}
    for entry in entries:
        w = worst.setdefault(entry["component"], {})
        for metric in ENCODER_METRICS:
            value = entry["metrics"][metric]
            w[metric] = value if metric not in w else (max if METRICS[metric] == "max" else min)(w[metric], value)
    return worst


def _cosine_limit(value: float, margin: float, floor: float = FLOORS["cosine"]) -> float:
    """A lower limit that lets an agreement lose `margin` times what it lost (at least `floor`)."""
    return max(float(f"{1.0 - _round_up(max((1.0 - value) * margin, floor)):.12g}"), 0.0)


def _round_up(x: float, digits: int = 2) -> float:
    """x rounded up to `digits` significant digits, so that a limit never falls below what it was derived from."""
    if x <= 0 or not math.isfinite(x):
        return x
    scale = 10.0 ** (math.floor(math.log10(x)) - digits + 1)
    return float(f"{math.ceil(x / scale - 1e-9) * scale:.{digits}g}")


# --- the report ---------------------------------------------------------------------------------------------------

_COLUMNS = [  # (header, component, metric, format)
    ("prefill max abs", "decoder.prefill", "max_abs", "{:.3g}"),
    ("prefill mean abs", "decoder.prefill", "mean_abs", "{:.3g}"),
    ("prefill cos", "decoder.prefill", "cosine", "{:.6f}"),
    ("prefill KL", "decoder.prefill", "kl", "{:.2g}"),
    ("prefill top-1", "decoder.prefill", "top1", "{:.0f}"),
    ("decode max abs", "decoder.decode", "max_abs", "{:.3g}"),
    ("decode mean abs", "decoder.decode", "mean_abs", "{:.3g}"),
    ("decode min cos", "decoder.decode", "cosine", "{:.6f}"),
    ("decode max KL", "decoder.decode", "kl", "{:.2g}"),
    ("decode top-1", "decoder.decode", "top1_count", "{}"),
    ("greedy tokens", "decoder.decode", "greedy_count", "{}"),
]


def _result(row: dict) -> str:
    if row["status"] == "skipped":
        return row["reason"]
    text = "pass" if row["status"] == "pass" else "FAIL: " + "; ".join(b.split(" ", 1)[1] for b in row["breaches"])
    if row["reason"]:
        text += f"; {row['reason']}"
    first = (row.get("localisation") or {}).get("first_divergent")
    if row.get("localisation"):
        text += f"; first divergent stage: {first['stage']} ({first['relative_error']:.3g} > {first['limit']:.3g})" \
            if first else "; no stage past its limit"
    return text


def markdown(report: dict) -> str:
    inputs = report.get("inputs") or {}
    lines = [f"# g3n compare: {report['model']}", ""]
    if inputs:
        lines += [f"Prompt: {len(inputs['prompt_ids'])} tokens ({inputs['prompt']!r} as a chat turn); "
                  f"{inputs['decode_steps']} teacher-forced decode steps. Every metric is against the float PyTorch "
                  f"model on the same inputs; limits from {report['thresholds']['file']}.", ""]
    header = ["backend", "quant", "scheme"] + [c[0] for c in _COLUMNS] + ["result"]
    lines += ["| " + " | ".join(header) + " |", "| " + " | ".join(["---"] * 3 + ["---:"] * len(_COLUMNS) + ["---"]) + " |"]
    for row in report["rows"]:
        cells = [row["backend"], row["quant"], row["scheme"] or "-"]
        for _, component, metric, fmt in _COLUMNS:
            value = row["metrics"].get(component, {}).get(metric)
            cells.append("-" if value is None else fmt.format(value))
        cells.append(_result(row))
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines += encoder_markdown(report)
    lines += report.get("notes", [])
    not_compared = [f"{name} ({status})" for name, status in report["components"].items() if status != "compared"]
    if not_compared:
        lines.append(f"Not compared: {', '.join(not_compared)}.")
    if any(row["backend"] == "litertlm" for row in report["rows"]):
        lines.append(LITERTLM_NOTE)
    localised = [row for row in report["rows"] if row.get("localisation")]
    for row in localised:
        lines += ["", f"Stages of {row['cell']} (relative error of each stage against the float model; debug export "
                      f"{row['localisation']['debug_export']}):", "",
                  "| stage | relative error | limit |", "| --- | ---: | ---: |"]
        for stage in row["localisation"]["stages"]:
            mark = " **past limit**" if not stage["relative_error"] <= stage["limit"] else ""
            lines.append(f"| {stage['stage']} | {stage['relative_error']:.3g}{mark} | {stage['limit']:.3g} |")
    lines += ["", "Result: " + ("pass" if report["passed"] else "FAIL: " + "; ".join(report["breaches"])),
              f"({report['seconds']:.0f} s; the plot of error per decode step is plot.png)"]
    return "\n".join(lines) + "\n"


def encoder_markdown(report: dict) -> list[str]:
    """The encoder rows as a table of their own (one line per backend, quantization, encoder and input)."""
    lines = []
    for row in report["rows"]:
        for entry in row.get("encoders", []):
            if not lines:
                lines += ["Encoders: the bundle's golden media (golden_media.safetensors) through each backend's encoder "
                          "and adapter, against the float PyTorch encoders of the reference model (embeddings [1, N, H]; "
                          "cosine of the whole output).", "",
                          "| backend | quant | encoder scheme | encoder | input | max abs | mean abs | cosine | result |",
                          "| --- | --- | --- | --- | --- | ---: | ---: | ---: | --- |"]
            m = entry["metrics"]
            result = "pass" if not entry["breaches"] else "FAIL: " + "; ".join(
                b.split(") ", 1)[-1] for b in entry["breaches"])
            lines.append(f"| {row['backend']} | {row['quant']} | {row['encoder_scheme'] or '-'} | {entry['component']} | "
                         f"{entry['input']} | {m['max_abs']:.3g} | {m['mean_abs']:.3g} | {m['cosine']:.6f} | {result} |")
    if lines:
        lines.append("")
        if any(row["backend"] == "litertlm" for row in report["rows"]):
            lines += ["litertlm runs the same .litertlm encoder sections as litert (and returns text only): the litert "
                      "rows stand for its encoders.", ""]
    return lines


def write_report(report: dict, folder: Path) -> None:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (folder / "report.md").write_text(markdown(report))
    plot_errors(report, folder / "plot.png")


# --- the plot (PIL: matplotlib is not a dependency) ------------------------------------------------------------------

_PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
            (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def plot_errors(report: dict, path: Path, size=(960, 560)) -> None:
    """Max |logit error| per position (0: prefill, 1..N: decode steps), one line per backend/quant, log scale."""
    from PIL import Image, ImageDraw, ImageFont

    series = [(row["cell"], row["per_step_max_abs"]) for row in report["rows"] if row["per_step_max_abs"]]
    W, H = size
    left, right, top, bottom = 80, 230, 40, 60
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=13)
    draw.text((left, 12), "max |logit error| vs the float PyTorch model, per position (0 = prefill)", fill="black",
              font=font)
    values = [v for _, s in series for v in s if v > 0]
    lo = math.floor(math.log10(min(values))) if values else -7
    hi = math.ceil(math.log10(max(values))) if values else 1
    hi = max(hi, lo + 1)
    positions = max((len(s) for _, s in series), default=1)
    x0, x1, y0, y1 = left, W - right, H - bottom, top

    def x_of(i):
        return x0 + (x1 - x0) * (i / max(positions - 1, 1))

    def y_of(v):
        v = max(v, 10.0 ** lo)
        return y0 - (y0 - y1) * (math.log10(v) - lo) / (hi - lo)

    draw.rectangle([x0, y1, x1, y0], outline="black")
    for e in range(lo, hi + 1):
        y = y_of(10.0**e)
        draw.line([x0, y, x1, y], fill=(225, 225, 225))
        draw.text((8, y - 7), f"1e{e}", fill="black", font=font)
    for i in range(positions):
        x = x_of(i)
        draw.line([x, y0, x, y0 + 4], fill="black")
        if positions <= 20 or i % 2 == 0:
            draw.text((x - 4, y0 + 8), str(i), fill="black", font=font)
    draw.text(((x0 + x1) / 2 - 30, H - 24), "position", fill="black", font=font)
    for n, (cell, s) in enumerate(series):
        color = _PALETTE[n % len(_PALETTE)]
        points = [(x_of(i), y_of(v)) for i, v in enumerate(s)]
        if len(points) > 1:  # earlier lines wider, so that a line drawn over an equal one leaves it visible
            draw.line(points, fill=color, width=2 + min(len(series) - 1 - n, 4))
        for x, y in points:
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=color)
        ly = y1 + 20 * n
        draw.line([x1 + 15, ly + 7, x1 + 40, ly + 7], fill=color, width=3)
        draw.text((x1 + 48, ly), cell, fill="black", font=font)
    if not series:
        draw.text((x0 + 20, (y0 + y1) / 2), "no backend returned logits", fill="black", font=font)
    image.save(path, format="PNG")
