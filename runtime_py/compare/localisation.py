"""Localisation: the first divergent stage (token embedding, PLE rows, each decoder layer, the logits) of a row past
its limits, from a debug export of the bundle's spec (runtime_py.compare.debug_export)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from runtime_py.compare.metrics import relative_error
from runtime_py.compare.thresholds import stage_limit
from runtime_py.compare.trace import (
    FloatReference,
    Trace,
    embed_as_whole_model,
    run_trace,
)


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
            "per_layer_embedding": relative_error(rows, reference.per_layer_rows(arr))}


def localise_bundle(job, bundle: Path, manifest: dict, backend: str, reference: FloatReference,
                    prompt_ids, ref_tokens, limits, lookups, cache: dict, media_rows=None) -> dict:
    """Builds (once per bundle target and spec) the debug export of the bundle's own spec from its reference model,
    runs it, and names the first divergent stage."""
    import tempfile

    from exporters.spec import ExportSpec
    from runtime_py.bundle import output_to
    from runtime_py.compare.debug_export import export_debug, open_debug

    spec_dict = dict(manifest["export_spec"])
    spec_dict["prefill_lengths"] = tuple(spec_dict["prefill_lengths"])
    spec_dict["components"] = ("decoder",)  # the debug export follows the decoder's graph only
    spec = ExportSpec(**spec_dict)
    key = json.dumps(manifest["export_spec"], sort_keys=True)
    if key not in cache:
        folder = (Path(job.debug_dir) / f"{spec.target}-{manifest['quantization']['level']}" if job.debug_dir
                  else Path(tempfile.mkdtemp(prefix="g3n-debug-")))
        # The converters' output goes to a log beside the debug export, as g3n export's does.
        with output_to(folder.parent / f"{folder.name}.log"):
            path = export_debug(reference.model, spec, folder)
        cache[key] = (path, open_debug(path, reference.model, spec, job.threads))
    path, debug_executor = cache[key]
    result = localise(reference, debug_executor, prompt_ids, job.steps, ref_tokens[:-1], limits, lookups, media_rows)
    result["debug_export"] = str(path)
    return result
