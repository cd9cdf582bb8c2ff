"""The local history: every `g3n harness run` appends one row per result to a SQLite file, and `g3n harness history`
shows a bundle-and-device's trend per runtime and backend, flagging a regression against the previous run.

A series is (bundle sha256, device id, runtime, backend asked for). A run regresses against the previous run of its
series when a speed gets worse by more than the tolerance (prefill or decode tokens/s down, time to first token or
the p90 decode step up), peak memory grows by more than the tolerance, the numerics go from pass to fail, or the max
abs error more than doubles (and passes 1e-6, below which float noise is not a change).
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

from models.errors import InputError

DEFAULT_TOLERANCE = 0.10
ERROR_GROWTH = 2.0
ERROR_FLOOR = 1e-6

COLUMNS = [  # (name, SQL type)
    ("run_id", "TEXT"), ("created_utc", "TEXT"), ("bundle_sha256", "TEXT"), ("bundle_path", "TEXT"),
    ("bundle_target", "TEXT"), ("quantization", "TEXT"), ("device_id", "TEXT"), ("device_model", "TEXT"),
    ("runtime", "TEXT"), ("runtime_version", "TEXT"), ("backend_requested", "TEXT"), ("backend_used", "TEXT"),
    ("status", "TEXT"), ("ttft_p50_ms", "REAL"), ("prefill_tps", "REAL"), ("decode_tps", "REAL"),
    ("decode_step_p50_ms", "REAL"), ("decode_step_p90_ms", "REAL"), ("peak_memory_mb", "REAL"),
    ("max_abs", "REAL"), ("relative", "REAL"), ("min_cosine", "REAL"), ("numerics_passed", "INTEGER"),
    ("record_path", "TEXT"),
]
# metric -> (label, which way is worse)
CHECKS = {"prefill_tps": ("prefill tok/s", "down"), "decode_tps": ("decode tok/s", "down"),
          "ttft_p50_ms": ("TTFT p50 ms", "up"), "decode_step_p90_ms": ("decode step p90 ms", "up"),
          "peak_memory_mb": ("peak RSS MB", "up")}


def default_path() -> Path:
    if os.environ.get("G3N_HARNESS_HISTORY"):
        return Path(os.environ["G3N_HARNESS_HISTORY"])
    base = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    return base / "g3n" / "harness.sqlite"


def connect(path: Path) -> sqlite3.Connection:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        db = sqlite3.connect(path)
        db.execute(f"CREATE TABLE IF NOT EXISTS runs ({', '.join(f'{n} {t}' for n, t in COLUMNS)})")
        db.execute("CREATE INDEX IF NOT EXISTS series ON runs (bundle_sha256, device_id, runtime, backend_requested)")
    except sqlite3.DatabaseError as e:
        raise InputError(f"{path}: not a harness history database ({e})") from None
    db.row_factory = sqlite3.Row
    return db


def rows_of(record: dict, record_path: str) -> list[dict]:
    env = record["environment_info"]
    bundles = {b["path"]: b for b in record["bundles"]}
    out = []
    for r in record["results"]:
        bundle = bundles.get(r["bundle"], {})
        row = {"run_id": record["meta"]["run_id"], "created_utc": record["meta"]["created_utc"],
               "bundle_sha256": bundle.get("sha256"), "bundle_path": r["bundle"], "bundle_target": r["bundle_target"],
               "quantization": r["quantization"], "device_id": env.get("device_id"),
               "device_model": (env.get("value") or {}).get("model"), "runtime": r["runtime"]["name"],
               "runtime_version": r["runtime"].get("version"), "backend_requested": record["settings"]["backend"],
               "backend_used": (r.get("backend") or {}).get("used"), "status": r["status"], "record_path": record_path}
        if r["status"] == "ok":
            p, n = r["performance"], r["numerics"]
            m = n["metrics"]
            values = [m.get(c, {}) for c in ("decoder.prefill", "decoder.decode")]
            row.update({
                "ttft_p50_ms": p["time_to_first_token_ms"]["p50"], "prefill_tps": p["prefill_tokens_per_s"],
                "decode_tps": p["decode_tokens_per_s"], "decode_step_p50_ms": p["latency_ms"]["decode_step"]["p50"],
                "decode_step_p90_ms": p["latency_ms"]["decode_step"]["p90"],
                "peak_memory_mb": p["peak_memory_mb"]["value"],
                "max_abs": max([v["max_abs"] for v in values if v.get("max_abs") is not None], default=None),
                "relative": max([v["relative"] for v in values if v.get("relative") is not None], default=None),
                "min_cosine": min([v["cosine"] for v in values if v.get("cosine") is not None], default=None),
                "numerics_passed": int(n["passed"])})
        out.append(row)
    return out


def append(path: Path, record: dict, record_path: str) -> list[dict]:
    """Appends the record's results; returns them as rows."""
    rows = rows_of(record, record_path)
    with connect(path) as db:
        for row in rows:
            names = [n for n, _ in COLUMNS if n in row]
            db.execute(f"INSERT INTO runs ({', '.join(names)}) VALUES ({', '.join('?' for _ in names)})",
                       [row[n] for n in names])
    return rows


def series(path: Path, bundle_sha256s: list[str], device_id: str | None) -> dict[tuple, list[dict]]:
    """Every run of the given bundles (on the device, when given), grouped by series, oldest first."""
    with connect(path) as db:
        query = f"SELECT rowid, * FROM runs WHERE bundle_sha256 IN ({', '.join('?' for _ in bundle_sha256s)})"
        params = list(bundle_sha256s)
        if device_id:
            query += " AND device_id = ?"
            params.append(device_id)
        found = [dict(r) for r in db.execute(query + " ORDER BY rowid", params)]
    grouped: dict[tuple, list[dict]] = {}
    for row in found:
        grouped.setdefault((row["bundle_sha256"], row["device_id"], row["runtime"], row["backend_requested"]),
                           []).append(row)
    return grouped


def previous_ok(path: Path, row: dict, before_run: str) -> dict | None:
    """The latest earlier successful run of `row`'s series (not the run `before_run` itself)."""
    runs = series(path, [row["bundle_sha256"]], row["device_id"]).get(
        (row["bundle_sha256"], row["device_id"], row["runtime"], row["backend_requested"]), [])
    earlier = [r for r in runs if r["run_id"] != before_run and r["status"] == "ok"]
    return earlier[-1] if earlier else None


def regressions(previous: dict | None, current: dict, tolerance: float = DEFAULT_TOLERANCE) -> list[str]:
    """What got worse from `previous` to `current` (both history rows); empty when nothing did or there is no
    previous run."""
    if previous is None or current.get("status") != "ok" or previous.get("status") != "ok":
        return []
    found = []
    for key, (label, worse) in CHECKS.items():
        old, new = previous.get(key), current.get(key)
        if not old or new is None:
            continue
        change = (new - old) / old
        if (worse == "down" and change < -tolerance) or (worse == "up" and change > tolerance):
            found.append(f"{label} {old:.4g} -> {new:.4g} ({change:+.0%}, tolerance {tolerance:.0%})")
    if previous.get("numerics_passed") == 1 and current.get("numerics_passed") == 0:
        found.append("numerics passed before and fail now")
    old, new = previous.get("max_abs"), current.get("max_abs")
    if old is not None and new is not None and new > ERROR_FLOOR and new > ERROR_GROWTH * max(old, ERROR_FLOOR):
        found.append(f"max abs error {old:.3g} -> {new:.3g} (more than {ERROR_GROWTH:g}x)")
    return found


def trend_markdown(grouped: dict[tuple, list[dict]], tolerance: float = DEFAULT_TOLERANCE) -> tuple[str, int]:
    """The trend table of every series and the number of regressions of each series' latest run against the run
    before it."""
    if not grouped:
        return "no runs of this bundle on this device in the history\n", 0
    lines, flagged = [], 0
    for (sha, device, runtime, backend), runs in grouped.items():
        lines += [f"## {runtime} ({backend}) on {device}, bundle {runs[-1]['bundle_target']} {sha[:12]}", "",
                  "| run | when | status | TTFT p50 ms | prefill tok/s | decode tok/s | decode step p90 ms | peak RSS MB "
                  "| max abs err | numerics | vs previous |",
                  "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |"]
        previous = None
        for i, run in enumerate(runs):
            found = regressions(previous, run, tolerance)
            if i == len(runs) - 1:
                flagged += len(found)
            verdict = ("REGRESSION: " + "; ".join(found)) if found else ("-" if previous is None else "ok")
            numerics = {1: "pass", 0: "FAIL", None: "-"}[run["numerics_passed"]]
            lines.append(f"| {run['run_id'][:8]} | {run['created_utc']} | {run['status']} | {_f(run['ttft_p50_ms'])} | "
                         f"{_f(run['prefill_tps'])} | {_f(run['decode_tps'])} | {_f(run['decode_step_p90_ms'], 2)} | "
                         f"{_f(run['peak_memory_mb'], 0)} | {_f(run['max_abs'], None)} | {numerics} | {verdict} |")
            if run["status"] == "ok":
                previous = run
        lines.append("")
    return "\n".join(lines), flagged


def _f(value, digits: int | None = 1) -> str:
    if value is None:
        return "-"
    return f"{value:.3g}" if digits is None else f"{value:.{digits}f}"
