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

The package: metrics, trace (inputs, traces, references), thresholds, localisation, build (bundles to compare),
report (tables and plot); this module runs the rows. Its names are the package's public ones.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from contract.bundle import TARGET_BACKENDS
from models.errors import InputError
from runtime_py.compare.build import build_for_comparison
from runtime_py.compare.localisation import localise, localise_bundle, lookup_errors
from runtime_py.compare.metrics import (
    decoder_metrics,
    embedding_metrics,
    leading_agreement,
    position_metrics,
    relative_error,
)
from runtime_py.compare.report import (
    LITERTLM_NOTE,
    markdown,
    renamed_paths,
    write_report,
)
from runtime_py.compare.thresholds import (
    CALIBRATION_COMMENT,
    COMPONENTS,
    METRICS,
    check_cell,
    check_encoders,
    load_thresholds,
    thresholds_from_report,
)
from runtime_py.compare.trace import (
    EncoderReference,
    FloatReference,
    encoder_entries,
    golden_media_inputs,
    litertlm_greedy,
    prompt_ids_for,
    run_trace,
)

__all__ = [  # the package's public names, for the CLI, the harness and the tests
    "CALIBRATION_COMMENT", "COMPONENTS", "Comparison", "DEFAULT_THRESHOLDS", "LITERTLM_NOTE", "METRICS",
    "REAL_SCALE_PARAMETERS", "REAL_SCALE_THRESHOLDS", "Row", "TARGET_BACKENDS", "build_for_comparison", "check_cell",
    "check_cells_present", "check_encoders", "decoder_metrics", "default_thresholds", "embedding_metrics",
    "leading_agreement", "load_thresholds", "localise", "markdown", "plan_builds", "position_metrics",
    "relative_error", "renamed_paths", "run_comparison", "run_trace", "skip_reason", "thresholds_from_report",
    "write_report",
]

SCHEMA = "g3n-compare/1"
DEFAULT_THRESHOLDS = Path(__file__).resolve().parents[2] / "ci" / "thresholds.json"
# Bundles of a model of at least this many parameters (the published E2B has 5.4 billion) are held to the limits
# measured at real size: a random real-size model's int4 logits are far from its float ones on every target alike
# (cosine 0.2-0.3), past the tiny model's limits.
REAL_SCALE_PARAMETERS = 10**9
REAL_SCALE_THRESHOLDS = DEFAULT_THRESHOLDS.with_name("thresholds-real.json")


def default_thresholds(manifests: list[dict]) -> Path:
    """The limits file for bundles of these manifests: REAL_SCALE_THRESHOLDS when their models are real-size."""
    real = {m["model"]["parameters"].get("total", 0) >= REAL_SCALE_PARAMETERS for m in manifests}
    if len(real) > 1:
        raise InputError("--bundle: bundles of real-size and small models take different limits "
                         f"({REAL_SCALE_THRESHOLDS.name}, {DEFAULT_THRESHOLDS.name}): compare them apart, or pass "
                         "--thresholds")
    return REAL_SCALE_THRESHOLDS if real == {True} else DEFAULT_THRESHOLDS
DEFAULT_STEPS = 16
ENCODER_COMPONENTS = {"vision": "vision_encoder", "audio": "audio_encoder"}  # manifest name -> component
NOT_IN_BUNDLE = "not in bundle"
# Backends that run a bundle's encoders themselves (litertlm: Google's engine returns text; see the docstring).
ENCODER_BACKENDS = ("litert", "executorch", "coreml", "coreml-mil")
# Backends whose graphs have a debug export (runtime_py.compare.debug_export); litertlm runs the litert graphs.
DEBUGGABLE = ("litert", "litertlm", "executorch")


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
        return ("skipped: needs macOS (coremltools cannot run Core ML models on Linux; the coreml-mil row runs the same "
                "packages)")
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


def plan_builds(targets: list[str], levels: list[str]) -> tuple[list[tuple[str, str]], list[Row]]:
    """The (quant level, target) bundles g3n compare builds, and the skipped rows of the backends that cannot run
    here (nothing is built for them)."""
    from runtime_py.bundle import QUANT_LEVELS, TARGETS

    builds, skipped = [], []
    for level in levels:
        for target in targets:
            reasons = [skip_reason(backend) for backend in TARGET_BACKENDS[target]]
            if all(reasons):  # a bundle is built where one of its backends runs (run_comparison skips the others)
                skipped += [Row(backend, level, QUANT_LEVELS[level][TARGETS[target]], status="skipped", reason=reason)
                            for backend, reason in zip(TARGET_BACKENDS[target], reasons)]
            else:
                builds.append((level, target))
    return builds, skipped


def check_cells_present(cells: list[str], thresholds: dict) -> None:
    missing = [c for c in cells if c not in thresholds["cells"]]
    if missing:
        raise InputError(f"{thresholds['path']}: no limits for cell {missing[0]} (add \"{missing[0]}\" under \"cells\")")


def reference_key(manifest: dict) -> str:
    """Bundles of one reference checkpoint share its float model."""
    return json.dumps(manifest["reference"]["files"], sort_keys=True)


def bundle_inputs(job: Comparison, bundle: Path, manifest: dict):
    """(tokenizer, the prompt's ids, media rows) of a bundle; media rows: a whole model's bundle's rows for the media
    vocabularies (embed_as_whole_model), else None."""
    from runtime_py.components.tokenizer import Tokenizer

    media_rows = None
    if manifest.get("encoders"):
        from runtime_py.components.media import MediaTokenRows

        media_rows = MediaTokenRows.from_file(bundle / manifest["encoders"]["media_token_embeddings"]["file"])
    tokenizer = Tokenizer(bundle / manifest["tokenizer"]["file"])
    return tokenizer, prompt_ids_for(job.prompt, tokenizer, manifest["tokenizer"]["bos_id"]), media_rows


def prepared_references(job: Comparison, planned) -> tuple[dict[str, FloatReference], dict[str, EncoderReference]]:
    """The float references of the planned rows, by reference_key, with every output a row asks of them computed
    before any backend runs: the trace, the lookups of the run's ids, the encoders on the golden media. Unless rows
    may be localised (a debug export needs the model), the models are then dropped, so that a backend never runs
    beside its reference: at E2B the reference alone is 15-19 GB, a backend up to 13 GB."""
    from runtime_py.engine import reference_model
    from runtime_py.executors.base import release_freed_memory

    references: dict[str, FloatReference] = {}
    encoder_references: dict[str, EncoderReference] = {}
    for bundle, manifest, backend in planned:
        if skip_reason(backend):
            continue
        ref_key, has_encoders = reference_key(manifest), bool(manifest.get("encoders"))
        if ref_key not in references or (has_encoders and ref_key not in encoder_references):
            job.progress(f"{bundle}: the float reference")
            # The reference checkpoint, checked against the manifest as the torch backend does; whole (with its
            # encoders) when the bundle carries encoders.
            model = reference_model(bundle, manifest, whole=has_encoders)
            references.setdefault(ref_key, FloatReference(model))
            if hasattr(model, "language_model"):
                encoder_references[ref_key] = EncoderReference(model)
            del model
        reference = references[ref_key]
        _, prompt_ids, _ = bundle_inputs(job, bundle, manifest)
        spec = manifest["export_spec"]
        _, ref_tokens = reference.trace(prompt_ids, job.steps, spec["cache_len"], spec["prefill_lengths"])
        ids = np.asarray(prompt_ids + ref_tokens[:-1], dtype=np.int64)
        reference.embed(ids)
        reference.per_layer_rows(ids)
        if has_encoders and backend in ENCODER_BACKENDS:
            for component, _, _, args in golden_media_inputs(bundle, manifest):
                encoder_references[ref_key].run(component, *args)
    if job.localise == "never":
        for reference in (*references.values(), *encoder_references.values()):
            reference.release()
        release_freed_memory()
    return references, encoder_references


def run_comparison(job: Comparison) -> dict:
    """Runs every row and returns the report (see write_report); rows past their limits are localised."""
    from runtime_py.engine import open_bundle
    from runtime_py.executors.base import release_freed_memory

    planned = planned_cells(job.bundles)
    if job.enforce:
        check_cells_present([f"{backend}/{m['quantization']['level']}" for _, m, backend in planned
                             if not skip_reason(backend)], job.thresholds)
    references, encoder_references = prepared_references(job, planned)
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
        ref_key = reference_key(manifest)
        has_encoders = bool(manifest.get("encoders"))
        reference = references[ref_key]
        tokenizer, prompt_ids, media_rows = bundle_inputs(job, bundle, manifest)
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
        # One backend in memory at a time: the next session would load beside this one (E2B's: up to 14 GB each).
        session = executor = per_layer_rows = None
        release_freed_memory()
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


def _row_order(row: Row) -> tuple:
    from runtime_py.bundle import QUANT_LEVELS

    backends = [b for bs in TARGET_BACKENDS.values() for b in bs]
    levels = list(QUANT_LEVELS)
    return (backends.index(row.backend), levels.index(row.quant) if row.quant in levels else len(levels), row.quant)
