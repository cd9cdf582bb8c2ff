"""Apple devices: the Mac itself (coremltools predict per compute unit, MLComputePlan op placement) and iPhones
(xcrun devicectl: install a runner app, copy the bundle in, launch, copy the result back). Both need macOS; elsewhere
they stop with one line saying so.

    mac      the ios bundle's .mlpackage run by the host worker (host.py) once per compute unit: CPU only, CPU+GPU,
             CPU+Neural Engine, all; numerics against the golden vectors and the same timings as every host
             backend; op placement from MLComputePlan (the preferred compute device of every MIL operation)
    iphone   a user-supplied runner app (--app PATH.app) that reads the bundle from its Documents folder and writes
             Documents/g3n-harness/result.json in the shape APP_RESULT_FIELDS describes; devicectl command lines as
             coremltools' remote_device (_DeviceCtl) builds them, with --json-output for every answer
"""

from __future__ import annotations

import json
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

from contract.bundle import COREML_PACKAGE
from models.errors import InputError
from runtime_py.harness import parsers

# --backend -> coremltools ComputeUnit names; mac without --backend runs all four.
COMPUTE_UNITS = {"cpu": "CPU_ONLY", "gpu": "CPU_AND_GPU", "ane": "CPU_AND_NE", "all": "ALL"}
MACOS_ONLY = "--device {device} needs macOS: {what} run on macOS only (this is {platform})"
APP_RESULT = "g3n-harness/result.json"
APP_RESULT_FIELDS = {  # what the iPhone runner app writes (every time in ms)
    "compute_units": "str: the MLComputeUnits the model was loaded with",
    "load_ms": "float", "prefill_ms": "[float]: each timed iteration's prefill",
    "time_to_first_token_ms": "[float]", "decode_step_ms": "[float]: every timed decode step",
    "prompt_tokens": "int", "decode_tokens": "int", "peak_memory_mb": "float (phys_footprint)",
    "thermal_state": "str: ProcessInfo.thermalState (nominal, fair, serious, critical)",
    "logits": "[[float]]: the golden positions' logits (prefill's last position, then the teacher-forced steps)",
}


def require_macos(device: str, what: str) -> None:
    if sys.platform != "darwin":
        raise InputError(MACOS_ONLY.format(device=device, what=what, platform=sys.platform))


def mac_compute_units(backend: str | None) -> list[str]:
    if backend is None:
        return list(COMPUTE_UNITS.values())
    if backend not in COMPUTE_UNITS:
        raise InputError(f"--backend {backend}: mac runs cpu, gpu, ane or all")
    return [COMPUTE_UNITS[backend]]


def coreml_session(bundle: Path, compute_units: str):
    """A session on the ios bundle with its .mlpackage loaded for `compute_units` (macOS only)."""
    from runtime_py.engine import open_bundle

    require_macos("mac", "coremltools predictions")
    return open_bundle(bundle, "coreml", compute_units=compute_units)


def compute_plan_placement(bundle: Path, manifest: dict, compute_units: str | None) -> dict:
    """Per function of the .mlpackage, how many MIL operations MLComputePlan prefers on each compute device."""
    import coremltools as ct
    from coremltools.models.compute_plan import MLComputePlan

    units = getattr(ct.ComputeUnit, compute_units or "ALL")
    per_function = {}
    for name in [f"prefill_{t}" for t in manifest["export_spec"]["prefill_lengths"]] + ["decode"]:
        model = ct.models.MLModel(str(Path(bundle) / COREML_PACKAGE), function_name=name, compute_units=units)
        plan = MLComputePlan.load_from_path(model.get_compiled_model_path(), compute_units=units)
        counts: dict[str, int] = {}
        for function in plan.model_structure.program.functions.values():
            for operation in function.block.operations:
                usage = plan.get_compute_device_usage_for_mlprogram_operation(operation)
                device = type(usage.preferred_compute_device).__name__ if usage else "none (constants)"
                counts[device] = counts.get(device, 0) + 1
        per_function[name] = counts
    others = sum(n for c in per_function.values() for d, n in c.items() if d not in ("MLCPUComputeDevice",
                                                                                     "none (constants)"))
    cpu = sum(c.get("MLCPUComputeDevice", 0) for c in per_function.values())
    return {"used": compute_units, "fully_accelerated": cpu == 0 if compute_units != "CPU_ONLY" else None,
            "ops_per_unit": per_function,
            "note": f"MLComputePlan preferred devices ({others} ops off the CPU)"}


# --- iPhone: xcrun devicectl ------------------------------------------------------------------------------------------


@dataclass
class IphoneJob:
    bundle: Path
    manifest: dict
    udid: str
    app: Path
    bundle_id: str
    work: Path
    compute_units: str = "ALL"
    iterations: int = 5
    warmup: int = 1
    decode_tokens: int = 16


def _devicectl(*args: str, json_output: Path | None = None) -> list[str]:
    argv = ["xcrun", "devicectl", *args]
    return argv + ["--json-output", str(json_output)] if json_output else argv


def iphone_plan(job: IphoneJob) -> list[tuple[str, list[str]]]:
    """(what, argv) for every devicectl call, in order."""
    j = job.work
    target = job.manifest["target"]
    container = ["--domain-type", "appDataContainer", "--domain-identifier", job.bundle_id, "--user", "mobile"]
    return [
        ("device details", _devicectl("device", "info", "details", "--device", job.udid,
                                      json_output=j / "details.json")),
        ("install the runner app", _devicectl("device", "install", "app", "--device", job.udid, str(job.app),
                                              json_output=j / "install.json")),
        ("copy the bundle in", _devicectl("device", "copy", "to", "--device", job.udid, "--source", str(job.bundle),
                                          "--destination", f"Documents/g3n-harness/{target}", *container,
                                          json_output=j / "copy_to.json")),
        ("launch", _devicectl("device", "process", "launch", "--device", job.udid, "--terminate-existing",
                              "--console", job.bundle_id, "--", "--bundle", f"Documents/g3n-harness/{target}",
                              "--compute-units", job.compute_units, "--iterations", str(job.iterations),
                              "--warmup", str(job.warmup), "--decode-tokens", str(job.decode_tokens),
                              "--output", f"Documents/{APP_RESULT}", json_output=j / "launch.json")),
        ("copy the result back", _devicectl("device", "copy", "from", "--device", job.udid, "--source",
                                            f"Documents/{APP_RESULT}", "--destination", str(j / "result.json"),
                                            *container, json_output=j / "copy_from.json")),
        ("uninstall the runner app", _devicectl("device", "uninstall", "app", "--device", job.udid, job.bundle_id,
                                                json_output=j / "uninstall.json")),
    ]


def run_iphone(job: IphoneJob, progress=lambda message: None) -> tuple[dict, list[dict]]:
    import subprocess

    require_macos("iphone", "xcrun devicectl and Xcode")
    job.work.mkdir(parents=True, exist_ok=True)
    for what, argv in iphone_plan(job):
        progress(f"iphone: {what}")
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=3600)
        if proc.returncode != 0 and what != "uninstall the runner app":
            last = [line for line in (proc.stderr or proc.stdout).splitlines() if line.strip()]
            raise InputError(f"devicectl {what} failed: {last[-1] if last else proc.returncode}")
    details = json.loads((job.work / "details.json").read_text())
    return iphone_environment(details, job.udid), [iphone_result(job, json.loads((job.work / "result.json").read_text()))]


def iphone_environment(details: dict, udid: str) -> dict:
    result = details.get("result") or {}
    device = parsers.parse_devicectl_devices({"result": {"devices": [result]}})[0]
    return {"platform": "ios", "device_id": f"iphone:{udid}",
            "value": {"model": device["model"], "product_type": device["product_type"], "soc": device["soc"] or None,
                      "os_build": f"iOS {device['os_version']} ({device['os_build']})", "name": device["name"],
                      "thermal": {"state": None, "reason": "read by the runner app (thermal_state in its result)"}}}


def iphone_result(job: IphoneJob, app: dict) -> dict:
    """A result entry from the runner app's result.json (APP_RESULT_FIELDS)."""
    import numpy as np

    from runtime_py.harness import numerics
    from runtime_py.harness.record import encoder_fields, percentiles

    missing = [k for k in APP_RESULT_FIELDS if k not in app]
    if missing:
        raise InputError(f"{job.work / 'result.json'}: the runner app's result lacks {', '.join(missing)}")
    golden = numerics.load_golden(job.bundle, job.manifest)
    logits = np.asarray(app["logits"], np.float32)
    metrics = numerics.logit_metrics(numerics.golden_logits(golden), logits)
    decode_s = sum(app["decode_step_ms"]) / 1e3
    return {"device": f"iphone:{job.udid}", "bundle": str(job.bundle), "bundle_target": job.manifest["target"],
            "quantization": job.manifest["quantization"]["level"],
            "runtime": {"name": "Core ML (runner app)", "version": None, "distribution": str(job.app)},
            "backend": {"requested": job.compute_units, "used": app["compute_units"], "fully_accelerated": None,
                        "ops_per_unit": {}, "note": "op placement: run --device mac for MLComputePlan"},
            "status": "ok",
            "performance": {"iterations": job.iterations, "load_s": app["load_ms"] / 1e3,
                            "latency_ms": {"prefill": percentiles(app["prefill_ms"]),
                                           "decode_step": percentiles(app["decode_step_ms"])},
                            "time_to_first_token_ms": percentiles(app["time_to_first_token_ms"]),
                            "prefill_tokens_per_s": app["prompt_tokens"] / (np.median(app["prefill_ms"]) / 1e3),
                            "decode_tokens_per_s": len(app["decode_step_ms"]) / decode_s if decode_s else None,
                            "peak_memory_mb": {"value": app["peak_memory_mb"], "what": "phys_footprint (runner app)"},
                            "thermal_state": app["thermal_state"], **encoder_fields(job.manifest)},
            "numerics": numerics.numerics_entry(metrics, "coreml", job.manifest["quantization"]["level"],
                                                manifest=job.manifest)}


def command_lines(plan: list[tuple[str, list[str]]]) -> list[str]:
    return [shlex.join(argv) for _, argv in plan]
