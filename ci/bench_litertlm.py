"""Our .litertlm against the .litertlm that litert-torch's own `export_hf` makes of the same checkpoint, both run by
Google's LiteRT-LM engine (`litert_lm`, its own benchmark counters), side by side in one run.

    python ci/bench_litertlm.py [--work DIR] [--quant int8,none] [--repeats 3] [--threads 2] [--report DIR]

The model is E2B-shaped at a width that converts in minutes (the speed issue's scaled model): 30 layers of which 10
KV-shared, 4:1 sliding/global, sparsity on the first 10, hidden 512, FFN 2048, 8 heads / 2 KV heads of 64, PLE width
64, vocabulary 65,536, sliding window 512 (280M parameters), every parameter random, bf16, with a SentencePiece
tokenizer of 65,536 pieces (models.random_init.widened_tokenizer). Both exports: prefill 128, cache 1024, the
same int8 recipe (ai-edge-quantizer's dynamic_wi8_afp32; ours: --quant int8-dynamic) or float.

Per contender and quantization: export wall time and peak RSS of the exporting process tree (sampled every 0.1 s),
file bytes; then, interleaved over --repeats rounds after one warm-up run (which builds each file's XNNPACK weight
cache), each in a fresh process: prefill and decode tokens/s (128 prompt tokens, 64 decoded), time to first token,
and the process's peak RSS. Ratios are ours / export_hf (speed: > 1 is faster; memory: < 1 is smaller). Only ratios
from one run mean anything: absolute figures on this machine move by 2x from day to day.

export_hf needs three workarounds here (export_hf below): a `tensorflow.lite.python.schema_py_generated` module that
re-exports ai_edge_litert's (TensorFlow is not installed), the activation-sparsity multiplier that transformers 5
leaves at 0, and its Gemma 3n patches imported before its entry module.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PREFILL, DECODE_TOKENS, CACHE = 128, 64, 1024
RECIPES = {"int8": ("int8-dynamic", "dynamic_wi8_afp32"), "none": ("none", "none")}
# (measure, goal of the ratio ours / export_hf, higher is better): the speed issue's goals; None: reported only.
GOALS = (("prefill_tok_s", 1.0, True), ("decode_tok_s", 1.0, True), ("peak_rss_mib", 0.8, False),
         ("export_peak_rss_mib", 0.5, False), ("ttft_s", 1.0, False), ("export_seconds", None, False),
         ("export_bytes", None, False))


def scaled_e2b():
    from models.config import E2B

    return replace(E2B, vocab_size=65536, vocab_size_per_layer_input=65536, hidden_size=512,
                   hidden_size_per_layer_input=64, ffn_widths=(2048,) * 30, num_heads=8, num_kv_heads=2, head_dim=64,
                   laurel_rank=64, sliding_window=512)


def write_checkpoint(path: Path) -> None:
    import torch

    from models.checkpoint import save_pretrained
    from models.random_init import randomise_, widened_tokenizer
    from models.text import TextDecoder

    cfg = scaled_e2b()
    model = TextDecoder(cfg)
    randomise_(model, seed=0)
    save_pretrained(model.to(torch.bfloat16), path)
    (path / "tokenizer.model").write_bytes(widened_tokenizer(cfg.vocab_size))


# --- measuring a child process tree ---------------------------------------------------------------------------------


def _tree_rss_kib(root: int) -> int:
    """Resident KiB of `root` and every descendant (converters spawn workers)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        todo.extend(children.get(pid, []))
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total


def run_measured(cmd: list[str], log: Path) -> dict:
    """Runs cmd (output to log); returns wall seconds, peak RSS of its process tree (MiB) and its stdout's last line."""
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=out, text=True)
        peak = [0]

        def sample():
            while proc.poll() is None:
                peak[0] = max(peak[0], _tree_rss_kib(proc.pid))
                time.sleep(0.1)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        stdout, _ = proc.communicate()
        sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"error: {' '.join(cmd[:4])} ... failed (exit {proc.returncode}); see {log}")
    lines = stdout.strip().splitlines()
    return {"seconds": time.perf_counter() - start, "peak_rss_mib": peak[0] / 1024, "last": lines[-1] if lines else ""}


# --- the two exporters and the engine, each run as a child process ---------------------------------------------------


def export_hf(checkpoint: str, out: str, recipe: str) -> None:
    """litert-torch's export_hf with this environment's three workarounds."""
    import statistics as stats
    import tempfile

    with tempfile.TemporaryDirectory(prefix="tf-shim-") as tmp:
        # export_hf imports TensorFlow's copy of the TFLite schema; TensorFlow is not installed, ai_edge_litert has
        # the same module. A package on disk (torch looks tensorflow up with find_spec: a bare module object fails).
        package = Path(tmp) / "tensorflow" / "lite" / "python"
        package.mkdir(parents=True)
        for folder in (package.parents[1], package.parent, package):
            (folder / "__init__.py").write_text("")
        (package / "schema_py_generated.py").write_text("from ai_edge_litert.schema_py_generated import *  # noqa\n")
        sys.path.insert(0, tmp)
        import torch
        from litert_torch.generative.export_hf.model_ext.gemma3n import patch

        def gaussian_topk(self, inputs):  # its _std_multiplier buffer is left at 0 by transformers 5's loading
            multiplier = stats.NormalDist().inv_cdf(self.activation_sparsity)
            cutoff = inputs.mean(-1, keepdim=True) + inputs.std(-1, keepdim=True, unbiased=False) * multiplier
            return torch.relu(inputs - cutoff)

        patch.Gemma3nTextMLP._gaussian_topk = gaussian_topk
        # Imported after the Gemma 3n patches: the other order stops in transformers' kernel-hub decorator
        # ("apply_rotary_pos_emb is not decorated with @use_kernel_forward_from_hub").
        from litert_torch.generative.export_hf import export as lib

        lib.export(checkpoint, out, prefill_lengths=[PREFILL], cache_length=CACHE, quantization_recipe=recipe)


def engine(path: str, threads: int, cache_dir: str) -> None:
    """One LiteRT-LM benchmark run; prints its counters and this process's peak RSS as JSON."""
    from litert_lm import benchmark, interfaces

    info = benchmark.Benchmark(
        model_path=path, backend=interfaces.CPU(thread_count=threads), prefill_tokens=PREFILL,
        decode_tokens=DECODE_TOKENS, max_num_tokens=CACHE, cache_dir=cache_dir,
    ).run()
    print(json.dumps({
        "prefill_tok_s": info.last_prefill_tokens_per_second, "decode_tok_s": info.last_decode_tokens_per_second,
        "decoded": info.last_decode_token_count, "ttft_s": info.time_to_first_token_in_second,
    }))


# --- the run ---------------------------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("out/bench-litertlm"), help="checkpoint and exports (kept)")
    parser.add_argument("--quant", default="int8,none", help="int8 and/or none")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--report", type=Path, help="folder for bench.json and bench.md (default: --work)")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, *rest = args.child
        if kind == "export_hf":
            export_hf(*rest)
        else:
            engine(rest[0], int(rest[1]), rest[2])
        return 0

    quants = [q for q in args.quant.split(",") if q]
    for q in quants:
        if q not in RECIPES:
            print(f"error: --quant: {q!r} is not one of {', '.join(RECIPES)}", file=sys.stderr)
            return 2
    work, report = args.work, args.report or args.work
    work.mkdir(parents=True, exist_ok=True)
    report.mkdir(parents=True, exist_ok=True)
    checkpoint = work / "checkpoint"
    if not checkpoint.exists():
        print("writing the scaled E2B-shaped checkpoint ...", flush=True)
        write_checkpoint(checkpoint)
    me = [sys.executable, str(Path(__file__).resolve())]
    g3n = str(Path(sys.executable).with_name("g3n"))

    exports = {}
    for q in quants:
        ours_quant, hf_recipe = RECIPES[q]
        for who, out, cmd in (
            ("ours", work / f"ours-{q}", [g3n, "export", "--checkpoint", str(checkpoint), "--target", "litert",
                                         "--quant", ours_quant, "--text-only", "--cache-len", str(CACHE),
                                         "--prefill-lengths", str(PREFILL)]),
            ("export_hf", work / f"export_hf-{q}", me + ["--child", "export_hf", str(checkpoint)]),
        ):
            model, measured = out / "model.litertlm", work / f"export-{who}-{q}.json"
            if not model.exists() or not measured.exists():
                print(f"exporting {who} {q} ...", flush=True)
                shutil.rmtree(out, ignore_errors=True)
                full = cmd + ["--out", str(out)] if who == "ours" else cmd + [str(out), hf_recipe]
                stats = run_measured(full, work / f"export-{who}-{q}.log")
                measured.write_text(json.dumps({"seconds": stats["seconds"], "peak_rss_mib": stats["peak_rss_mib"],
                                                "bytes": model.stat().st_size}))
            exports[(who, q)] = json.loads(measured.read_text())

    runs: dict[tuple[str, str], list[dict]] = {key: [] for key in exports}
    for round_ in range(args.repeats + 1):  # round 0 warms up: builds each file's XNNPACK weight cache
        for (who, q) in exports:
            model = work / f"{who}-{q}" / "model.litertlm"
            cache_dir = work / f"xnnpack-cache-{who}-{q}"
            cache_dir.mkdir(exist_ok=True)
            print(f"engine round {round_}/{args.repeats}: {who} {q}", flush=True)
            m = run_measured(me + ["--child", "engine", str(model), str(args.threads), str(cache_dir)],
                             work / f"engine-{who}-{q}.log")
            if round_:
                runs[(who, q)].append(json.loads(m["last"]) | {"peak_rss_mib": m["peak_rss_mib"]})

    rows = []
    for (who, q), rs in runs.items():
        med = {k: statistics.median(r[k] for r in rs) for k in ("prefill_tok_s", "decode_tok_s", "ttft_s",
                                                                  "peak_rss_mib")}
        rows.append({"exporter": who, "quant": q, **med, "runs": rs, **{f"export_{k}": v for k, v in
                                                                         exports[(who, q)].items()}})
    ratios = []
    for q in quants:
        ours = next(r for r in rows if r["exporter"] == "ours" and r["quant"] == q)
        hf = next(r for r in rows if r["exporter"] == "export_hf" and r["quant"] == q)
        ratio = {"quant": q}
        for key, goal, higher in GOALS:
            if key in ours and key in hf:
                value = ours[key] / hf[key]
                ratio[key] = {"ratio": value, "goal": goal,
                              "met": None if goal is None else (value >= goal if higher else value <= goal)}
        ratios.append(ratio)
    result = {"date": time.strftime("%Y-%m-%d"), "model": "scaled E2B-shaped, 280M parameters", "threads":
              args.threads, "prefill_tokens": PREFILL, "decode_tokens": DECODE_TOKENS, "cache": CACHE,
              "repeats": args.repeats, "rows": rows, "ratios": ratios}
    (report / "bench.json").write_text(json.dumps(result, indent=2) + "\n")
    md = markdown(result)
    (report / "bench.md").write_text(md)
    print(md)
    return 0


def markdown(result: dict) -> str:
    lines = [(f"LiteRT-LM engine, {result['model']}, {result['threads']} threads, prefill {result['prefill_tokens']} "
              f"/ decode {result['decode_tokens']} tokens, cache {result['cache']}, median of {result['repeats']} "
              f"interleaved runs ({result['date']})"), "",
             ("| exporter | quant | prefill tok/s | decode tok/s | TTFT ms | run peak RSS MiB | export s | "
              "export peak RSS MiB | file MB |"), "|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['exporter']} | {r['quant']} | {r['prefill_tok_s']:.0f} | {r['decode_tok_s']:.1f} | "
                     f"{r['ttft_s'] * 1e3:.0f} | {r['peak_rss_mib']:.0f} | {r['export_seconds']:.0f} | "
                     f"{r['export_peak_rss_mib']:.0f} | {r['export_bytes'] / 1e6:.0f} |")
    lines += ["", "| quant | ratio ours / export_hf | value | goal | met |", "|---|---|---|---|---|"]
    for ratio in result["ratios"]:
        for key, v in ratio.items():
            if key != "quant":
                goal = "" if v["goal"] is None else f"{'>=' if key.endswith('tok_s') else '<='} {v['goal']}"
                met = "" if v["met"] is None else ("yes" if v["met"] else "**no**")
                lines.append(f"| {ratio['quant']} | {key} | {v['ratio']:.2f}x | {goal} | {met} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
