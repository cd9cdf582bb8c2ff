"""Numerics of a run against the bundle's golden vectors (golden.safetensors: the float model's logits for the golden
chat prompt, its last prefill position and 8 greedy decode steps).

A backend is run on the golden prompt with the session's prefill schedule, then fed the golden greedy tokens (teacher
forcing), so every position sees the inputs the golden logits came from. Metrics are g3n compare's
(runtime_py.compare: max abs, mean abs, cosine, KL, top-1, greedy) plus the relative error ||got - golden|| /
||golden|| per position (the largest). Pass/fail uses the compare issue's limits (ci/thresholds.json, cell
`<backend>/<quant level>`) when that file has the cell, and otherwise the harness's own limits below, and the record
says which.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from runtime_py import compare

# The harness's own limits, used for a cell ci/thresholds.json does not have (the torch backend, which g3n compare
# does not list, or any cell while that file is absent), by cell and else by quantization level. The torch backend
# runs the float reference checkpoint: it meets the golden logits to ~3e-6 (logits up to ~4 on the default model), so
# 1e-4 leaves room for other CPUs' rounding. Every bundle target stores the PLE table as int8 rows by default, which
# alone moves float bundles' logits by ~5e-3..7.5e-3 (max abs; relative 2.6e-3, cosine 1 - 3.4e-6) on the default
# model, so `none` allows ~2.5x that. Quantized levels are held to what the README measures for them (int8: 0.41 max
# abs, int4: 2.6) with a 2-3x margin. `greedy`: the fraction of the golden greedy tokens reproduced.
HARNESS_LIMITS = {
    "torch/none": {"decoder.prefill": {"max_abs": 1e-4, "relative": 1e-4, "cosine": 0.999999},
                   "decoder.decode": {"max_abs": 1e-4, "relative": 1e-4, "cosine": 0.999999, "greedy": 1.0}},
    "none": {"decoder.prefill": {"max_abs": 0.02, "relative": 6e-3, "cosine": 0.9999},
             "decoder.decode": {"max_abs": 0.02, "relative": 6e-3, "cosine": 0.9999, "greedy": 1.0}},
    "int8": {"decoder.prefill": {"max_abs": 1.5, "relative": 0.5, "cosine": 0.9},
             "decoder.decode": {"max_abs": 1.5, "relative": 0.5, "cosine": 0.9}},
    "int4": {"decoder.prefill": {"max_abs": 6.0, "relative": 1.5, "cosine": 0.5},
             "decoder.decode": {"max_abs": 6.0, "relative": 1.5, "cosine": 0.5}},
}
HARNESS_LIMITS_SOURCE = "runtime_py/harness/numerics.py HARNESS_LIMITS"


def load_golden(bundle: Path, manifest: dict) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(Path(bundle) / manifest["golden"]["file"]))


def golden_logits(golden: dict) -> np.ndarray:
    """[N + 1, V]: the prefill's last position, then the N decode steps."""
    return np.concatenate([golden["prefill_logits"][None], golden["decode_logits"]]).astype(np.float32)


def teacher_forced_logits(session, golden: dict) -> np.ndarray:
    """The session's backend's logits at the golden positions: golden prompt, then the golden greedy tokens fed one
    by one. A whole model's session embeds the media vocabularies' ids as the bundle's media rows, as the golden
    vectors were computed (the golden chat prompt holds such ids: the tiny vocabulary shares them with text)."""
    prompt = [int(i) for i in golden["prompt_ids"]]
    tokens = [int(t) for t in golden["greedy_tokens"]]
    steps = len(golden["decode_logits"])
    trace, _ = compare.run_trace(session.executor, session.per_layer_rows, prompt, steps, tokens[:steps],
                                 media_rows=session.media_rows)
    return trace.logits


def logit_metrics(reference: np.ndarray, got: np.ndarray) -> dict[str, dict]:
    """compare.decoder_metrics plus the largest per-position relative error, for decoder.prefill/decoder.decode."""
    metrics = compare.decoder_metrics(reference, got)
    relative = [compare.relative_error(g, r) for g, r in zip(got, reference)]
    metrics["decoder.prefill"]["relative"] = relative[0]
    metrics["decoder.decode"]["relative"] = max(relative[1:]) if len(relative) > 1 else None
    return metrics


def position_metrics(reference: np.ndarray, got: np.ndarray) -> dict:
    """The decoder.prefill metrics of one position's logits [V] (a device's prefill chunk)."""
    per = compare.position_metrics(reference[None], got[None])
    return {**{k: float(v[0]) for k, v in per.items()}, "relative": compare.relative_error(got, reference)}


def limits_for(backend: str, quant: str, thresholds_path: Path | None = None,
               manifest: dict | None = None) -> tuple[dict, str]:
    """(limits {component: {metric: limit}}, where they come from) for the cell <backend>/<quant>. Without a
    thresholds file, the bundle's (manifest): g3n compare's limits for its model's size (compare.default_thresholds)."""
    if thresholds_path:
        path = Path(thresholds_path)
    else:
        path = compare.default_thresholds([manifest]) if manifest else compare.DEFAULT_THRESHOLDS
    cell = f"{backend}/{quant}"
    if path.is_file():
        cells = compare.load_thresholds(path)["cells"]
        if cell in cells:
            limits = {k: v for k, v in cells[cell].items() if k in compare.COMPONENTS}
            return limits, f"{path} (cell {cell})"
        why = f"{path} has no cell {cell}"
    else:
        why = f"{path} does not exist"
    key = cell if cell in HARNESS_LIMITS else quant
    return HARNESS_LIMITS.get(key, {}), f"{HARNESS_LIMITS_SOURCE}[{key!r}] ({why})"


def check(metrics: dict[str, dict], limits: dict) -> list[str]:
    """Every limit a metric is past, as 'component metric = value > limit' lines (a NaN is always past): g3n
    compare's check, whichever file the limits came from."""
    return [breach.detail for breach in compare.check_cell("", metrics, limits)]


def numerics_entry(metrics: dict, backend: str, quant: str, thresholds_path: Path | None = None,
                   note: str = "", manifest: dict | None = None) -> dict:
    limits, source = limits_for(backend, quant, thresholds_path, manifest)
    breaches = check(metrics, limits)
    return {"reference": "golden.safetensors (float model: last prefill position + 8 teacher-forced decode steps)",
            "metrics": metrics, "limits": limits, "limits_source": source, "breaches": breaches,
            "passed": not breaches, "note": note}
