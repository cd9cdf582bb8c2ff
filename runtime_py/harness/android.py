"""The android device, over adb: push the bundle and the runners, run them, pull the results, clean up.

Runners are the tools' own arm64 binaries, which no Python package ships; the user names each one it has:

    litert_lm_advanced_main   LiteRT-LM's engine on the .litertlm: the golden chat prompt (rendered, --use_session),
                              --benchmark [--num_iterations] --report_peak_memory_footprint: time to first token,
                              prefill/decode tokens/s, peak RAM, and the greedy text for numerics (cpu, gpu, npu)
    benchmark_model           LiteRT's benchmark on the decoder graph (the .litertlm's prefill_decode section as a
                              .tflite), signature by signature; its binary result proto (--result_file_path) and log
    run_model                 LiteRT's runner on the first prefill chunk of the golden prompt (.raw inputs written here
                              from the bundle's own lookups); --print_tensors prints every logit, compared on the host
    executor_runner           ExecuTorch's runner on the .pte + .ptd, per method with --inputs (raw tensors) and
                              --output_file: per-iteration latency, and the prefill chunk's logits for numerics
    llama_main                ExecuTorch's LLM runner (PyTorchObserver JSON): recorded as not applicable, since its
                              TextLLMRunner has no input for Gemma 3n's per-layer rows (README)

Device hygiene follows ExecuTorch's device-farm runs (extension/benchmark/android/benchmark/
android-llm-device-farm-test-spec.yml.j2): CPU frequency residency recorded before and after, `dumpsys deviceidle
force-idle` then `unforce`, a cool-down sleep before measuring, and runners pinned to a CPU mask with taskset (as
LiteRT-LM's README advises, `taskset f0`). Thermal status is read before and after (`dumpsys thermalservice`).

The Tensor NPU: decoder LLMs do not compile for it today (google-ai-edge/LiteRT#8062, #8501, #8884, #8943: the
Tensor backend fails in apply_plugin for decoder graphs while vision models compile), so with --backend npu the
language model runs on the GPU and the record says so; the vision encoder, the part that does compile, is AOT
compiled with ai_edge_litert for Tensor G3/G4/G5 when the user has Google's Tensor SDK and the bundle holds it.

Command lines are built as adb argument lists (`plan`); `AdbTransport` runs them with the adb binary, or through
adbutils when that library is installed and no adb binary is on PATH.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from contract.bundle import (
    LITERTLM_FILE,
    PREFILL_DECODE_SECTION,
    PTE_FILE,
    TEXT_DECODER,
    BundleManifest,
    prefill_name,
)
from models.errors import InputError
from runtime_py.harness import parsers

REMOTE_ROOT = "/data/local/tmp/g3n-harness"
RUNNERS = ("litert_lm_advanced_main", "benchmark_model", "run_model", "executor_runner", "llama_main")
# Which runners run which bundle target (llama_main is accepted and recorded as not applicable, never run).
TARGET_RUNNERS = {"android": ("litert_lm_advanced_main", "benchmark_model", "run_model"),
                  "executorch": ("executor_runner",)}
DEFAULT_CPU_MASK = "f0"
DEFAULT_COOLDOWN_S = 180  # ExecuTorch's device-farm spec sleeps 180 s after forcing the device idle
TENSOR_SOCS = ("Tensor_G3", "Tensor_G4", "Tensor_G5")
NPU_LLM_NOTE = ("the language model ran on the GPU: decoder LLMs do not compile for the Tensor NPU today "
                "(google-ai-edge/LiteRT#8062, #8501, #8884, #8943)")
LLAMA_MAIN_NOTE = ("llama_main: not applicable: ExecuTorch's TextLLMRunner has no input for Gemma 3n's per-layer "
                   "rows; executor_runner measures the .pte method by method instead")
ADB_MISSING = ("adb not found: install Android SDK platform-tools and put `adb` on PATH (or pass --adb PATH; "
               "adbutils is not installed either)")


@dataclass
class Step:
    """One adb invocation: what it is for, its argument list, and where its output goes (`parse` key)."""

    what: str
    argv: list[str]
    parse: str = ""  # which parser reads its output ("" = none)
    pull_to: str = ""  # for pulls: the local file
    tolerate_failure: bool = False


@dataclass
class AndroidJob:
    bundle: Path
    manifest: dict
    serial: str
    backend: str  # cpu | gpu | npu
    runners: dict[str, Path]  # runner name -> local arm64 binary
    work: Path  # local folder for prepared inputs and pulled outputs
    run_id: str
    iterations: int = 5
    warmup: int = 1
    decode_tokens: int = 16
    threads: int = 4
    cpu_mask: str = DEFAULT_CPU_MASK
    cooldown_s: int = DEFAULT_COOLDOWN_S
    adb: str = "adb"
    notes: list[str] = field(default_factory=list)

    @property
    def remote(self) -> str:
        return f"{REMOTE_ROOT}/{self.run_id}"


def check_backend(backend: str, target: str) -> None:
    if backend not in ("cpu", "gpu", "npu"):
        raise InputError(f"--backend {backend}: android runs cpu, gpu or npu")
    if target not in ("android", "executorch"):
        raise InputError(f"a {target} bundle does not run on android: give an android (.litertlm) or executorch "
                         "(.pte) bundle")


def check_runners(runners: dict[str, Path]) -> None:
    for name, path in runners.items():
        if name not in RUNNERS:
            raise InputError(f"--runner {name}: unknown runner (expected one of {', '.join(RUNNERS)})")
        if not Path(path).is_file():
            raise InputError(f"--runner {name}={path}: no such file (an arm64 Android binary of the tool)")


def _adb(job: AndroidJob, *args: str) -> list[str]:
    return [job.adb, "-s", job.serial, *args]


def _shell(job: AndroidJob, command: str) -> list[str]:
    return _adb(job, "shell", command)


def lm_backend(backend: str) -> str:
    """The LiteRT-LM / LiteRT backend the language model runs on for the backend asked for."""
    return "gpu" if backend == "npu" else backend


def device_info_steps(job: AndroidJob, when: str) -> list[Step]:
    steps = [Step(f"thermal status {when}", _shell(job, "dumpsys thermalservice"), parse=f"thermal_{when}",
                  tolerate_failure=True),
             Step(f"CPU frequency residency {when}",
                  _shell(job, "cat /sys/devices/system/cpu/cpu*/cpufreq/stats/time_in_state"),
                  parse=f"cpufreq_{when}", tolerate_failure=True)]
    if when == "before":
        steps.insert(0, Step("device properties", _shell(job, "getprop"), parse="getprop"))
        steps.insert(1, Step("total memory", _shell(job, "cat /proc/meminfo"), parse="meminfo", tolerate_failure=True))
    return steps


def plan(job: AndroidJob, prepared: dict) -> list[Step]:
    """Every adb command of the run, in order: device state, hygiene, pushes, runners, pulls, clean-up."""
    check_backend(job.backend, job.manifest["target"])
    r = job.remote
    steps = device_info_steps(job, "before")
    steps += [Step("work folder", _shell(job, f"rm -rf {r} && mkdir -p {r}/inputs {r}/outputs"))]
    for local, remote in prepared["pushes"]:
        steps.append(Step(f"push {Path(local).name}", _adb(job, "push", str(local), f"{r}/{remote}")))
    for name in sorted(job.runners):
        steps.append(Step(f"push runner {name}", _adb(job, "push", str(job.runners[name]), f"{r}/{name}")))
    if job.runners:
        steps.append(Step("make runners executable",
                          _shell(job, "chmod 755 " + " ".join(f"{r}/{n}" for n in sorted(job.runners)))))
    steps += [Step("device idle: force", _shell(job, "dumpsys deviceidle force-idle"), tolerate_failure=True),
              Step("device idle: release", _shell(job, "dumpsys deviceidle unforce"), tolerate_failure=True),
              Step(f"cool down {job.cooldown_s} s", _shell(job, f"sleep {job.cooldown_s}"))]
    for step in runner_steps(job, prepared):
        steps.append(step)
    steps += device_info_steps(job, "after")
    steps.append(Step("clean up", _shell(job, f"rm -rf {r}"), tolerate_failure=True))
    return steps


def _run(job: AndroidJob, runner: str, args: list[str]) -> str:
    """The device-side command line: pinned to the CPU mask, in the work folder, stderr into stdout."""
    line = " ".join([f"./{runner}", *args])
    return f"cd {job.remote} && LD_LIBRARY_PATH={job.remote} taskset {job.cpu_mask} {line} 2>&1"


def runner_steps(job: AndroidJob, prepared: dict) -> list[Step]:
    r, steps = job.remote, []
    backend = lm_backend(job.backend)
    if job.manifest["target"] == "android":
        if "litert_lm_advanced_main" in job.runners:
            args = [f"--model_path={r}/model.litertlm", f"--backend={backend}",
                    f"--input_prompt_file={r}/inputs/prompt.txt", "--use_session=true", "--async=false",
                    "--benchmark", f"--num_iterations={job.warmup + job.iterations}",
                    "--report_peak_memory_footprint", f"--max_output_tokens={job.decode_tokens}",
                    f"--cache_dir={r}/outputs"]
            if backend == "cpu":
                args.append(f"--num_cpu_threads={job.threads}")
            steps.append(Step("litert_lm_advanced_main", _shell(job, _run(job, "litert_lm_advanced_main", args)),
                              parse="litert_lm"))
        if "benchmark_model" in job.runners:
            for signature in prepared["signatures"]:
                args = [f"--graph={r}/decoder.tflite", f"--signature_to_run_for={signature}",
                        f"--num_runs={job.iterations}", f"--warmup_runs={job.warmup}",
                        "--report_peak_memory_footprint=true", f"--result_file_path={r}/outputs/{signature}.pb"]
                args += ["--use_gpu=true"] if backend == "gpu" else [f"--num_threads={job.threads}"]
                steps.append(Step(f"benchmark_model {signature}", _shell(job, _run(job, "benchmark_model", args)),
                                  parse=f"benchmark_model:{signature}"))
                steps.append(Step(f"pull benchmark_model {signature} result",
                                  _adb(job, "pull", f"{r}/outputs/{signature}.pb",
                                       str(job.work / f"{signature}.pb")),
                                  pull_to=str(job.work / f"{signature}.pb")))
        if "run_model" in job.runners:
            args = [f"--graph={r}/decoder.tflite", f"--signature_index={prepared['prefill_signature_index']}",
                    f"--input_dir={r}/inputs/{prepared['prefill_signature']}", "--print_tensors",
                    "--compare_numerical", f"--sample_size={prepared['logit_count']}",
                    f"--iterations={job.iterations}", f"--accelerator={backend}"]
            steps.append(Step("run_model golden prefill chunk", _shell(job, _run(job, "run_model", args)),
                              parse="run_model"))
    else:  # executorch
        if "executor_runner" in job.runners:
            for method, inputs in prepared["methods"].items():  # the prefill chunk, then one decode step
                args = [f"--model_path={r}/model.pte", f"--data_path={r}/{prepared['ptd']}",
                        f"--method_name={TEXT_DECODER}", "--inputs=" + ",".join(f"{r}/inputs/{f}" for f in inputs),
                        f"--output_file={r}/outputs/{method}", f"--num_executions={job.warmup + job.iterations}",
                        f"--cpu_threads={job.threads}", "--print_output=none"]
                steps.append(Step(f"executor_runner {method}", _shell(job, _run(job, "executor_runner", args)),
                                  parse=f"executor_runner:{method}"))
                steps.append(Step(f"pull executor_runner {method} logits",
                                  _adb(job, "pull", f"{r}/outputs/{method}-0.bin", str(job.work / f"{method}-0.bin")),
                                  pull_to=str(job.work / f"{method}-0.bin")))
    return steps


# --- inputs prepared on the host ------------------------------------------------------------------------------------


def prepare(job: AndroidJob) -> dict:
    """Writes what the runners read into job.work and says what to push: the model files, the rendered golden
    prompt, the decoder graph as a .tflite, and the first prefill chunk of the golden prompt as raw tensors (from the
    bundle's own lookups), with the float reference's logits for it."""
    from runtime_py.components.chat_template import render
    from runtime_py.harness.numerics import load_golden

    job.work.mkdir(parents=True, exist_ok=True)
    manifest, bundle = job.manifest, job.bundle
    golden = load_golden(bundle, manifest)
    T = min(manifest["export_spec"]["prefill_lengths"])
    ids = [int(i) for i in golden["prompt_ids"]][:T]
    out = {"pushes": [], "prefill_signature": prefill_name(T), "chunk_ids": ids}
    if manifest["target"] == "android":
        (job.work / "prompt.txt").write_text(render([{"role": "user", "content": manifest["golden"]["prompt"]}]))
        out["pushes"] += [(bundle / LITERTLM_FILE, LITERTLM_FILE), (job.work / "prompt.txt", "inputs/prompt.txt")]
        if {"benchmark_model", "run_model"} & set(job.runners):
            litert = _prepare_litert(job, ids, T)
            out["pushes"] += litert.pop("pushes")
            out.update(litert)
    else:
        ptd = BundleManifest.of(bundle, manifest).ptd.name
        out["ptd"] = ptd
        out["pushes"] += [(bundle / PTE_FILE, PTE_FILE), (bundle / ptd, ptd)]
        if "executor_runner" in job.runners:
            out.update(_prepare_executorch(job, ids, T))
            out["pushes"] += [(job.work / f, f"inputs/{f}") for files in out["methods"].values() for f in files]
    if {"benchmark_model", "run_model", "executor_runner"} & set(job.runners):
        out["reference_logits"] = reference_chunk_logits(bundle, manifest, ids)
    return out


def _prepare_litert(job: AndroidJob, ids: list[int], T: int) -> dict:
    from ai_edge_litert.interpreter import Interpreter

    from runtime_py.engine import open_bundle
    from runtime_py.executors.litert_executor import litertlm_sections

    spec = job.manifest["export_spec"]
    decoder = litertlm_sections(job.bundle / LITERTLM_FILE)[PREFILL_DECODE_SECTION]
    (job.work / "decoder.tflite").write_bytes(decoder)
    interpreter = Interpreter(model_content=decoder)
    signatures = list(interpreter.get_signature_list())
    signature = prefill_name(T)
    executor = open_bundle(job.bundle, "litert").executor
    arr = np.asarray(ids, np.int64)
    inputs = {"embeddings": executor.embed(arr).astype(np.float32),
              "per_layer_embeddings": executor.per_layer_rows(arr)[None].astype(np.float32),
              "input_pos": np.arange(T, dtype=np.int32), "mask": np.zeros((1, 1, T, spec["cache_len"]), np.float32),
              **{k: v.astype(np.float32) for k, v in executor.cache.items()}}
    folder = job.work / signature
    folder.mkdir(exist_ok=True)
    runner = interpreter.get_signature_runner(signature)
    for name in runner.get_input_details():  # run_model reads <input name>.raw for each signature input
        (folder / f"{name}.raw").write_bytes(np.ascontiguousarray(inputs[name]).tobytes())
    host = runner(**inputs)["logits"].reshape(-1)
    return {"signatures": signatures, "prefill_signature_index": signatures.index(signature),
            "logit_count": int(host.size), "host_logits": host.astype(np.float32),
            "pushes": [(job.work / "decoder.tflite", "decoder.tflite")]
            + [(p, f"inputs/{signature}/{p.name}") for p in sorted(folder.iterdir())]}


def _prepare_executorch(job: AndroidJob, ids: list[int], T: int) -> dict:
    """Raw input files of text_decoder's two runs (the prefill chunk, named as LiteRT's prefill signature, and one
    decode step), in its input order: token_embedding's output, positions."""
    from runtime_py.engine import open_bundle

    executor = open_bundle(job.bundle, "executorch").executor
    methods = {}
    for method, chunk, start in ((prefill_name(T), ids, 0), ("decode", ids[-1:], T)):
        arr = np.asarray(chunk, np.int64)
        tensors = [executor.embeddings(arr).astype(np.float32), np.arange(start, start + len(chunk), dtype=np.int64)]
        names = [f"{method}_{k}.bin" for k in ("embeddings", "input_pos")]
        for name, tensor in zip(names, tensors):
            (job.work / name).write_bytes(np.ascontiguousarray(tensor).tobytes())
        methods[method] = names
    executor.reset()
    arr = np.asarray(ids, np.int64)
    host = executor.prefill(executor.embed(arr), executor.per_layer_rows(arr)[None], 0)
    return {"methods": methods, "host_logits": np.asarray(host, np.float32).reshape(-1),
            "logit_count": int(np.asarray(host).size)}


def reference_chunk_logits(bundle: Path, manifest: dict, ids: list[int]) -> np.ndarray:
    """The float reference model's last-position logits for `ids` from position 0 (one prefill chunk)."""
    import torch

    from runtime_py.engine import reference_model

    model = reference_model(bundle, manifest)
    with torch.no_grad():
        model.setup_caches(manifest["export_spec"]["cache_len"])
        prompt = torch.tensor([ids])
        logits = model.forward_embeddings(model.embed(prompt), model.per_layer_embedding(prompt),
                                          torch.arange(len(ids)), last_position_only=True)
    return logits[0, -1].numpy().astype(np.float32)


# --- running ----------------------------------------------------------------------------------------------------------


class AdbTransport:
    """Runs Steps: the adb binary when there is one, else adbutils (push, pull and shell are all the plan uses)."""

    def __init__(self, adb: str | None = None):
        self.binary = adb or shutil.which("adb")
        self.adbutils = None
        if self.binary is None:
            try:
                import adbutils

                self.adbutils = adbutils.AdbClient()
            except ImportError:
                raise InputError(ADB_MISSING) from None
        elif adb is not None and not Path(adb).is_file() and shutil.which(adb) is None:
            raise InputError(f"--adb {adb}: no such file")

    def devices(self) -> list[dict]:
        if self.adbutils is not None:
            return [{"serial": d.serial, "state": "device"} for d in self.adbutils.device_list()]
        out = subprocess.run([self.binary, "devices", "-l"], capture_output=True, text=True, timeout=60)
        return parsers.parse_adb_devices(out.stdout)

    def run(self, step: Step, timeout: float = 3600) -> tuple[int, str]:
        if self.adbutils is not None:
            return self._run_adbutils(step)
        argv = [self.binary, *step.argv[1:]]
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return 124, f"timed out after {timeout} s"
        return proc.returncode, proc.stdout + proc.stderr

    def _run_adbutils(self, step: Step) -> tuple[int, str]:
        serial, verb, rest = step.argv[2], step.argv[3], step.argv[4:]
        device = self.adbutils.device(serial=serial)
        try:
            if verb == "shell":
                result = device.shell2(rest[0])
                return result.returncode, result.output
            if verb == "push":
                device.sync.push(rest[0], rest[1])
                return 0, ""
            if verb == "pull":
                device.sync.pull(rest[0], rest[1])
                return 0, ""
        except Exception as e:  # adbutils raises its own AdbError subclasses
            return 1, str(e)
        raise InputError(f"adbutils: unsupported adb verb {verb!r}")


def resolve_serial(transport: AdbTransport, serial: str | None) -> str:
    devices = [d for d in transport.devices() if d.get("state") == "device"]
    if serial:
        if serial not in [d["serial"] for d in devices]:
            raise InputError(f"--device android:{serial}: no such device online (adb devices: "
                             f"{', '.join(d['serial'] for d in devices) or 'none'})")
        return serial
    if len(devices) != 1:
        raise InputError(f"--device android: {len(devices)} devices online; name one as android:SERIAL")
    return devices[0]["serial"]


def run_android(job: AndroidJob, transport: AdbTransport, progress=lambda message: None) -> tuple[dict, list[dict]]:
    """Runs the plan; returns (environment_info, result entries)."""
    prepared = prepare(job)
    outputs: dict[str, str] = {}
    for step in plan(job, prepared):
        progress(f"android: {step.what}")
        code, text = transport.run(step)
        if code != 0 and not step.tolerate_failure:
            last = [line for line in text.strip().splitlines() if line.strip()]
            raise InputError(f"adb {step.what} failed (exit {code}): {last[-1] if last else 'no output'}")
        if step.parse:
            outputs[step.parse] = text
    return environment_from(job, outputs), results_from(job, prepared, outputs)


def environment_from(job: AndroidJob, outputs: dict[str, str]) -> dict:
    props = parsers.parse_getprop(outputs.get("getprop", ""))
    thermal = {}
    for when in ("before", "after"):
        try:
            thermal[when] = parsers.parse_thermalservice(outputs.get(f"thermal_{when}", ""))
        except InputError:
            thermal[when] = {"status": None, "reason": "dumpsys thermalservice not readable"}
    mem = [int(x) for x in re.findall(r"^MemTotal:\s+(\d+) kB", outputs.get("meminfo", ""), re.M)]
    return {"platform": "android", "device_id": f"android:{job.serial}",
            "value": {"model": props.get("ro.product.model"), "manufacturer": props.get("ro.product.manufacturer"),
                      "board": props.get("ro.product.board"),
                      "soc": " ".join(filter(None, (props.get("ro.soc.manufacturer"), props.get("ro.soc.model")))),
                      "os_build": props.get("ro.build.fingerprint"),
                      "os_version": props.get("ro.build.version.release"),
                      "total_mem_gb": round(mem[0] / 1024 / 1024, 1) if mem else None,
                      "thermal": {**thermal["before"], "after": thermal["after"]},
                      "cpu_mask": job.cpu_mask, "cooldown_s": job.cooldown_s}}


def results_from(job: AndroidJob, prepared: dict, outputs: dict[str, str]) -> list[dict]:
    """Result entries from the runners' transcripts and pulled files."""
    from runtime_py.harness import numerics
    from runtime_py.harness.record import encoder_fields, percentiles, unavailable

    quant = job.manifest["quantization"]["level"]
    base = {"device": f"android:{job.serial}", "bundle": str(job.bundle), "bundle_target": job.manifest["target"],
            "quantization": quant}
    used = lm_backend(job.backend)
    notes = [NPU_LLM_NOTE] if job.backend == "npu" else []
    results = []

    def entry(runtime: str, performance: dict, numeric: dict | None, fully=None, ops=None, note=""):
        performance = {**performance, **encoder_fields(job.manifest)}
        return {**base, "runtime": {"name": runtime, "version": None, "distribution": "user-supplied binary"},
                "backend": {"requested": job.backend, "used": used, "fully_accelerated": fully,
                            "ops_per_unit": ops or {}, "note": "; ".join(filter(None, notes + [note]))},
                "status": "ok", "performance": performance, "numerics": numeric}

    if "litert_lm" in outputs:
        parsed = parsers.parse_litert_lm_benchmark(outputs["litert_lm"])
        timed = parsed["iterations"][job.warmup:] or parsed["iterations"]
        ttft = [it["time_to_first_token_s"] * 1e3 for it in timed]
        decode = [t for it in timed for t in it["decode_turns"]]
        prefill = [t for it in timed for t in it["prefill_turns"]]
        peaks = [it["peak_mem_mb"] for it in timed if it["peak_mem_mb"]]
        performance = {
            "iterations": len(timed),
            "latency_ms": {"request": percentiles([(p["seconds"] + d["seconds"]) * 1e3 for p, d in zip(prefill, decode)]),
                           "prefill": percentiles([p["seconds"] * 1e3 for p in prefill]),
                           "decode_step": percentiles([d["seconds"] / d["tokens"] * 1e3 for d in decode if d["tokens"]])},
            "time_to_first_token_ms": percentiles(ttft),
            "prefill_tokens_per_s": float(np.median([p["tokens_per_s"] for p in prefill])) if prefill else None,
            "decode_tokens_per_s": float(np.median([d["tokens_per_s"] for d in decode])) if decode else None,
            "peak_memory_mb": {"value": max(peaks) if peaks else None,
                               "what": "LiteRT-LM's peak system RAM (--report_peak_memory_footprint)"},
            "engine_counters": {"source": "litert_lm_advanced_main BenchmarkInfo", "parsed": parsed},
            "decode_step_note": "per iteration: decode turn duration / tokens (the tool reports no per-token times)"}
        golden_tokens = [int(t) for t in numerics.load_golden(job.bundle, job.manifest)["greedy_tokens"]]
        metrics = {"decoder.decode": _greedy_text(job, parsed.get("text") or "", golden_tokens)}
        results.append(entry("LiteRT-LM litert_lm_advanced_main", performance,
                             numerics.numerics_entry(metrics, "litertlm", quant, manifest=job.manifest)))
    signatures = [k.split(":", 1)[1] for k in outputs if k.startswith("benchmark_model:")]
    if signatures:
        per_signature, delegations = {}, {}
        for signature in signatures:
            log = parsers.parse_benchmark_model_log(outputs[f"benchmark_model:{signature}"])
            pb = job.work / f"{signature}.pb"
            proto = parsers.parse_benchmark_result_proto(pb.read_bytes()) if pb.is_file() else None
            per_signature[signature] = {"log": log, "result_proto": proto}
            delegations[signature] = log["delegations"]
        decode = per_signature.get("decode", {})
        lat = (decode.get("result_proto") or {}).get("latency_metrics", {})
        mem = (decode.get("result_proto") or {}).get("memory_metrics", {})
        step = {"samples": [], "count": (decode.get("result_proto") or {}).get("misc_metrics", {}).get("num_runs"),
                "mean": lat.get("avg_ms"), "p50": lat.get("median_ms"), "p90": None, "p99": None,
                "p95": lat.get("p95_ms"), "note": "benchmark_model reports avg, median, p5 and p95, not its samples"}
        performance = {"latency_ms": {"decode_step": step},
                       "time_to_first_token_ms": percentiles([]), "prefill_tokens_per_s": None,
                       "decode_tokens_per_s": 1e3 / lat["median_ms"] if lat.get("median_ms") else None,
                       "peak_memory_mb": {"value": mem.get("peak_mem_mb"), "what": "benchmark_model peak memory"},
                       "per_signature": per_signature}
        prefill = per_signature.get(prepared.get("prefill_signature"), {})
        prefill_lat = (prefill.get("result_proto") or {}).get("latency_metrics", {})
        if prefill_lat.get("median_ms"):
            performance["prefill_tokens_per_s"] = len(prepared["chunk_ids"]) / prefill_lat["median_ms"] * 1e3
        ops = {s: d for s, d in delegations.items()}
        fully = all(d["replaced"] == d["total"] for ds in delegations.values() for d in ds) if any(
            delegations.values()) else None
        results.append(entry("LiteRT benchmark_model", performance, None, fully, ops,
                             note="latency only: benchmark_model feeds random inputs"))
    if "run_model" in outputs:
        parsed = parsers.parse_run_model_output(outputs["run_model"])
        logits = parsers.run_model_tensor(parsed["outputs"][0]).reshape(-1)
        results.append(entry("LiteRT run_model", {
            "latency_ms": {"prefill": {"samples": [], "count": job.iterations, "mean": parsed["average_us"] / 1e3,
                                       "p50": None, "p90": None, "p99": None,
                                       "fastest": parsed["fastest_us"] / 1e3, "slowest": parsed["slowest_us"] / 1e3}},
            "time_to_first_token_ms": percentiles([]), "prefill_tokens_per_s": None, "decode_tokens_per_s": None,
            "peak_memory_mb": unavailable("run_model does not report memory")},
            chunk_numerics(logits, prepared, quant, "litert")))
    methods = [k.split(":", 1)[1] for k in outputs if k.startswith("executor_runner:")]
    if methods:
        logs = {m: parsers.parse_executor_runner_log(outputs[f"executor_runner:{m}"]) for m in methods}
        timed = {m: log["iteration_ms"][job.warmup:] or log["iteration_ms"] for m, log in logs.items()}
        prefill_method = prepared["prefill_signature"]
        decode_ms, prefill_ms = timed.get("decode", []), timed.get(prefill_method, [])
        logits_file = job.work / f"{prefill_method}-0.bin"
        numeric = None
        if logits_file.is_file():
            logits = parsers.read_raw_tensor(logits_file.read_bytes(), (prepared["logit_count"],),
                                             what=str(logits_file))
            numeric = chunk_numerics(logits, prepared, quant, "executorch")
        T = len(prepared["chunk_ids"])
        results.append(entry("ExecuTorch executor_runner", {
            "latency_ms": {"prefill": percentiles(prefill_ms), "decode_step": percentiles(decode_ms)},
            "time_to_first_token_ms": percentiles([p + d for p, d in zip(prefill_ms, decode_ms)]),
            "prefill_tokens_per_s": T / np.median(prefill_ms) * 1e3 if prefill_ms else None,
            "decode_tokens_per_s": 1e3 / np.median(decode_ms) if decode_ms else None,
            "peak_memory_mb": unavailable("executor_runner does not report memory"),
            "ttft_note": "one prefill chunk plus one decode step, each method in its own process"},
            numeric, note=LLAMA_MAIN_NOTE if job.manifest["target"] == "executorch" else ""))
    if not results:
        raise InputError("android: no runner ran; pass at least one of --runner "
                         + ", ".join(f"{n}=PATH" for n in RUNNERS[:4]))
    return results


def chunk_numerics(logits: np.ndarray, prepared: dict, quant: str, backend: str) -> dict:
    """The device's logits for the golden prompt's first prefill chunk against the float reference (the same metrics
    as the host's golden comparison) and against the host running the same graph on the same inputs."""
    from runtime_py.harness import numerics

    metrics = {"decoder.prefill": numerics.position_metrics(prepared["reference_logits"], logits)}
    host = prepared["host_logits"]
    entry = numerics.numerics_entry(metrics, backend, quant)
    entry["reference"] = (f"the golden prompt's first {len(prepared['chunk_ids'])} tokens as one prefill chunk: the "
                          "float reference model's last-position logits")
    entry["device_vs_host_max_abs"] = float(np.abs(logits - host).max())
    return entry


def _greedy_text(job: AndroidJob, text: str, golden_tokens: list[int]) -> dict:
    from runtime_py.compare.metrics import greedy_text_agreement
    from runtime_py.components.tokenizer import Tokenizer

    tokenizer = Tokenizer(job.bundle / job.manifest["tokenizer"]["file"])
    return greedy_text_agreement(text, golden_tokens, job.manifest["tokenizer"]["stop_ids"], tokenizer)


# --- the Tensor NPU: ahead-of-time compilation -------------------------------------------------------------------------


def tensor_sdk_status() -> tuple[bool, str]:
    """Whether Google's Tensor SDK (the compiler libraries ai_edge_litert's Google Tensor plugin loads) is here."""
    import importlib.util
    import os

    if importlib.util.find_spec("ai_edge_litert_sdk_google_tensor") is not None:
        return True, "Tensor SDK: ai_edge_litert_sdk_google_tensor"
    path = os.environ.get("GOOGLE_TENSOR_COMPILER_LIB")
    if path and Path(path).exists():
        return True, f"Tensor SDK: GOOGLE_TENSOR_COMPILER_LIB={path}"
    return False, ("Tensor NPU: Google's Tensor SDK is not installed (its download is gated: "
                   "https://developers.google.com/edge/tensor-sdk; install ai_edge_litert_sdk_google_tensor or set "
                   "GOOGLE_TENSOR_COMPILER_LIB), so nothing was compiled for the NPU")


def aot_compile_tensor(tflite: Path, out: Path, socs=TENSOR_SOCS) -> dict:
    """AOT-compiles a .tflite for each Tensor SoC with ai_edge_litert; per SoC the ops that landed on the NPU."""
    from ai_edge_litert.aot import aot_compile
    from ai_edge_litert.aot.vendors.google_tensor import target as tensor_target

    available, line = tensor_sdk_status()
    if not available:
        raise InputError(line)
    targets = [tensor_target.Target(tensor_target.SocModel(s)) for s in socs]
    result = aot_compile.aot_compile(str(tflite), output_dir=str(out), target=targets, keep_going=True)
    per_soc = {}
    for backend, model in result.models_with_backend:
        stats = model.partition_stats.subgraph_stats if model.partition_stats else []
        per_soc[backend.target_id] = {"ops_on_npu": sum(s.num_ops_offloaded for s in stats),
                                      "ops_total": sum(s.num_total_ops for s in stats),
                                      "partitions": sum(s.num_partitions_offloaded for s in stats)}
    for backend, error in result.failed_backends:
        per_soc[backend.target_id] = {"error": str(error)[:300]}
    return per_soc


def npu_notes(manifest: dict) -> list[str]:
    """What --backend npu means for this bundle, line by line: the SDK, the vision encoder, the language model."""
    from runtime_py.harness.record import NOT_IN_BUNDLE, bundle_encoders

    available, sdk_line = tensor_sdk_status()
    lines = [sdk_line if not available else f"{sdk_line} found"]
    if "vision" not in bundle_encoders(manifest):
        lines.append("Tensor NPU, vision encoder: " + NOT_IN_BUNDLE.format(what="vision encoder")
                     + "; nothing to AOT compile")
    else:
        lines.append("Tensor NPU, vision encoder: in the bundle (sections of model.litertlm); give it as a .tflite "
                     "with --tensor-aot to AOT compile it")
    lines.append("Tensor NPU, language model: " + NPU_LLM_NOTE)
    return lines


def command_lines(steps: list[Step]) -> list[str]:
    """The plan as shell command lines (for the record and for a reader who wants to rerun one step)."""
    return [shlex.join(s.argv) for s in steps]


__all__ = ["AndroidJob", "AdbTransport", "Step", "plan", "prepare", "run_android", "tensor_sdk_status",
           "aot_compile_tensor", "npu_notes", "command_lines"]
