"""The result record: one JSON document per `g3n harness run`.

Modelled on MLPerf Mobile's result format (mlcommons/mobile_app_open docs/result-spec.md: `meta`, a `results` list
with one entry per benchmark, `environment_info`, `build_info`) and on ExecuTorch's benchmark records
(.github/scripts/extract_benchmark_results.py: per result a model with its backend, metrics with their raw
`benchmark_values`, and the runner device with its OS and memory). One `results` entry per runtime and backend run on
the device:

    runtime        {name, version}
    backend        {requested, used, fully_accelerated, ops_per_unit, note}
    status         "ok" | "skipped" | "error" (then `reason`)
    performance    latency samples with p50/p90/p99 (request, prefill, decode step), time to first token, prefill
                   and decode tokens/s, vision encoder images/s (at the bundle's default image size, with every
                   size's) and audio real-time factor (compute seconds per second of audio, one 30 s window), each
                   with its latency samples, or null with a reason (no such encoder in the bundle, or not measured
                   on that path), peak memory, the engine's own counters where a runtime has them
    numerics       against the bundle's golden vectors: max abs, relative and mean abs error, cosine, greedy tokens,
                   pass/fail against the thresholds, which thresholds

Numbers that could not be measured are null with a `reason` beside them, never zero.
"""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
import uuid
from pathlib import Path

import numpy as np

from contract.bundle import bundle_digest

SCHEMA = "g3n-harness/1"
NOT_IN_BUNDLE = "not in bundle: the bundle holds no {what} (a text-only model's bundle)"
NOT_MEASURED = "not measured: {why}"
# The bundle manifest's encoder names -> the performance fields measuring them.
ENCODER_FIELDS = {"vision": "vision_encoder_images_per_s", "audio": "audio_real_time_factor"}
SCHEMA_SOURCES = [
    "MLPerf Mobile result format: mlcommons/mobile_app_open docs/result-spec.md",
    "ExecuTorch benchmark records: pytorch/executorch .github/scripts/extract_benchmark_results.py (transform)",
]


def percentiles(samples) -> dict:
    """Samples (ms) with their count, mean, p50, p90 and p99 (numpy's linear interpolation), or nulls when empty."""
    values = [float(v) for v in samples]
    if not values:
        return {"samples": [], "count": 0, "mean": None, "p50": None, "p90": None, "p99": None}
    arr = np.asarray(values, np.float64)
    return {"samples": [round(v, 4) for v in values], "count": len(values), "mean": float(arr.mean()),
            "p50": float(np.percentile(arr, 50)), "p90": float(np.percentile(arr, 90)),
            "p99": float(np.percentile(arr, 99))}


def unavailable(reason: str) -> dict:
    return {"value": None, "reason": reason}


def bundle_encoders(manifest: dict) -> set[str]:
    """The encoders a bundle holds ("vision", "audio"), from its manifest's `encoders` entry."""
    return set((manifest.get("encoders") or {}).get("components", []))


def encoder_fields(manifest: dict, measured: dict | None = None,
                   why: str = "this device path runs the language model only (the host harness times the encoders)"
                   ) -> dict:
    """Vision images/s and audio real-time factor: the `measured` entries, else null with the reason (the bundle
    has no such encoder, or `why` it was not measured)."""
    have = bundle_encoders(manifest)
    out = {}
    for name, key in ENCODER_FIELDS.items():
        if measured and key in measured:
            out[key] = measured[key]
        elif name not in have:
            out[key] = unavailable(NOT_IN_BUNDLE.format(what=f"{name} encoder"))
        else:
            out[key] = unavailable(NOT_MEASURED.format(why=why))
    return out


def new_record(device: dict, bundles: list[dict], settings: dict, command: list[str]) -> dict:
    return {
        "schema": SCHEMA,
        "schema_sources": SCHEMA_SOURCES,
        "meta": {"run_id": str(uuid.uuid4()),
                 "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                 "command": command},
        "bundles": bundles,
        "environment_info": device,
        "build_info": build_info(),
        "settings": settings,
        "results": [],
        "passed": None,
    }


def bundle_info(bundle: Path, manifest: dict) -> dict:
    return {"path": str(bundle), "sha256": bundle_digest(bundle), "target": manifest["target"],
            "runtime": manifest["runtime"], "quantization": manifest["quantization"],
            "model": {"source": manifest["model"]["source"], "layers": manifest["model"]["config"]["num_hidden_layers"],
                      "hidden_size": manifest["model"]["config"]["hidden_size"],
                      "parameters": manifest["model"]["parameters"]["total"]},
            "export_spec": {k: manifest["export_spec"][k] for k in ("cache_len", "prefill_lengths")}}


def build_info() -> dict:
    root = Path(__file__).resolve().parents[2]
    info = {"package": "gemma3n-mobile", "git_commit": None, "git_dirty_flag": None}
    try:
        info["git_commit"] = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                                            text=True, timeout=10).stdout.strip() or None
        status = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=10)
        info["git_dirty_flag"] = bool(status.stdout.strip()) if status.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def host_environment() -> dict:
    """This machine in MLPerf Mobile's environment_info shape (platform + value), with what Linux lets us read."""
    cpu = _cpu_model()
    thermal = host_thermal()
    return {"platform": platform.system().lower(), "device_id": f"host:{platform.node()}",
            "value": {"model": platform.node(), "soc": cpu, "machine": platform.machine(),
                      "os_build": f"{platform.system()} {platform.release()} ({_os_pretty_name()})",
                      "cpu_count": os.cpu_count(), "total_mem_gb": _total_mem_gb(), "thermal": thermal,
                      "python": platform.python_version()}}


def host_thermal() -> dict:
    zones = sorted(Path("/sys/class/thermal").glob("thermal_zone*/temp")) if Path("/sys/class/thermal").is_dir() else []
    temps = {}
    for zone in zones:
        try:
            kind = (zone.parent / "type").read_text().strip()
            temps[kind] = int(zone.read_text().strip()) / 1000.0
        except (OSError, ValueError):
            continue
    if not temps:
        return {"state": None, "reason": "not readable: this machine exposes no /sys/class/thermal zones"}
    return {"state": "read", "temperatures_c": temps}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "Hardware")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _os_pretty_name() -> str:
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip('"')
    except OSError:
        pass
    return platform.version()


def _total_mem_gb() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    return None
