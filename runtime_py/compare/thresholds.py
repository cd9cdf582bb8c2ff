"""Limits per cell (backend/quant), component and metric (ci/thresholds.json): reading them, checking a row against
them, and deriving them from a measurement."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from models.errors import InputError

DEFAULT_STAGE_LIMIT = 1e-3  # relative error of a stage when a cell names no limit for it
STAGES_KEY = "stages"  # the cell's per-stage relative-error limits for localisation
# Which way each metric may drift: an upper limit ("max") for errors, a lower limit ("min") for agreements.
# `relative` (the largest per-position relative logit error) is measured by the harness, not by g3n compare.
METRICS = {"max_abs": "max", "mean_abs": "max", "cosine": "min", "kl": "max", "top1": "min", "greedy": "min",
           "relative": "max"}
# The bar for int8 encoders (MobileNet-V5 is a convnet): derived cosine limits of quantized cells never go
# below it.
QUANTIZED_ENCODER_COSINE = 0.99
ENCODER_METRICS = ("max_abs", "mean_abs", "cosine")
COMPONENTS = {
    "decoder.prefill": "last-position logits of the prompt's prefill",
    "decoder.decode": "logits of the teacher-forced decode steps, and greedy-token agreement",
    "vision_encoder": "image embeddings of the golden image at each of the bundle's image sizes",
    "audio_encoder": "audio embeddings of the golden clip (one 30 s window)",
}


@dataclass
class Breach:
    cell: str
    component: str
    metric: str
    value: float
    limit: float
    where: str = ""  # which input, where a component is measured on several (an encoder's image size)

    @property
    def detail(self) -> str:
        """The breach without its cell: 'component metric = value > limit'."""
        sign = ">" if METRICS[self.metric] == "max" else "<"
        component = f"{self.component} ({self.where})" if self.where else self.component
        return f"{component} {self.metric} = {self.value:.4g} {sign} limit {self.limit:.4g}"

    def __str__(self) -> str:
        return f"{self.cell} {self.detail}"


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
