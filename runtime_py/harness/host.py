"""The host device: every backend of the reference runtime that runs on this machine, each measured in a process of
its own (so that its peak memory is its own), on the bundle's golden prompt.

Per backend: load time, numerics against golden.safetensors (teacher-forced, see numerics.py), then `warmup`
untimed and `iterations` timed generations of `decode_tokens` greedy tokens from the golden prompt (stop tokens
ignored, so every iteration decodes the same number of steps): per-iteration request latency, prefill latency and
time to first token, every decode step's latency, prefill and decode tokens/s as `g3n generate`'s timing line
defines them, and the process's peak RSS (VmHWM); for a bundle with encoders, the session's encoders on the golden
media: vision images/s at each image size and the audio real-time factor (measure_encoders). The litertlm backend
is Google's LiteRT-LM engine with its benchmark counters switched on: its own time to first token and prefill/decode
tokens/s are recorded beside ours.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import numpy as np

from contract.bundle import LITERTLM_FILE, PTE_FILE, TARGET_BACKENDS, TEXT_DECODER
from models.errors import InputError
from runtime_py.harness import numerics
from runtime_py.harness.record import encoder_fields, percentiles

RUNTIMES = {  # backend -> (runtime name, the distribution whose version it reports)
    "torch": ("g3n reference runtime: PyTorch eager", "torch"),
    "litert": ("g3n reference runtime: ai_edge_litert Interpreter (XNNPACK)", "ai-edge-litert"),
    "litertlm": ("Google LiteRT-LM engine (litert_lm)", "litert-lm-api"),
    "executorch": ("g3n reference runtime: ExecuTorch runtime (XNNPACK)", "executorch"),
    "coreml": ("g3n reference runtime: coremltools predict", "coremltools"),
    "coreml-mil": ("g3n coreml-mil executor: the package's MIL program op by op in PyTorch (numerics only)",
                   "coremltools"),
}
MIL_NOTE = ("numerics only: the saved MIL program run op by op in PyTorch on the CPU (runtime_py.executors.mil); its "
            "timings are this executor's, not Core ML's")
WORKER_TIMEOUT_S = 1800
ENGINE_ENCODERS = ("Google's LiteRT-LM engine runs its encoders inside generation only; the litert row times the same "
                   ".litertlm sections")


def runtime_of(backend: str) -> dict:
    name, dist = RUNTIMES[backend]
    try:
        version = metadata.version(dist)
    except metadata.PackageNotFoundError:
        version = None
    return {"name": name, "version": version, "distribution": dist}


def plan(bundles: list[tuple[Path, dict]]) -> list[tuple[Path, dict, str]]:
    """(bundle, manifest, backend) for every host backend the bundles give: torch once per reference checkpoint (on
    the first bundle that carries it), then each bundle's own backends."""
    planned, references = [], set()
    for bundle, manifest in bundles:
        key = json.dumps(manifest["reference"]["files"], sort_keys=True)
        if key not in references:
            references.add(key)
            planned.append((bundle, manifest, "torch"))
    for bundle, manifest in bundles:
        planned += [(bundle, manifest, backend) for backend in TARGET_BACKENDS.get(manifest["target"], ())]
    return planned


def run_host(bundles: list[tuple[Path, dict]], settings: dict, thresholds: Path | None = None,
             progress=lambda message: None) -> list[dict]:
    """One result entry per planned backend; each runs in its own worker process."""
    results = []
    for bundle, manifest, backend in plan(bundles):
        progress(f"host: {backend} on {bundle}")
        base = {"device": "host", "bundle": str(bundle), "bundle_target": manifest["target"],
                "runtime": runtime_of(backend), "quantization": manifest["quantization"]["level"]}
        if backend == "coreml" and sys.platform != "darwin":
            results.append({**base, "backend": {"requested": settings["backend"], "used": None},
                            "status": "skipped",
                            "reason": "needs macOS: coremltools cannot run Core ML models on Linux "
                                      "(use --device mac on a Mac)"})
            continue
        # Absolute paths: the worker runs in the repository root (_run_worker), not in the caller's directory.
        job = {"bundle": str(Path(bundle).resolve()), "backend": backend,
               "settings": {**settings, "compute_units": "ALL"} if backend == "coreml" else settings,
               "thresholds": str(Path(thresholds).resolve()) if thresholds else None}
        results.append({**base, **_run_worker(job)})
        if settings.get("cooldown_s"):
            time.sleep(settings["cooldown_s"])
    return results


def _run_worker(job: dict) -> dict:
    root = Path(__file__).resolve().parents[2]
    try:
        proc = subprocess.run([sys.executable, "-m", "runtime_py.harness.host", json.dumps(job)], cwd=root,
                              capture_output=True, text=True, timeout=WORKER_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return {"status": "error", "reason": f"the {job['backend']} worker ran past {WORKER_TIMEOUT_S} s"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        err = [line for line in proc.stderr.strip().splitlines() if line.strip()]
        return {"status": "error", "reason": (err[-1] if err else f"worker exit code {proc.returncode}")[:500]}
    return json.loads(lines[-1])


# --- the worker (runs in its own process) -------------------------------------------------------------------------


def _proc_status_mb(key: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024 * 1024 if sys.platform == "darwin" else 1024)


def measure(job: dict) -> dict:
    from contract.bundle import verify_bundle

    bundle, backend, settings = Path(job["bundle"]), job["backend"], job["settings"]
    manifest = verify_bundle(bundle)
    thresholds = Path(job["thresholds"]) if job.get("thresholds") else None
    rss_before = _proc_status_mb("VmRSS")
    if backend == "litertlm":
        result = _measure_litertlm(bundle, manifest, settings, thresholds)
    else:
        result = _measure_session(bundle, manifest, backend, settings, thresholds)
    result["performance"]["peak_memory_mb"] = {
        "value": _proc_status_mb("VmHWM"), "rss_before_load_mb": rss_before,
        "what": "peak resident set size (VmHWM) of the worker process: Python, the runtime and the model"}
    if "encoders" not in result["performance"]:  # litertlm: Google's engine, no encoder runner here
        result["performance"].update(encoder_fields(manifest, why=ENGINE_ENCODERS))
    result["performance"].update(result["performance"].pop("encoders", {}))
    result["backend"] = {"requested": settings["backend"],
                         **ops_per_unit(bundle, manifest, backend, settings["threads"], settings.get("compute_units"))}
    result["status"] = "ok"
    return result


def _decode_budget(manifest: dict, settings: dict, prompt_len: int) -> int:
    room = manifest["export_spec"]["cache_len"] - prompt_len
    if room < 2:
        raise InputError(f"the golden prompt ({prompt_len} tokens) leaves no room to decode in the cache of "
                         f"{manifest['export_spec']['cache_len']}")
    return min(settings["decode_tokens"], room)


def _measure_session(bundle: Path, manifest: dict, backend: str, settings: dict, thresholds) -> dict:
    if backend == "torch":
        import torch

        torch.set_num_threads(settings["threads"])
    t0 = time.perf_counter()
    if backend == "coreml":
        from runtime_py.harness.apple import coreml_session

        session = coreml_session(bundle, settings["compute_units"])
    else:
        from runtime_py.engine import open_bundle

        session = open_bundle(bundle, backend, settings["threads"])
    return measure_session(session, time.perf_counter() - t0, bundle, manifest, backend, settings, thresholds)


def measure_session(session, load_s: float, bundle: Path, manifest: dict, backend: str, settings: dict,
                    thresholds) -> dict:
    """Numerics against the golden vectors, then the timed generations, on an open Session."""
    golden = numerics.load_golden(bundle, manifest)
    logits = numerics.teacher_forced_logits(session, golden)
    metrics = numerics.logit_metrics(numerics.golden_logits(golden), logits)
    prompt = [int(i) for i in golden["prompt_ids"]]
    n_decode = _decode_budget(manifest, settings, len(prompt))
    session.stop_ids = []  # every iteration decodes the same number of steps
    runs = []
    for i in range(settings["warmup"] + settings["iterations"]):
        stamps, t = [], time.perf_counter()
        for _ in session.generate_ids(prompt, max_new_tokens=n_decode):
            stamps.append(time.perf_counter())
        if i >= settings["warmup"]:
            runs.append((t, stamps, session.timing))
    performance = _performance(runs, load_s)
    runner = getattr(session, "encoders", None)
    measured = measure_encoders(runner, bundle, manifest, settings) if runner is not None else None
    performance["encoders"] = encoder_fields(manifest, measured, why=f"the {backend} session has no encoder runner")
    return {"performance": performance,
            "numerics": numerics.numerics_entry(metrics, backend, manifest["quantization"]["level"], thresholds,
                                                manifest=manifest)}


def measure_encoders(runner, bundle: Path, manifest: dict, settings: dict) -> dict:
    """Vision images/s and the audio real-time factor of a session's encoder runner (runtime_py.executors.base.EncoderRunner)
    on the bundle's golden media: `warmup` untimed and `iterations` timed calls per input. Images/s is 1 / the median
    call at each of the bundle's image sizes, `value` at the default (the first); the real-time factor is the median
    call's seconds per second of audio of one 30 s window (the log-mel features are the golden ones: their
    extraction is not timed)."""
    from contract.bundle import AUDIO_WINDOW_SAMPLES
    from models.audio import SAMPLE_RATE
    from runtime_py.compare import golden_media_inputs

    window_s = AUDIO_WINDOW_SAMPLES / SAMPLE_RATE
    vision, out = {}, {}
    for component, label, size, args in golden_media_inputs(bundle, manifest):
        call = runner.image if component == "vision_encoder" else runner.audio
        for _ in range(settings["warmup"]):
            call(*args)
        samples = []
        for _ in range(settings["iterations"]):
            t = time.perf_counter()
            call(*args)
            samples.append((time.perf_counter() - t) * 1e3)
        latency = percentiles(samples)
        if component == "vision_encoder":
            vision[size] = latency
        else:
            out["audio_real_time_factor"] = {
                "value": latency["p50"] / 1e3 / window_s, "window_s": window_s, "latency_ms": latency,
                "what": "median seconds of compute per second of audio, one 30 s window (log-mel features given)"}
    if vision:
        default = next(iter(vision))
        out["vision_encoder_images_per_s"] = {
            "value": 1e3 / vision[default]["p50"], "size": default,
            "per_size": {str(s): 1e3 / lat["p50"] for s, lat in vision.items()},
            "latency_ms": {str(s): lat for s, lat in vision.items()},
            "what": f"1 / the median call at {default} px (the bundle's default size), batch 1, preprocessed pixels "
                    "given"}
    return out


def _performance(runs, load_s: float, engine=None) -> dict:
    """From (start time, per-token yield times, Timing) of each timed iteration."""
    request = [(stamps[-1] - t) * 1e3 for t, stamps, _ in runs]
    ttft = [timing.time_to_first_token_s * 1e3 for _, _, timing in runs]
    prefill = [timing.prefill_s * 1e3 for _, _, timing in runs]
    steps = [float(d) * 1e3 for _, stamps, _ in runs for d in np.diff(stamps)]
    prefill_tps = [timing.prompt_tokens / timing.prefill_s for _, _, timing in runs if timing.prefill_s]
    decode_tps = [(timing.generated_tokens - 1) / timing.decode_s for _, _, timing in runs
                  if timing.decode_s and timing.generated_tokens > 1]
    timing = runs[-1][2]
    return {
        "iterations": len(runs), "prompt_tokens": timing.prompt_tokens, "decode_tokens": timing.generated_tokens,
        "load_s": load_s,
        "latency_ms": {"request": percentiles(request), "prefill": percentiles(prefill),
                       "decode_step": percentiles(steps)},
        "time_to_first_token_ms": percentiles(ttft),
        "prefill_tokens_per_s": float(np.median(prefill_tps)) if prefill_tps else None,
        "decode_tokens_per_s": float(np.median(decode_tps)) if decode_tps else None,
        **({"engine_counters": engine} if engine is not None else {}),
    }


def _measure_litertlm(bundle: Path, manifest: dict, settings: dict, thresholds) -> dict:
    """Google's engine with benchmarking on: our wall-clock samples and the engine's own BenchmarkInfo per iteration.
    Numerics: the engine returns text, so only greedy agreement is measured (compare.litertlm_greedy)."""
    import tempfile

    import litert_lm

    from runtime_py import compare
    from runtime_py.components.chat_template import render
    from runtime_py.components.timing import Timing
    from runtime_py.components.tokenizer import Tokenizer

    litert_lm.set_min_log_severity(litert_lm.LogSeverity.ERROR)
    cache_dir = Path(tempfile.gettempdir()) / "g3n-litert-lm-cache"  # never inside the bundle
    cache_dir.mkdir(exist_ok=True)
    t0 = time.perf_counter()
    engine = litert_lm.Engine(str(bundle / LITERTLM_FILE),
                              backend=litert_lm.Backend.CPU(thread_count=settings["threads"]),
                              activation_data_type=litert_lm.ActivationDataType.FLOAT32, cache_dir=str(cache_dir),
                              enable_benchmark=True)
    load_s = time.perf_counter() - t0
    text = render([{"role": "user", "content": manifest["golden"]["prompt"]}])
    prompt_tokens = 1 + len(engine.tokenize(text))
    n_decode = _decode_budget(manifest, settings, prompt_tokens)
    runs, counters = [], []
    for i in range(settings["warmup"] + settings["iterations"]):
        session = engine.create_session(apply_prompt_template=False,
                                        sampler_config=litert_lm.SamplerConfig(top_k=1), max_output_tokens=n_decode)
        timing = Timing(prompt_tokens=prompt_tokens, stopped_by="engine")
        t = time.perf_counter()
        session.run_prefill([text])
        timing.prefill_s = time.perf_counter() - t
        stamps, pieces = [], []
        for response in session.run_decode_async():
            stamps.append(time.perf_counter())
            pieces.append(response.texts[0])
        info = session.get_benchmark_info()
        session.close()
        if not stamps:
            raise InputError(f"{bundle}: LiteRT-LM generated nothing from the golden prompt")
        timing.time_to_first_token_s = stamps[0] - t
        timing.decode_s = stamps[-1] - stamps[0]
        # The engine counts the tokens it decoded; re-encoding its text would count differently.
        timing.generated_tokens = info.last_decode_token_count or len(stamps)
        if i >= settings["warmup"]:
            runs.append((t, stamps, timing))
            counters.append({"init_s": info.init_time_in_second, "time_to_first_token_s": info.time_to_first_token_in_second,
                             "prefill_tokens": info.last_prefill_token_count,
                             "prefill_tokens_per_s": info.last_prefill_tokens_per_second,
                             "decode_tokens": info.last_decode_token_count,
                             "decode_tokens_per_s": info.last_decode_tokens_per_second})
    engine_summary = {"source": "litert_lm Session.get_benchmark_info() (the engine's BenchmarkInfo)",
                      "per_iteration": counters,
                      "time_to_first_token_ms_p50": float(np.median([c["time_to_first_token_s"] for c in counters])) * 1e3,
                      "prefill_tokens_per_s_p50": float(np.median([c["prefill_tokens_per_s"] for c in counters])),
                      "decode_tokens_per_s_p50": float(np.median([c["decode_tokens_per_s"] for c in counters]))}
    perf = _performance(runs, load_s, engine_summary)
    perf["token_counts"] = "prompt: our tokenizer on the rendered prompt, plus BOS; generated: the engine's count"
    engine.close()
    golden = numerics.load_golden(bundle, manifest)
    greedy = compare.litertlm_greedy(bundle, manifest, Tokenizer(bundle / manifest["tokenizer"]["file"]),
                                     manifest["golden"]["prompt"], [int(t) for t in golden["greedy_tokens"]],
                                     manifest["tokenizer"]["stop_ids"], settings["threads"])
    metrics = {"decoder.decode": {"greedy": greedy["greedy"], "greedy_count": greedy["greedy_count"]}}
    return {"performance": perf,
            "numerics": numerics.numerics_entry(metrics, "litertlm", manifest["quantization"]["level"], thresholds,
                                                note=compare.LITERTLM_NOTE, manifest=manifest)}


# --- where the ops run ---------------------------------------------------------------------------------------------


def ops_per_unit(bundle: Path, manifest: dict, backend: str, threads: int, compute_units: str | None = None) -> dict:
    if backend == "torch":
        return {"used": "cpu: eager PyTorch (aten kernels)", "fully_accelerated": None,
                "ops_per_unit": {"cpu (aten)": "all"}, "note": "no delegate: the reference runs every op on the CPU"}
    if backend in ("litert", "litertlm"):
        out = litert_delegation(bundle / LITERTLM_FILE, threads)
        if backend == "litertlm":
            out["used"] = "cpu: LiteRT-LM engine (XNNPACK)"
            out["note"] = ("the engine does not report its delegation; counts are of the same .litertlm graphs under "
                           "ai_edge_litert's XNNPACK delegate")
        return out
    if backend == "executorch":
        return executorch_delegation(bundle / PTE_FILE)
    if backend == "coreml":
        from runtime_py.harness.apple import compute_plan_placement

        return compute_plan_placement(bundle, manifest, compute_units)
    if backend == "coreml-mil":
        return {"used": "cpu: eager PyTorch, one MIL op at a time", "fully_accelerated": None,
                "ops_per_unit": {"cpu (aten)": "all"}, "note": MIL_NOTE}
    return {"used": None, "fully_accelerated": None, "ops_per_unit": {}}


def litert_delegation(litertlm: Path, threads: int) -> dict:
    """Ops of each decoder signature that XNNPACK takes and that stay on TFLite's builtin CPU kernels.

    The Python Interpreter lists every node of a subgraph, the delegate's own nodes appended after allocation; an
    original node stayed outside the delegate exactly when a tensor it produces is read outside a delegate partition
    (by a delegate node as input, by a node outside the delegate, or as a subgraph output)."""
    from runtime_py.executors.litert_executor import litertlm_sections, load_interpreter

    sections = litertlm_sections(litertlm)
    interpreter = load_interpreter(sections["prefill_decode"], threads)
    signatures = list(interpreter.get_signature_list())
    subgraph0 = next((s for s in signatures if interpreter._interpreter.GetSubgraphIndexFromSignature(s) == 0), None)
    counts = _delegated_counts(interpreter._get_ops_details(), interpreter._interpreter.OutputIndices())
    return {"used": "cpu: XNNPACK delegate, TFLite builtin kernels for the rest",
            "fully_accelerated": counts["builtin cpu kernels"] == 0,
            "ops_per_unit": {f"{subgraph0 or 'subgraph 0'}": counts},
            "note": "counted on the first subgraph (the Python Interpreter lists one subgraph's nodes)"}


def _delegated_counts(ops: list[dict], graph_outputs) -> dict:
    delegates = [op for op in ops if op["op_name"] == "DELEGATE"]
    originals = [op for op in ops if op["op_name"] != "DELEGATE"]
    if not delegates:
        return {"xnnpack partitions": 0, "xnnpack ops": 0, "builtin cpu kernels": len(originals)}
    delegate_in = {int(t) for op in delegates for t in op["inputs"]}
    delegate_out = {int(t) for op in delegates for t in op["outputs"]}
    outside_readers = (delegate_in - delegate_out) | {int(t) for t in graph_outputs}
    consumers: dict[int, list[int]] = {}
    for i, op in enumerate(originals):
        for t in op["inputs"]:
            consumers.setdefault(int(t), []).append(i)
    kept = set()
    changed = True
    while changed:  # a node is outside the delegate when something outside reads what it writes
        changed = False
        for i, op in enumerate(originals):
            if i in kept or any(int(t) in delegate_out for t in op["outputs"]):
                continue
            if any(int(t) in outside_readers or any(c in kept for c in consumers.get(int(t), []))
                   for t in op["outputs"]):
                kept.add(i)
                changed = True
    return {"xnnpack partitions": len(delegates), "xnnpack ops": len(originals) - len(kept),
            "builtin cpu kernels": len(kept)}


def executorch_delegation(pte: Path) -> dict:
    """Per method of the .pte: calls into delegates (by backend) and the ops left to ExecuTorch's portable kernels."""
    from executorch.exir._serialize._program import deserialize_pte_binary

    program = deserialize_pte_binary(pte.read_bytes())
    program = getattr(program, "program", program)
    per_method = {}
    for plan in program.execution_plan:
        if plan.name != TEXT_DECODER:
            continue
        counts: dict[str, int] = {}
        for chain in plan.chains:
            for instruction in chain.instructions:
                args = instruction.instr_args
                kind = type(args).__name__
                if kind == "DelegateCall":
                    key = f"{plan.delegates[args.delegate_index].id} delegate calls"
                elif kind == "KernelCall":
                    key = "portable kernels"
                else:
                    continue
                counts[key] = counts.get(key, 0) + 1
        per_method[plan.name] = counts
    kernels = sum(c.get("portable kernels", 0) for c in per_method.values())
    return {"used": "cpu: XNNPACK delegate, ExecuTorch portable kernels for the rest", "fully_accelerated": kernels == 0,
            "ops_per_unit": per_method,
            "note": "delegate calls count partitions (the ops inside an XNNPACK blob are not listed in the program)"}


def main(argv: list[str]) -> int:
    job = json.loads(argv[0])
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    result = measure(job)
    print(json.dumps(result, default=float))
    return 0


if __name__ == "__main__":
    from models.errors import G3nError

    try:
        sys.exit(main(sys.argv[1:]))
    except G3nError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
