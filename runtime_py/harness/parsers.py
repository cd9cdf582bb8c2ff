"""Readers of what the on-device tools print or write, each in the format its source defines.

Every parser takes the tool's text (or bytes) and returns plain numbers; a transcript that lacks what the harness
needs raises InputError naming the tool and the missing line, so a changed tool format fails loudly instead of
recording zeros. The formats, and the sources that define them:

    LiteRT-LM litert_lm_advanced_main --benchmark   runtime/engine/io_types.cc (operator<< of BenchmarkInfo),
                                                   runtime/engine/litert_lm_lib.cc (LogMemoryUsage,
                                                   LogAggregatedMetrics, RunSingleTurnSession's "output: ")
    LiteRT benchmark_model (log)                   tflite/tools/benchmark/benchmark_model.cc (OnBenchmarkEnd),
                                                   tflite/core/subgraph.cc ("Replacing N out of M node(s)")
    LiteRT benchmark_model --result_file_path       tflite/tools/benchmark/proto/benchmark_result.proto (binary)
    LiteRT run_model --print_tensors                litert/tools/run_model.cc, litert/tools/tensor_utils.h
    ExecuTorch executor_runner                      examples/portable/executor_runner/executor_runner.cpp,
                                                   runtime/platform/default/posix.cpp (the ET_LOG line format)
    ExecuTorch llama_main                           extension/llm/runner/stats.h (print_report: PyTorchObserver)
    adb: getprop, dumpsys thermalservice, devices   toybox getprop; AOSP ThermalManagerService.dump; adb devices -l
    xcrun devicectl --json-output                   the JSON coremltools' remote_device.py (_DeviceCtl) reads
"""

from __future__ import annotations

import json
import re
import struct

import numpy as np

from models.errors import InputError

# --- LiteRT-LM: litert_lm_advanced_main --benchmark ------------------------------------------------------------------

_ABSL_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "ns": 1e-9}


def absl_duration_seconds(text: str) -> float:
    """absl::FormatDuration's text ("4.037520542s", "399.049292ms", "1m2.5s", "250us", "0") in seconds."""
    text = text.strip()
    if text in ("0", "inf", "-inf"):
        return {"0": 0.0, "inf": float("inf"), "-inf": float("-inf")}[text]
    parts = re.findall(r"(-?\d+(?:\.\d+)?)(h|ms|us|ns|m|s)", text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise InputError(f"not an absl duration: {text!r}")
    return sum(float(n) * _ABSL_UNITS[u] for n, u in parts)


def parse_litert_lm_benchmark(text: str) -> dict:
    """BenchmarkInfo printed by litert_lm_advanced_main (--benchmark [--report_peak_memory_footprint]).

    Returns init phases (ms), time to first token (s), prefill and decode turns (tokens, seconds, tokens/s), peak
    memory (MB) and the generated text when printed. With --num_iterations > 1 the tool prints each iteration's
    BenchmarkInfo and then an "Aggregated BenchmarkInfo (median of N iterations)" block; the iterations are returned
    in `iterations` and the medians in `aggregated`."""
    if "BenchmarkInfo:" not in text:
        raise InputError("litert_lm_advanced_main output: no 'BenchmarkInfo:' block (was --benchmark given?)")
    head, _, aggregated_text = text.partition("Aggregated BenchmarkInfo")
    iterations = [_benchmark_info_block(block) for block in head.split("BenchmarkInfo:")[1:]]
    peaks = [float(v) for v in re.findall(r"Peak system ram usage: ([\d.]+) ?MB", head)]
    privates = [float(v) for v in re.findall(r"Peak private footprint: ([\d.]+) ?MB", head)]
    for i, it in enumerate(iterations):
        it["peak_mem_mb"] = peaks[i] if i < len(peaks) else None
        it["peak_private_mb"] = privates[i] if i < len(privates) else None
    result = {"iterations": iterations, "aggregated": None, "text": None}
    if aggregated_text:
        m = re.search(r"\(median of (\d+) iterations\)", aggregated_text)
        result["aggregated"] = {
            "num_iterations": int(m.group(1)) if m else None,
            "time_to_first_token_s": _float_after(r"Time to first token: ([\d.]+) s", aggregated_text),
            "prefill_tokens_per_s": [float(v) for v in re.findall(r"Prefill Speed: ([\d.]+) tokens/sec", aggregated_text)],
            "decode_tokens_per_s": [float(v) for v in re.findall(r"Decode Speed: ([\d.]+) tokens/sec", aggregated_text)],
            "peak_mem_mb": _float_after(r"Peak system ram usage: ([\d.]+) ?MB", aggregated_text),
            "peak_private_mb": _float_after(r"Peak private footprint: ([\d.]+) ?MB", aggregated_text),
        }
    m = re.search(r"^output: (.*?)(?=^\S+ \d\d:\d\d:\d\d|^[IWE]\d{4} |\Z)", text, re.S | re.M)
    if m:
        result["text"] = m.group(1).rstrip("\n")
    return result


def _float_after(pattern: str, text: str) -> float | None:
    m = re.search(pattern, text)
    return float(m.group(1)) if m else None


def _benchmark_info_block(block: str) -> dict:
    phases = {name.strip(): float(ms) for name, ms in re.findall(r"^\s*- (.+?): ([\d.]+) ms$", block, re.M)}
    turns = {}
    for kind in ("Prefill", "Decode"):
        found = re.findall(rf"{kind} Turn \d+: Processed (\d+) tokens in (\S+) duration\.\s*\n\s*{kind} Speed: "
                           rf"([\d.]+) tokens/sec\.", block)
        turns[kind.lower()] = [{"tokens": int(n), "seconds": absl_duration_seconds(d), "tokens_per_s": float(tps)}
                               for n, d, tps in found]
    ttft = _float_after(r"Time to first token: ([\d.]+) s", block)
    if ttft is None or not turns["prefill"]:
        raise InputError("litert_lm_advanced_main output: a BenchmarkInfo block without 'Time to first token' or a "
                         "prefill turn")
    return {"init_phases_ms": phases, "time_to_first_token_s": ttft, "prefill_turns": turns["prefill"],
            "decode_turns": turns["decode"]}


# --- LiteRT benchmark_model -------------------------------------------------------------------------------------------


def parse_benchmark_model_log(text: str) -> dict:
    """benchmark_model's summary lines: inference timings (us), memory footprint (MB), and the delegation lines
    ("Replacing N out of M node(s) with delegate (NAME) node, yielding K partitions ...")."""
    m = re.search(r"Inference timings in us: Init: ([\d.e+]+), First inference: ([\d.e+]+), Warmup \(avg\): "
                  r"([\d.e+]+), Inference \(avg\): ([\d.e+]+)", text)
    if not m:
        raise InputError("benchmark_model output: no 'Inference timings in us:' line")
    init, first, warmup, avg = (float(v) for v in m.groups())
    out = {"init_us": init, "first_inference_us": first, "warmup_avg_us": warmup, "inference_avg_us": avg,
           "init_footprint_mb": None, "overall_footprint_mb": None, "peak_mem_mb": None, "delegations": []}
    m = re.search(r"Memory footprint delta from the start of the tool \(MB\): init=([\d.e+-]+) overall=([\d.e+-]+)", text)
    if m:
        out["init_footprint_mb"], out["overall_footprint_mb"] = float(m.group(1)), float(m.group(2))
    out["peak_mem_mb"] = _float_after(r"Overall peak memory footprint \(MB\) via periodic monitoring: ([\d.e+]+)", text)
    for replaced, total, delegate, partitions in re.findall(
            r"Replacing (\d+) out of (\d+) node\(s\) with delegate \(([^)]+)\) node, yielding (\d+) partitions", text):
        out["delegations"].append({"delegate": delegate, "replaced": int(replaced), "total": int(total),
                                   "partitions": int(partitions)})
    return out


# tflite/tools/benchmark/proto/benchmark_result.proto: field number -> (name, wire type) per message.
_LATENCY_FIELDS = {1: "avg_ms", 2: "min_ms", 3: "max_ms", 4: "stddev_ms", 5: "median_ms", 6: "p5_ms", 7: "p95_ms",
                   8: "init_ms", 9: "first_inference_ms", 10: "average_warm_up_ms"}  # all float (wire type 5)
_MEMORY_FIELDS = {1: "init_footprint_kb", 2: "overall_footprint_kb", 3: "peak_mem_mb"}  # int64, int64, float
_MISC_FIELDS = {1: "model_size_mb", 2: "num_runs", 3: "num_warmup_runs", 4: "model_throughput_in_mb_per_sec"}


def parse_benchmark_result_proto(data: bytes) -> dict:
    """benchmark_model's --result_file_path file: a binary tflite.tools.benchmark.BenchmarkResult (proto2), decoded
    from the wire format so that no generated protobuf code is needed."""
    top = _proto_fields(data, "BenchmarkResult")
    out = {"name": None, "latency_metrics": {}, "memory_metrics": {}, "misc_metrics": {}}
    for number, value in top:
        if number == 1:
            out["name"] = value.decode()
        elif number in (2, 3, 4):
            names = {2: _LATENCY_FIELDS, 3: _MEMORY_FIELDS, 4: _MISC_FIELDS}[number]
            key = {2: "latency_metrics", 3: "memory_metrics", 4: "misc_metrics"}[number]
            for sub_number, sub_value in _proto_fields(value, key):
                if sub_number in names:
                    out[key][names[sub_number]] = sub_value
    return out


def _proto_fields(data: bytes, what: str) -> list[tuple[int, object]]:
    """(field number, value) pairs: varints as int, fixed32 as float32, length-delimited as bytes."""
    fields, i = [], 0
    try:
        while i < len(data):
            key, i = _varint(data, i)
            number, wire = key >> 3, key & 7
            if wire == 0:
                value, i = _varint(data, i)
            elif wire == 5:
                value, i = struct.unpack_from("<f", data, i)[0], i + 4
            elif wire == 1:
                value, i = struct.unpack_from("<d", data, i)[0], i + 8
            elif wire == 2:
                length, i = _varint(data, i)
                value, i = bytes(data[i:i + length]), i + length
                if i > len(data):
                    raise IndexError
            else:
                raise InputError(f"benchmark_model result file: {what} has an unexpected wire type {wire}")
            fields.append((number, value))
    except (IndexError, struct.error):
        raise InputError(f"benchmark_model result file: {what} is truncated") from None
    return fields


def _varint(data: bytes, i: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        byte = data[i]
        value |= (byte & 0x7F) << shift
        i += 1
        if not byte & 0x80:
            return value, i
        shift += 7


# --- LiteRT run_model --------------------------------------------------------------------------------------------------


_ABSL_PREFIX = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:[\d.]+\s+\d+ [\w.]+:\d+\] ?")


def absl_messages(text: str) -> list[str]:
    """The messages of ABSL log lines ("I0000 00:00:1764367400.047584    9120 file.cc:181] message"); lines without
    the prefix are kept whole."""
    return [_ABSL_PREFIX.sub("", line) for line in text.splitlines()]


def parse_run_model_output(text: str) -> dict:
    """run_model's timings ("First run took N microseconds", slowest, fastest, average) and, with --print_tensors
    --compare_numerical, each output buffer's dimensions and printed samples {index: value}. With --sample_size at
    least the element count every element is printed (in the "Beginning" block)."""
    def micros(label):
        m = re.search(rf"{label} took (?:average )?(\d+) microseconds", text)
        return int(m.group(1)) if m else None

    if micros("First run") is None:
        raise InputError("run_model output: no 'First run took N microseconds' line (did the model run?)")
    out = {"first_us": micros("First run"), "slowest_us": micros("Slowest run"), "fastest_us": micros("Fastest run"),
           "average_us": micros("All runs"), "outputs": []}
    current, in_dims = None, False
    for message in absl_messages(text):
        m = re.match(r"(Input|Output) buffer (\d+):", message)
        if m:
            current = {"index": int(m.group(2)), "dims": [], "samples": {}} if m.group(1) == "Output" else None
            if current is not None:
                out["outputs"].append(current)
            in_dims = False
            continue
        if current is None:
            continue
        stripped = message.strip()
        if stripped == "Dimensions: [":
            in_dims = True
        elif in_dims:
            if stripped == "]":
                in_dims = False
            elif stripped.isdigit():
                current["dims"].append(int(stripped))
        else:
            m = re.fullmatch(r"(\d+): (-?(?:[\d.]+(?:e[+-]?\d+)?|inf|nan))", stripped)
            if m:
                current["samples"][int(m.group(1))] = float(m.group(2))
    return out


def run_model_tensor(output: dict) -> np.ndarray:
    """A run_model output buffer as a float32 array of its dimensions; every element must have been printed."""
    count = int(np.prod(output["dims"])) if output["dims"] else 0
    missing = [i for i in range(count) if i not in output["samples"]]
    if count == 0 or missing:
        raise InputError(f"run_model output buffer {output['index']}: {len(missing)} of {count} elements not printed "
                         "(run with --print_tensors --compare_numerical --sample_size=<element count>)")
    return np.array([output["samples"][i] for i in range(count)], np.float32).reshape(output["dims"])


# --- ExecuTorch executor_runner and llama_main ---------------------------------------------------------------------------

_ET_LOG = r"[DIEF] \d\d:\d\d:\d\d\.\d{6} executorch:[\w./-]+:\d+\] "


def parse_executor_runner_log(text: str) -> dict:
    """executor_runner's per-iteration latencies ("Iteration i of N: x ms"), the total, and the output files it
    wrote with --output_file ("Writing output to file: <base>-<i>.bin")."""
    iterations = [float(ms) for _, _, ms in re.findall(_ET_LOG + r"Iteration (\d+) of (\d+): ([\d.]+) ms", text)]
    m = re.search(_ET_LOG + r"Model executed successfully (\d+) time\(s\) in ([\d.]+) ms\.", text)
    if not m:
        raise InputError("executor_runner output: no 'Model executed successfully' line")
    method = re.search(_ET_LOG + r"Using method (\S+)", text)
    return {"method": method.group(1) if method else None, "iteration_ms": iterations,
            "executions": int(m.group(1)), "total_ms": float(m.group(2)),
            "output_files": re.findall(_ET_LOG + r"Writing output to file: (\S+)", text)}


def read_raw_tensor(data: bytes, shape, dtype=np.float32, what: str = "tensor file") -> np.ndarray:
    """The raw bytes executor_runner's --output_file writes (tensor.nbytes, no header) as an array of `shape`."""
    expected = int(np.prod(shape)) * np.dtype(dtype).itemsize
    if len(data) != expected:
        raise InputError(f"{what}: {len(data)} bytes, expected {expected} for shape {list(shape)} {np.dtype(dtype)}")
    return np.frombuffer(data, dtype).reshape(shape).copy()


def parse_llama_main_observer(text: str) -> dict:
    """The `PyTorchObserver {...}` JSON line llama_main prints (stats.h print_report), with the rates and the time to
    first token derived exactly as print_report derives them (milliseconds over SCALING_FACTOR_UNITS_PER_SECOND)."""
    m = re.search(r"^PyTorchObserver (\{.*\})\s*$", text, re.M)
    if not m:
        raise InputError("llama_main output: no 'PyTorchObserver {...}' line")
    stats = json.loads(m.group(1))
    scale = float(stats.get("SCALING_FACTOR_UNITS_PER_SECOND", 1000))
    prefill_s = (stats["prompt_eval_end_ms"] - stats["inference_start_ms"]) / scale
    decode_s = (stats["inference_end_ms"] - stats["prompt_eval_end_ms"]) / scale
    return {**stats,
            "model_load_s": (stats["model_load_end_ms"] - stats["model_load_start_ms"]) / scale,
            "time_to_first_token_s": (stats["first_token_ms"] - stats["inference_start_ms"]) / scale,
            "prefill_tokens_per_s": stats["prompt_tokens"] / prefill_s if prefill_s > 0 else None,
            "decode_tokens_per_s": stats["generated_tokens"] / decode_s if decode_s > 0 else None}


# --- Android device state ----------------------------------------------------------------------------------------------


def parse_getprop(text: str) -> dict[str, str]:
    """`adb shell getprop`: lines "[name]: [value]"."""
    return dict(re.findall(r"^\[([^\]]+)\]: \[(.*)\]\s*$", text, re.M))


THERMAL_STATUS = {0: "none", 1: "light", 2: "moderate", 3: "severe", 4: "critical", 5: "emergency", 6: "shutdown"}


def parse_thermalservice(text: str) -> dict:
    """`adb shell dumpsys thermalservice`: the thermal status (PowerManager.THERMAL_STATUS_*) and the HAL's current
    temperatures by sensor name (the cached ones when the HAL block is missing)."""
    m = re.search(r"^Thermal Status: (\d+)", text, re.M)
    if not m:
        raise InputError("dumpsys thermalservice: no 'Thermal Status:' line")
    status = int(m.group(1))
    hal = text.split("Current temperatures from HAL:", 1)
    section = hal[1].split("Current cooling devices", 1)[0] if len(hal) == 2 else text
    temps = {name: float(value) for value, name in
             re.findall(r"Temperature\{mValue=(-?[\d.]+), mType=-?\d+, mName=([^,]+), mStatus=\d+\}", section)}
    return {"status": status, "status_name": THERMAL_STATUS.get(status, "unknown"), "temperatures_c": temps}


def parse_adb_devices(text: str) -> list[dict]:
    """`adb devices -l`: serial, state and the key:value properties of every attached device."""
    devices = []
    for line in text.splitlines():
        if not line.strip() or line.startswith(("List of devices", "*")):
            continue
        parts = line.split()
        props = dict(p.split(":", 1) for p in parts[2:] if ":" in p)
        devices.append({"serial": parts[0], "state": parts[1] if len(parts) > 1 else "", **props})
    return devices


# --- Apple: xcrun devicectl --json-output ------------------------------------------------------------------------------


def parse_devicectl_devices(document: dict) -> list[dict]:
    """`xcrun devicectl list devices --json-output F`: per device its identifier, udid, name, model, OS and state
    (the fields coremltools' remote_device reads)."""
    devices = (document.get("result") or {}).get("devices")
    if not isinstance(devices, list):
        raise InputError("devicectl list devices: no result.devices list in the JSON")
    out = []
    for d in devices:
        hw, props, conn = d.get("hardwareProperties", {}), d.get("deviceProperties", {}), d.get("connectionProperties", {})
        out.append({"identifier": d.get("identifier", ""), "udid": hw.get("udid", ""), "name": props.get("name", ""),
                    "type": hw.get("deviceType", ""), "model": hw.get("marketingName") or hw.get("productType", ""),
                    "product_type": hw.get("productType", ""), "soc": (hw.get("cpuType") or {}).get("name", ""),
                    "os_version": props.get("osVersionNumber", ""), "os_build": props.get("osBuildUpdate", ""),
                    "state": conn.get("tunnelState", "")})
    return out


def parse_devicectl_install(document: dict) -> dict:
    """`xcrun devicectl device install app --json-output F`: the installed app's bundle id (and database UUID)."""
    apps = (document.get("result") or {}).get("installedApplications")
    if not isinstance(apps, list) or not apps:
        raise InputError("devicectl device install app: no result.installedApplications in the JSON")
    return {"bundle_id": apps[0].get("bundleID", ""), "database_uuid": apps[0].get("databaseUUID", "")}
