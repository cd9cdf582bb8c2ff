"""The record as a Markdown table and two PNG plots (PIL: matplotlib is not a dependency), written beside record.json.

    record.json      the result record (record.py)
    report.md        one row per runtime and backend: speed, memory, numerics, pass/fail
    latency.png      decode-step latency per row: every sample, and p50/p90/p99 marks (log scale)
    throughput.png   prefill and decode tokens/s per row (log scale)
"""

from __future__ import annotations

import json
import math
from pathlib import Path

_PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]


def _fmt(value, spec: str = "{:.1f}") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return spec.format(value)


def row_label(result: dict) -> str:
    return f"{result['device']}/{result['runtime']['name'].split(': ')[-1].split(' (')[0]}/{result['quantization']}"


def markdown(record: dict) -> str:
    env = record["environment_info"]
    value = env.get("value", {})
    lines = [f"# g3n harness: {env.get('device_id', env.get('platform'))}", "",
             f"Run {record['meta']['run_id']} at {record['meta']['created_utc']}; device {value.get('model')} "
             f"({value.get('soc')}), {value.get('os_build')}; thermal: {_thermal(value.get('thermal'))}.",
             f"Settings: {record['settings']['iterations']} timed iterations after {record['settings']['warmup']} "
             f"warm-up, {record['settings']['decode_tokens']} decode tokens from the golden prompt, "
             f"threads: {record['settings']['threads']}, backend asked for: {record['settings']['backend']}.", "",
             "| runtime | version | bundle | backend used | fully accelerated | TTFT p50 ms | prefill tok/s | "
             "decode tok/s | decode step p50 / p90 / p99 ms | request p50 ms | peak RSS MB | vision img/s | "
             "audio RTF | max abs err | rel err | min cosine | greedy | numerics |",
             "| --- | --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- | ---: | ---: | ---: "
             "| ---: | --- |"]
    for r in record["results"]:
        name = r["runtime"]["name"]
        bundle = f"{r['bundle_target']} ({r['quantization']})"
        if r["status"] != "ok":
            lines.append(f"| {name} | {r['runtime'].get('version') or '-'} | {bundle} | - | - | - | - | - | - | - | - "
                         f"| - | - | - | - | - | - | {r['status']}: {r.get('reason', '')} |")
            continue
        p, n, b = r["performance"], r["numerics"], r["backend"]
        step = p["latency_ms"]["decode_step"]
        m = n["metrics"]
        pre, dec = m.get("decoder.prefill", {}), m.get("decoder.decode", {})
        max_abs = max([v for v in (pre.get("max_abs"), dec.get("max_abs")) if v is not None], default=None)
        rel = max([v for v in (pre.get("relative"), dec.get("relative")) if v is not None], default=None)
        cos = min([v for v in (pre.get("cosine"), dec.get("cosine")) if v is not None], default=None)
        accel = {True: "yes", False: "no", None: "n/a"}[b.get("fully_accelerated")]
        vision, audio = p.get("vision_encoder_images_per_s", {}), p.get("audio_real_time_factor", {})
        result = "pass" if n["passed"] else "FAIL: " + "; ".join(n["breaches"])
        lines.append(
            f"| {name} | {r['runtime'].get('version') or '-'} | {bundle} | {b.get('used') or '-'} | {accel} | "
            f"{_fmt(p['time_to_first_token_ms']['p50'])} | {_fmt(p['prefill_tokens_per_s'])} | "
            f"{_fmt(p['decode_tokens_per_s'])} | {_fmt(step['p50'], '{:.2f}')} / {_fmt(step['p90'], '{:.2f}')} / "
            f"{_fmt(step['p99'], '{:.2f}')} | {_fmt(p['latency_ms']['request']['p50'])} | "
            f"{_fmt(p['peak_memory_mb']['value'], '{:.0f}')} | {_na(vision)} | {_na(audio)} | "
            f"{_fmt(max_abs, '{:.2e}')} | {_fmt(rel, '{:.2e}')} | {_fmt(cos, '{:.7f}')} | "
            f"{dec.get('greedy_count', '-')} | {result} |")
    lines.append("")
    notes = sorted({n for r in record["results"] if r["status"] == "ok"
                    for n in (r["numerics"].get("limits_source"),) if n})
    lines.append("Numerics: against each bundle's golden.safetensors (the float model's last prefill position and 8 "
                 "teacher-forced decode steps); limits from " + "; ".join(notes) + ".")
    for key, label in (("vision_encoder_images_per_s", "Vision encoder images/s"),
                       ("audio_real_time_factor", "Audio real-time factor")):
        fields = [(r.get("performance") or {}).get(key, {}) for r in record["results"]]
        lines += [f"{label}: {what}." for what in sorted({f.get("what") for f in fields if f.get("value")} - {None})]
        reasons = sorted({f.get("reason") for f in fields} - {None})
        lines += [f"{label}: {reason}." for reason in reasons]
    for note in sorted({r["numerics"]["note"] for r in record["results"]
                        if r["status"] == "ok" and r.get("numerics") and r["numerics"].get("note")}):
        lines.append(note)
    for r in record["results"]:
        if r["status"] == "ok" and r["backend"].get("ops_per_unit"):
            lines.append(f"Ops per unit, {r['runtime']['name']} ({r['bundle_target']}): "
                         f"{json.dumps(r['backend']['ops_per_unit'])}"
                         + (f" ({r['backend']['note']})" if r["backend"].get("note") else ""))
    for note in record.get("notes", []):
        lines.append(note)
    lines += ["", "Result: " + ("pass" if record["passed"] else "FAIL"),
              "Plots: latency.png (decode-step latency samples, p50/p90/p99), throughput.png (tokens/s)."]
    return "\n".join(lines) + "\n"


def _na(field: dict) -> str:
    """An encoder's number (3 significant digits: the tiny encoders' real-time factors are ~1e-3), or why it has none
    in short ("not in bundle", "not measured"; the notes under the table give the reasons)."""
    if field.get("value") is not None:
        return _fmt(field["value"], "{:.3g}")
    return (field.get("reason") or "not in bundle").split(":", 1)[0]


def _thermal(thermal: dict | None) -> str:
    if not thermal:
        return "-"
    if thermal.get("state") is None:
        return thermal.get("reason", "not readable")
    temps = thermal.get("temperatures_c") or {}
    hottest = f", hottest {max(temps.values()):.1f} C" if temps else ""
    return f"{thermal.get('status_name', thermal.get('state'))}{hottest}"


def write(record: dict, folder: Path) -> None:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "record.json").write_text(json.dumps(record, indent=2, default=float) + "\n")
    (folder / "report.md").write_text(markdown(record))
    ok = [r for r in record["results"] if r["status"] == "ok"]
    plot_latency(ok, folder / "latency.png")
    plot_throughput(ok, folder / "throughput.png")


def _canvas(title: str, size=(960, 120)):
    from PIL import Image, ImageDraw, ImageFont

    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=13)
    draw.text((12, 10), title, fill="black", font=font)
    return image, draw, font


def _log_axis(draw, font, values, x0, x1, y_top, y_bottom, unit: str):
    values = [v for v in values if v and v > 0]
    lo = math.floor(math.log10(min(values))) if values else 0
    hi = max(math.ceil(math.log10(max(values))) if values else 1, lo + 1)

    def x_of(v):
        return x0 + (x1 - x0) * (math.log10(max(v, 10.0 ** lo)) - lo) / (hi - lo)

    for e in range(lo, hi + 1):
        x = x_of(10.0 ** e)
        draw.line([x, y_top, x, y_bottom], fill=(225, 225, 225))
        draw.text((x - 12, y_bottom + 6), f"1e{e}", fill="black", font=font)
    draw.text(((x0 + x1) / 2 - 20, y_bottom + 24), unit, fill="black", font=font)
    return x_of


def plot_latency(results: list[dict], path: Path) -> None:
    row_h, left, right, top = 34, 300, 40, 40
    image, draw, font = _canvas("decode-step latency (ms, log scale): samples, and p50 | p90 | p99 marks",
                                (960, top + row_h * max(len(results), 1) + 60))
    x0, x1, y_bottom = left, 960 - right, top + row_h * max(len(results), 1)
    samples = [s for r in results for s in r["performance"]["latency_ms"]["decode_step"]["samples"]]
    x_of = _log_axis(draw, font, samples, x0, x1, top, y_bottom, "ms")
    for i, r in enumerate(results):
        y = top + row_h * i + row_h / 2
        color = _PALETTE[i % len(_PALETTE)]
        step = r["performance"]["latency_ms"]["decode_step"]
        draw.text((12, y - 7), row_label(r), fill="black", font=font)
        for s in step["samples"]:
            if s > 0:
                draw.ellipse([x_of(s) - 2, y - 2, x_of(s) + 2, y + 2], fill=color)
        for key, height in (("p50", 12), ("p90", 9), ("p99", 6)):
            if step[key]:
                draw.line([x_of(step[key]), y - height, x_of(step[key]), y + height], fill="black", width=2)
    if not results:
        draw.text((x0 + 20, top + 10), "no backend ran", fill="black", font=font)
    image.save(path, format="PNG")


def plot_throughput(results: list[dict], path: Path) -> None:
    row_h, left, right, top = 40, 300, 40, 40
    image, draw, font = _canvas("tokens/s (log scale): prefill (upper bar), decode (lower bar)",
                                (960, top + row_h * max(len(results), 1) + 60))
    x0, x1, y_bottom = left, 960 - right, top + row_h * max(len(results), 1)
    values = [v for r in results for v in (r["performance"]["prefill_tokens_per_s"],
                                          r["performance"]["decode_tokens_per_s"]) if v]
    x_of = _log_axis(draw, font, values + [1.0], x0, x1, top, y_bottom, "tokens/s")
    for i, r in enumerate(results):
        y = top + row_h * i
        color = _PALETTE[i % len(_PALETTE)]
        draw.text((12, y + row_h / 2 - 7), row_label(r), fill="black", font=font)
        for j, key in enumerate(("prefill_tokens_per_s", "decode_tokens_per_s")):
            v = r["performance"][key]
            if v:
                yy = y + 6 + j * 15
                draw.rectangle([x0, yy, x_of(v), yy + 11], fill=color if j == 0 else tuple(c // 2 for c in color))
                draw.text((x_of(v) + 4, yy - 1), f"{v:.0f}", fill="black", font=font)
    if not results:
        draw.text((x0 + 20, top + 10), "no backend ran", fill="black", font=font)
    image.save(path, format="PNG")
