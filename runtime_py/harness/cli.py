"""`g3n harness run` and `g3n harness history`: wired into runtime_py/cli.py through add_parsers and run.

    g3n harness run --device host|android[:SERIAL]|mac|iphone[:UDID] --bundle DIR [--backend cpu|gpu|npu|ane]
                    [--report DIR]
    g3n harness history --bundle DIR [--device ...]

--bundle is one bundle folder (with manifest.json) or a folder of them (g3n bundle's output: android/, ios/,
executorch/), which then runs every bundle the device can run. User errors raise InputError (one `error:` line,
exit 2, as every g3n command); a run whose numerics fail, or whose backend errored, exits 1.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from models.errors import InputError

DEVICES = ("host", "android", "mac", "iphone")
BACKENDS = ("cpu", "gpu", "npu", "ane")
TARGET_ORDER = ("android", "executorch", "ios")


def add_parsers(sub) -> None:
    """Adds `harness` with its `run` and `history` subcommands to an argparse subparsers object."""
    harness = sub.add_parser("harness", help="on-device validation: numerics and speed of a bundle on a device")
    commands = harness.add_subparsers(dest="harness_command", required=True, metavar="SUBCOMMAND")

    p = commands.add_parser("run", help="run a bundle on a device: record.json, report.md, plots, history")
    p.add_argument("--device", required=True,
                   help="host, android[:SERIAL] (adb), mac (Core ML per compute unit) or iphone[:UDID] (devicectl)")
    p.add_argument("--bundle", type=Path, required=True, help="a bundle folder, or a folder of bundle folders")
    p.add_argument("--backend", help="cpu, gpu, npu (android: the Tensor NPU) or ane (Apple Neural Engine); "
                                     "default: cpu (host, android), every compute unit (mac), all (iphone)")
    p.add_argument("--report", type=Path, help="report folder (must not exist; default out/harness/<device>-<run>)")
    p.add_argument("--iterations", type=int, default=5, help="timed generations per backend")
    p.add_argument("--warmup", type=int, default=1, help="untimed generations before them")
    p.add_argument("--decode-tokens", type=int, default=16, help="greedy tokens decoded per generation")
    p.add_argument("--threads", type=int, help="CPU threads (default: 1 on the host, 4 on a phone)")
    p.add_argument("--cooldown", type=float, help="seconds of cool-down before measuring (default: 0 on the host, "
                                                  "180 on a phone, as ExecuTorch's device farm)")
    p.add_argument("--thresholds", type=Path, help="numerics limits (default: ci/thresholds.json, then the "
                                                   "harness's own)")
    p.add_argument("--history", type=Path, help="history database (default: $G3N_HARNESS_HISTORY or "
                                                "~/.local/share/g3n/harness.sqlite)")
    p.add_argument("--no-history", action="store_true", help="do not append this run to the history")
    p.add_argument("--tolerance", type=float, default=0.10, help="regression tolerance against the previous run")
    p.add_argument("--runner", action="append", default=[], metavar="NAME=PATH",
                   help="android: an arm64 binary of litert_lm_advanced_main, benchmark_model, run_model, "
                        "executor_runner or llama_main (repeatable)")
    p.add_argument("--adb", help="android: the adb binary (default: adb on PATH, else the adbutils library)")
    p.add_argument("--cpu-mask", default="f0", help="android: taskset CPU mask the runners are pinned to")
    p.add_argument("--tensor-aot", type=Path, help="android --backend npu: a .tflite (the vision encoder) to "
                                                   "AOT-compile for Tensor G3/G4/G5 (needs Google's Tensor SDK)")
    p.add_argument("--app", type=Path, help="iphone: the runner app (.app) that writes Documents/g3n-harness/"
                                            "result.json")
    p.add_argument("--app-bundle-id", help="iphone: the runner app's bundle identifier")

    p = commands.add_parser("history", help="a bundle-and-device's trend, flagging a regression against the "
                                            "previous run")
    p.add_argument("--bundle", type=Path, required=True, help="a bundle folder, or a folder of bundle folders")
    p.add_argument("--device", help="only this device (host, android:SERIAL, mac, iphone:UDID)")
    p.add_argument("--history", type=Path, help="history database (default as for run)")
    p.add_argument("--tolerance", type=float, default=0.10, help="regression tolerance between consecutive runs")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")


def run(args) -> int:
    if args.harness_command == "history":
        return _history(args)
    return _run(args)


def parse_device(text: str) -> tuple[str, str | None]:
    kind, _, ident = text.partition(":")
    if kind not in DEVICES or (ident and kind in ("host", "mac")):
        raise InputError(f"--device {text}: expected host, android[:SERIAL], mac or iphone[:UDID]")
    return kind, ident or None


def find_bundles(path: Path) -> list[tuple[Path, dict]]:
    """(folder, verified manifest) of the bundle at `path`, or of every bundle folder directly under it."""
    from contract.bundle import MANIFEST, verify_bundle

    path = Path(path)
    if not path.is_dir():
        raise InputError(f"--bundle {path}: no such directory")
    if (path / MANIFEST).is_file():
        return [(path, verify_bundle(path))]
    found = [(d, verify_bundle(d)) for d in sorted(path.iterdir()) if (d / MANIFEST).is_file()]
    if not found:
        raise InputError(f"--bundle {path}: not a bundle (no manifest.json) and no bundle folders under it")
    return sorted(found, key=lambda b: TARGET_ORDER.index(b[1]["target"]) if b[1]["target"] in TARGET_ORDER else 9)


def _settings(args, device: str) -> dict:
    phone = device in ("android", "iphone")
    for name in ("iterations", "decode_tokens"):
        if getattr(args, name) < 1:
            raise InputError(f"--{name.replace('_', '-')}: expected a positive number, got {getattr(args, name)}")
    if args.warmup < 0:
        raise InputError(f"--warmup: expected 0 or more, got {args.warmup}")
    # One thread on the host by default: reproducible on a shared machine. Eager PyTorch's thread pool collapses
    # when its threads are oversubscribed (2 threads on 2 busy cores: 2.6 decode tok/s; 1 thread: 114).
    threads = args.threads if args.threads is not None else (4 if phone else 1)
    if threads < 1:
        raise InputError(f"--threads: expected a positive number, got {threads}")
    cooldown = args.cooldown if args.cooldown is not None else (180 if phone else 0)
    if cooldown < 0:
        raise InputError(f"--cooldown: expected 0 or more seconds, got {cooldown}")
    return {"iterations": args.iterations, "warmup": args.warmup, "decode_tokens": args.decode_tokens,
            "threads": threads, "cooldown_s": cooldown, "backend": args.backend or _default_backend(device)}


def _default_backend(device: str) -> str:
    return {"host": "cpu", "android": "cpu", "mac": "all", "iphone": "all"}[device]


def _run(args) -> int:
    from rich.console import Console

    from models.fileio import atomic_directory
    from runtime_py.harness import history, record, report

    device, ident = parse_device(args.device)
    if args.backend is not None and args.backend not in BACKENDS:
        raise InputError(f"--backend {args.backend}: expected one of {', '.join(BACKENDS)}")
    if args.tolerance < 0:
        raise InputError(f"--tolerance: expected 0 or more, got {args.tolerance}")
    settings = _settings(args, device)
    bundles = find_bundles(args.bundle)
    rec = record.new_record({}, [record.bundle_info(b, m) for b, m in bundles], settings,
                            ["g3n", "harness", "run", *sys.argv[3:]] if sys.argv[1:3] == ["harness", "run"] else [])
    slug = args.device.replace(":", "-")
    out = args.report or Path("out") / "harness" / f"{slug}-{rec['meta']['run_id'][:8]}"
    history_path = args.history or history.default_path()
    console = Console(stderr=True)
    # Prepared phone inputs and pulled outputs live outside the report: they hold copies of model graphs.
    with atomic_directory(out) as tmp, tempfile.TemporaryDirectory(prefix="g3n-harness-") as work, \
            console.status("harness") as status:
        def progress(message):
            status.update(f"harness: {message}")

        rec["environment_info"], rec["results"], rec["notes"] = _measure(
            device, ident, bundles, settings, args, Path(work), rec["meta"]["run_id"][:8], progress)
        rec["passed"] = bool(rec["results"]) and all(
            r["status"] == "skipped" or (r["status"] == "ok" and (r.get("numerics") is None or r["numerics"]["passed"]))
            for r in rec["results"])
        rec["regressions"] = {}
        if not args.no_history:
            for row in history.rows_of(rec, str(out / "record.json")):
                found = history.regressions(history.previous_ok(history_path, row, rec["meta"]["run_id"])
                                            if Path(history_path).is_file() else None, row, args.tolerance)
                if found:
                    rec["regressions"][f"{row['runtime']} ({row['bundle_target']})"] = found
        report.write(rec, tmp)
    if not args.no_history:
        history.append(history_path, rec, str(out / "record.json"))
    print(report.markdown(rec), end="")
    for series, found in rec["regressions"].items():
        print(f"regression against the previous run: {series}: {'; '.join(found)}", file=sys.stderr)
    print(f"wrote {out} (record.json, report.md, latency.png, throughput.png)"
          + ("" if args.no_history else f"; history {history_path}"), file=sys.stderr)
    return 0 if rec["passed"] else 1


def _measure(device: str, ident: str | None, bundles, settings: dict, args, work: Path, run_id: str, progress):
    """(environment_info, results, notes) for the device."""
    from runtime_py.harness import record

    if device == "host":
        from runtime_py.harness import host

        if settings["backend"] != "cpu":
            raise InputError(f"--backend {settings['backend']}: the host runs the reference runtime's CPU backends "
                             "only (gpu and npu: --device android; gpu and ane: --device mac or iphone)")
        return record.host_environment(), host.run_host(bundles, settings, args.thresholds, progress), []
    if device == "mac":
        from runtime_py.harness import apple, host

        apple.require_macos("mac", "coremltools predictions and MLComputePlan")
        ios = [(b, m) for b, m in bundles if m["target"] == "ios"]
        if not ios:
            raise InputError(f"--bundle {args.bundle}: --device mac runs ios (.mlpackage) bundles; none found")
        results = []
        for units in apple.mac_compute_units(None if settings["backend"] == "all" else settings["backend"]):
            for bundle, manifest in ios:
                progress(f"mac: coreml {units}")
                job = {"bundle": str(bundle), "backend": "coreml", "thresholds": str(args.thresholds or "") or None,
                       "settings": {**settings, "compute_units": units}}
                results.append({"device": "mac", "bundle": str(bundle), "bundle_target": "ios",
                                "runtime": host.runtime_of("coreml"), "quantization": manifest["quantization"]["level"],
                                **host._run_worker(job)})
        env = record.host_environment()
        env["platform"], env["device_id"] = "macos", env["device_id"].replace("host:", "mac:")
        return env, results, []
    if device == "android":
        return _android(ident, bundles, settings, args, work, run_id, progress)
    return _iphone(ident, bundles, settings, args, work, progress)


def parse_runners(items: list[str]) -> dict[str, Path]:
    runners = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not path:
            raise InputError(f"--runner {item}: expected NAME=PATH")
        runners[name] = Path(path)
    from runtime_py.harness.android import check_runners

    check_runners(runners)
    return runners


def _android(serial, bundles, settings, args, work: Path, run_id: str, progress):
    from runtime_py.harness import android

    if settings["backend"] not in ("cpu", "gpu", "npu"):
        raise InputError(f"--backend {settings['backend']}: android runs cpu, gpu or npu")
    runners = parse_runners(args.runner)
    runnable = [(b, m) for b, m in bundles if m["target"] in ("android", "executorch")]
    if not runnable:
        raise InputError(f"--bundle {args.bundle}: no android or executorch bundle to run on android")
    transport = android.AdbTransport(args.adb)  # one error line when neither adb nor adbutils is here
    serial = android.resolve_serial(transport, serial)
    notes, results, env = [], [], None
    if settings["backend"] == "npu":
        notes += android.npu_notes(runnable[0][1])
        if args.tensor_aot is not None:
            per_soc = android.aot_compile_tensor(args.tensor_aot, work / "tensor_aot")
            notes.append(f"Tensor AOT compile of {args.tensor_aot}: {json.dumps(per_soc)}")
    for bundle, manifest in runnable:
        own = {n: p for n, p in runners.items() if n in android.TARGET_RUNNERS[manifest["target"]]}
        if not own:
            notes.append(f"{bundle}: not run (no --runner for {manifest['target']} bundles: "
                         f"{', '.join(android.TARGET_RUNNERS[manifest['target']])})")
            continue
        job = android.AndroidJob(bundle=bundle, manifest=manifest, serial=serial, backend=settings["backend"],
                                 runners=own, work=work / f"android-{manifest['target']}",
                                 run_id=run_id, iterations=settings["iterations"],
                                 warmup=settings["warmup"], decode_tokens=settings["decode_tokens"],
                                 threads=settings["threads"], cpu_mask=args.cpu_mask,
                                 cooldown_s=int(settings["cooldown_s"]), adb=transport.binary or "adb")
        env, found = android.run_android(job, transport, progress)
        results += found
    if not results:
        raise InputError("--device android: no runner for these bundles; pass --runner NAME=PATH with one of "
                         + ", ".join(n for names in android.TARGET_RUNNERS.values() for n in names))
    if "llama_main" in runners:
        notes.append(android.LLAMA_MAIN_NOTE)
    return env, results, notes


def _iphone(udid, bundles, settings, args, work: Path, progress):
    from runtime_py.harness import apple

    apple.require_macos("iphone", "xcrun devicectl and Xcode")
    if args.app is None or not args.app_bundle_id:
        raise InputError("--device iphone: give --app PATH.app (a runner app) and --app-bundle-id ID")
    if udid is None:
        raise InputError("--device iphone: name the device as iphone:UDID (xcrun devicectl list devices)")
    ios = [(b, m) for b, m in bundles if m["target"] == "ios"]
    if not ios:
        raise InputError(f"--bundle {args.bundle}: --device iphone runs ios (.mlpackage) bundles; none found")
    units = apple.COMPUTE_UNITS.get(settings["backend"], "ALL")
    env, results = None, []
    for bundle, manifest in ios:
        job = apple.IphoneJob(bundle=bundle, manifest=manifest, udid=udid, app=args.app, bundle_id=args.app_bundle_id,
                              work=work / "iphone", compute_units=units, iterations=settings["iterations"],
                              warmup=settings["warmup"], decode_tokens=settings["decode_tokens"])
        env, found = apple.run_iphone(job, progress)
        results += found
    return env, results, []


def _history(args) -> int:
    from runtime_py.harness import history
    from contract.bundle import bundle_digest

    if args.device:
        parse_device(args.device)
    if args.tolerance < 0:
        raise InputError(f"--tolerance: expected 0 or more, got {args.tolerance}")
    path = args.history or history.default_path()
    if not Path(path).is_file():
        raise InputError(f"{path}: no harness history yet (g3n harness run writes it)")
    shas = [bundle_digest(b) for b, _ in find_bundles(args.bundle)]
    device_id = _device_id(args.device) if args.device else None
    grouped = history.series(path, shas, device_id)
    if args.json:
        print(json.dumps({" | ".join(k[2:]): v for k, v in grouped.items()}, indent=2))
        return 0
    text, flagged = history.trend_markdown(grouped, args.tolerance)
    print(text, end="" if text.endswith("\n") else "\n")
    if flagged:
        print(f"{flagged} regression(s) in the latest run against the run before it", file=sys.stderr)
    return 1 if flagged else 0


def _device_id(text: str) -> str:
    import platform

    kind, ident = parse_device(text)
    if kind == "host":
        return f"host:{platform.node()}"
    if kind == "mac":
        return f"mac:{platform.node()}"
    if ident is None:
        raise InputError(f"--device {text}: name the device ({kind}:ID) to read its history")
    return f"{kind}:{ident}"


def build_parser() -> argparse.ArgumentParser:
    """A stand-alone `g3n`-like parser with only the harness (tests; the lead wires add_parsers into g3n)."""
    from runtime_py.cli_args import Parser

    parser = Parser(prog="g3n")
    add_parsers(parser.add_subparsers(dest="command", required=True))
    return parser
