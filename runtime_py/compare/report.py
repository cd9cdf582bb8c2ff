"""The report: report.json, report.md (the tables) and plot.png (PIL: matplotlib is not a dependency)."""

from __future__ import annotations

import json
import math
from pathlib import Path

LITERTLM_NOTE = ("litertlm is Google's LiteRT-LM engine, which returns text only: for it greedy-token agreement alone is "
                 "measured (its greedy text against the float model's detokenized greedy tokens).")


def renamed_paths(obj, old: str, new: str):
    """The report with every path under `old` (the report's temporary folder) moved under `new`."""
    if isinstance(obj, dict):
        return {k: renamed_paths(v, old, new) for k, v in obj.items()}
    if isinstance(obj, list):
        return [renamed_paths(v, old, new) for v in obj]
    if isinstance(obj, str) and obj.startswith(old):
        return new + obj[len(old):]
    return obj


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
