"""The bench's report: bench.json (every row and the raw medians), bench.md (printed) and bench.png (each row's
ratio against its goal); and the real-scale scripts' tables."""

from __future__ import annotations

import json
import math
from pathlib import Path


def _value(v, unit: str) -> str:
    if v is None:
        return ""
    if unit == "bytes":
        return f"{v / 1e6:,.3g} MB"
    if unit == "share":
        return f"{100 * v:.2f}%"
    return f"{v:,.4g} {unit}" if v < 1e4 else f"{v:,.0f} {unit}"


def markdown(result: dict) -> str:
    lines = [f"g3n bench, {result['date']}: {result['model']}; {result['machine']}; {result['threads']} threads; "
             f"median of {result['repeats']} interleaved rounds after a warm-up; prefill {result['prefill_tokens']}, "
             f"decode {result['decode_tokens']}, cache {result['cache']} ({result['seconds']} s in all)", "",
             "| row | case | measure | ours | reference | ratio | goal | met | note |",
             "|---|---|---|---:|---:|---:|---|---|---|"]
    for r in result["rows"]:
        ratio = "" if r["ratio"] is None else (f"{100 * r['ratio']:.2f}%" if r["unit"] == "share" or
                                               r["row"] == "roofline" else f"{r['ratio']:.2f}x")
        goal = "" if r["goal"] is None else (">= " if r["higher_is_better"] else "<= ") + (
            f"{100 * r['goal']:g}%" if r["row"] in ("roofline", "ple") else f"{r['goal']:g}x")
        met = "" if r["met"] is None else ("yes" if r["met"] else "**no**")
        ours, reference = _value(r["ours"], r["unit"]), _value(r["reference"], r["unit"])
        lines.append(f"| {r['row']} | {r['case']} | {r['measure']} | {r['contender']}: {ours} | {r['against']}: "
                     f"{reference} | {ratio} | {goal} | {met} | {r['note']} |")
    return "\n".join(lines) + "\n"


def write_table(rows: list[dict], stem: Path) -> None:
    """The real-scale scripts' tables (ci/real_checkpoints.py, ci/real_scale.py): rows as <stem>.json and as a
    Markdown table in <stem>.md (a column per key, in first-seen order; integers with thousands separators), which is
    also printed."""
    stem.with_suffix(".json").write_text(json.dumps(rows, indent=2) + "\n")
    keys = list(dict.fromkeys(k for r in rows for k in r))
    md = "| " + " | ".join(keys) + " |\n|" + "---|" * len(keys) + "\n"
    md += "".join("| " + " | ".join(f"{r[k]:,}" if type(r.get(k)) is int else str(r.get(k, "")) for k in keys)
                  + " |\n" for r in rows)
    stem.with_suffix(".md").write_text(md)
    print(md, end="")


def write(result: dict, folder: Path) -> str:
    (folder / "bench.json").write_text(json.dumps(result, indent=2) + "\n")
    md = markdown(result)
    (folder / "bench.md").write_text(md)
    plot(result, folder / "bench.png")
    return md


def plot(result: dict, path: Path) -> None:
    """One bar per row with a goal: how far its ratio is from the goal (ratio / goal, inverted where lower is
    better), log scale, the goal at 1; green where met."""
    from PIL import Image, ImageDraw, ImageFont

    bars = [(f"{r['row']}: {r['case']} ({r['measure']})", (r["ratio"] / r["goal"]) if r["higher_is_better"]
             else (r["goal"] / r["ratio"]) if r["ratio"] else 1e-3, r["met"]) for r in result["rows"]
            if r["goal"] is not None and r["ratio"] is not None]
    row_h, left, right, top = 20, 430, 90, 40
    width, height = 1100, top + row_h * max(len(bars), 1) + 50
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=12)
    draw.text((12, 10), f"g3n bench {result['date']}: ratio / goal (log scale; right of the line: goal met)",
              fill="black", font=font)
    values = [v for _, v, _ in bars if v > 0] or [1.0]
    lo = min(math.floor(math.log10(min(values))), -1)
    hi = max(math.ceil(math.log10(max(values))), 1)
    x0, x1 = left, width - right

    def x_of(v):
        return x0 + (x1 - x0) * (math.log10(max(v, 10.0**lo)) - lo) / (hi - lo)

    bottom = top + row_h * len(bars)
    for e in range(lo, hi + 1):
        draw.line([x_of(10.0**e), top, x_of(10.0**e), bottom], fill=(225, 225, 225))
        draw.text((x_of(10.0**e) - 10, bottom + 6), f"{10.0**e:g}", fill="black", font=font)
    for i, (label, value, met) in enumerate(bars):
        y = top + row_h * i
        draw.text((12, y + 4), label[:70], fill="black", font=font)
        draw.rectangle([x_of(10.0**lo), y + 4, x_of(value), y + row_h - 4],
                       fill=(44, 160, 44) if met else (214, 39, 40))
        draw.text((x_of(value) + 4, y + 4), f"{value:.2f}", fill="black", font=font)
    draw.line([x_of(1.0), top, x_of(1.0), bottom], fill="black", width=2)
    image.save(path, format="PNG")
