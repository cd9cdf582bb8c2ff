"""g3n bench: our exports against the field, measured side by side in one run; every row a ratio against its
reference (so that it stays meaningful on a noisy machine), with the speed issue's goal beside it.

Rows (--only takes their names):
    litertlm      our .litertlm against litert-torch's own export_hf .litertlm of the same checkpoint, both run by
                  Google's LiteRT-LM engine (its own benchmark counters), int8 and float: prefill and decode
                  tokens/s (>= 1.0x), run peak RSS (<= 0.8x), export peak RSS (<= 0.5x)
    ttft          time to first token on prompts of 16, 64 and 256 tokens, the same two files (<= 1.0x)
    kv-shared     KV-shared prefill against full prefill of the same model on torch, litert, executorch (>= 1.4x)
    roofline      decode against the memory roofline: bytes read per decoded token (weights touched at their stored
                  width, and the KV caches the graph reads) x tokens/s, as a share of this machine's read bandwidth
                  measured in the same rounds (>= 80% on int8)
    transformers  our best decode (the engine on our .litertlm, our runtime's executorch backend) against
                  transformers' eager generate on the same checkpoint (>= 3x)
    slice         the E2B slice of the E4B-shaped twin against the twin, decode in the engine (>= 1.8x)
    ple           the share of the PLE table resident after a 256-token prompt of distinct ids (<= 2%): the engine on
                  our .litertlm (its per_layer_embedder section), our runtime on the executorch .ptd
    vision, audio the published-size encoders, float and int8, on litert and executorch against timm's and
                  transformers' eager float encoders (vision int8 >= 2.5x, float >= 1.3x; audio int8 >= 2x)

Every process-level measurement (engine runs, transformers, executorch, the bandwidth probe) is a fresh child
process (runtime_py.bench.children), all of them interleaved over --repeats rounds after a warm-up round, medians
reported; in-process rows (kv-shared, vision, audio) interleave their contenders the same way. Every contender gets
--threads threads.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

from exporters import memo
from models.errors import InputError
from models.fileio import drop_from_page_cache
from runtime_py.bench.measure import cpu_name, run_measured
from runtime_py.bench.subjects import CHILD, PRESETS, Preset, Work

ROWS = ("litertlm", "ttft", "kv-shared", "roofline", "transformers", "slice", "ple", "vision", "audio")
QUANTS = {"int8": ("int8-dynamic", "dynamic_wi8_afp32"), "none": ("none", "none")}  # ours, export_hf
BYTES_PER_WEIGHT = {"int8": 1, "none": 4, "8da8w": 1}
GOALS = {  # row, measure -> (goal, higher is better)
    ("litertlm", "prefill_tok_s"): (1.0, True), ("litertlm", "decode_tok_s"): (1.0, True),
    ("litertlm", "peak_rss_mib"): (0.8, False), ("litertlm", "export_peak_rss_mib"): (0.5, False),
    ("ttft", "ttft_s"): (1.0, False), ("kv-shared", "speedup"): (1.4, True), ("roofline", "share"): (0.8, True),
    ("transformers", "decode_tok_s"): (3.0, True), ("slice", "decode_tok_s"): (1.8, True),
    ("ple", "resident"): (0.02, False), ("vision", "none"): (1.3, True), ("vision", "int8"): (2.5, True),
    ("audio", "int8"): (2.0, True),
}


@dataclass
class Options:
    report: Path
    work: Path
    preset: str = "scaled-e2b"
    checkpoint: Path | None = None
    only: tuple[str, ...] = ROWS
    repeats: int = 3
    threads: int = 2
    quick: bool = False
    progress: object = print


@dataclass
class Bench:
    options: Options
    preset: Preset
    work: Work
    rows: list[dict] = field(default_factory=list)
    details: dict = field(default_factory=dict)
    jobs: dict = field(default_factory=dict)  # key -> (cmd, file to evict from the page cache first or None)
    encoder_env: dict | None = None  # the encoder rows' child's environment (None: this process's)

    def row(self, row: str, case: str, measure: str, ours: float, reference: float, unit: str, ratio: float,
            contender: str, against: str, goal_key: tuple | None = None, note: str = "") -> None:
        goal, higher = GOALS.get(goal_key or (row, measure), (None, True))
        self.rows.append({"row": row, "case": case, "measure": measure, "ours": ours, "reference": reference,
                          "unit": unit, "ratio": ratio, "contender": contender, "against": against, "goal": goal,
                          "higher_is_better": higher, "note": note,
                          "met": None if goal is None else bool(ratio >= goal if higher else ratio <= goal)})


def run(options: Options) -> dict:
    unknown = [r for r in options.only if r not in ROWS]
    if unknown:
        raise InputError(f"--only: unknown row {unknown[0]!r} (rows: {', '.join(ROWS)})")
    if options.repeats < 1 or options.threads < 1:
        raise InputError("--repeats and --threads: expected positive numbers")
    # Every export is timed as a user's would run: never a copy from a conversion memo (exporters.memo). --quick's
    # encoder rows time no export, so their child keeps the memo (in CI: the encoder tests' sections, copied).
    memo_folder = os.environ.pop(memo.ENV, None)
    preset = PRESETS["tiny" if options.quick else options.preset]
    bench = Bench(options, preset, Work(options.work, preset, options.checkpoint, options.progress))
    bench.encoder_env = {**os.environ, memo.ENV: memo_folder} if options.quick and memo_folder else None
    t0 = time.perf_counter()
    only = set(options.only)
    if only & {"litertlm", "ttft", "roofline", "transformers", "slice", "ple"}:
        _process_rows(bench, only)
    if "kv-shared" in only:
        _kv_shared_rows(bench)
    if only & {"vision", "audio"}:
        _encoder_rows(bench, only)
    order = {name: i for i, name in enumerate(ROWS)}
    bench.rows.sort(key=lambda r: order[r["row"]])
    return {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": f"{platform.machine()}, {cpu_name()}",
            "model": options.checkpoint and str(options.checkpoint) or preset.description,
            "threads": options.threads, "repeats": options.repeats, "prefill_tokens": preset.prefill,
            "decode_tokens": preset.decode, "cache": preset.cache, "seconds": round(time.perf_counter() - t0),
            "rows": bench.rows, "details": bench.details}


# --- rows measured in child processes, all in the same interleaved rounds ---------------------------------------------


def _process_rows(bench: Bench, only: set[str]) -> None:
    o, p, work = bench.options, bench.preset, bench.work
    # The TTFT row runs the int8 files only.
    quants = ("int8",) if o.quick or not only & {"litertlm", "roofline", "transformers"} else ("int8", "none")
    # --quick lowers ExecuTorch float: its 8da8w lowering of even the 4-layer model took 6.5 of make long's minutes.
    et_quant = "none" if o.quick else "8da8w"
    et = f"executorch {et_quant}"
    threads, cache = str(o.threads), str(p.cache)
    ids = distinct_ids(p.ple_prompt, p.config.vocab_size_per_layer_input)
    exports: dict[str, dict] = {}

    def engine_job(key, model, prefill, decode):
        xnn = work.folder / f"xnnpack-{Path(model).parent.name}"
        xnn.mkdir(exist_ok=True)
        bench.jobs[key] = (CHILD + ["engine", model, threads, str(xnn), str(prefill), str(decode), cache], None)

    if only & {"litertlm", "ttft", "roofline", "transformers"}:
        for q in quants:
            for who in ("ours", "export_hf"):
                exports[f"{who} {q}"] = work.export(who, "litert", QUANTS[q][0 if who == "ours" else 1])
                engine_job(f"{who} {q}", exports[f"{who} {q}"]["model"], p.prefill, p.decode)
    if "ttft" in only:
        for n in p.ttft_prompts:
            for who in ("ours", "export_hf"):
                engine_job(f"ttft {n} {who}", exports[f"{who} int8"]["model"], n, 4)
    if only & {"ple", "transformers", "roofline"}:
        ex = exports[et] = work.export("ours", "executorch", et_quant)
        pte = Path(ex["model"])
        ptd = pte.with_name("per_layer_embeddings.ptd")
        bench.jobs[et] = (CHILD + ["executorch", str(pte), str(ptd), cache, str(p.prefill),
                                                   str(p.decode), json.dumps(ids[: p.prefill])], ptd)
    if "ple" in only:
        ours = exports.get("ours int8") or work.export("ours", "litert", "int8-dynamic")
        xnn = work.folder / f"xnnpack-{Path(ours['model']).parent.name}"
        xnn.mkdir(exist_ok=True)
        text = _prompt_text(work.checkpoint() / "tokenizer.model", ids)
        bench.jobs["ple litertlm"] = (CHILD + ["engine-ple", ours["model"], threads, str(xnn), cache, text],
                                      Path(ours["model"]))
        bench.jobs["ple executorch"] = (CHILD + ["executorch", str(pte), str(ptd), cache, str(len(ids)), "1",
                                                 json.dumps(ids)], ptd)
    if "transformers" in only:
        bench.jobs["transformers"] = (CHILD + ["transformers", str(work.checkpoint()), threads, str(p.prefill),
                                               str(p.decode)], None)
    if "roofline" in only:
        bench.jobs["bandwidth"] = (CHILD + ["bandwidth", threads], None)
    if "slice" in only:
        for name in ("twin", "slice"):
            exports[f"slice {name}"] = work.export("ours", "litert", "int8-dynamic", name)
            engine_job(f"slice {name}", exports[f"slice {name}"]["model"], p.prefill, p.decode)

    measured = _rounds(bench)
    bench.details["exports"] = {k: {f: v[f] for f in ("seconds", "peak_rss_mib", "bytes")} for k, v in exports.items()}
    bench.details["runs"] = measured
    if "litertlm" in only:
        for q in quants:
            ours, hf = measured[f"ours {q}"], measured[f"export_hf {q}"]
            for measure, unit in (("prefill_tok_s", "tok/s"), ("decode_tok_s", "tok/s"), ("peak_rss_mib", "MiB")):
                bench.row("litertlm", q, measure, ours[measure], hf[measure], unit, ours[measure] / hf[measure],
                          "our .litertlm", "export_hf .litertlm")
            e_ours, e_hf = exports[f"ours {q}"], exports[f"export_hf {q}"]
            bench.row("litertlm", q, "export_peak_rss_mib", e_ours["peak_rss_mib"], e_hf["peak_rss_mib"], "MiB",
                      e_ours["peak_rss_mib"] / e_hf["peak_rss_mib"], "g3n export", "export_hf")
            bench.row("litertlm", q, "export_seconds", e_ours["seconds"], e_hf["seconds"], "s",
                      e_ours["seconds"] / e_hf["seconds"], "g3n export", "export_hf")
            bench.row("litertlm", q, "file_bytes", e_ours["bytes"], e_hf["bytes"], "bytes",
                      e_ours["bytes"] / e_hf["bytes"], "our .litertlm", "export_hf .litertlm")
    if "ttft" in only:
        for n in p.ttft_prompts:
            ours, hf = measured[f"ttft {n} ours"]["ttft_s"], measured[f"ttft {n} export_hf"]["ttft_s"]
            bench.row("ttft", f"int8, {n}-token prompt", "ttft_s", ours * 1e3, hf * 1e3, "ms", ours / hf,
                      "our .litertlm", "export_hf .litertlm")
    if "roofline" in only:
        bandwidth = measured["bandwidth"]["bytes_per_s"]
        for key, quant in [(f"{who} {q}", q) for q in quants for who in ("ours", "export_hf")] + \
                [(et, et_quant)]:
            per_token = decode_bytes(p.config, quant, p.cache)
            achieved = per_token * measured[key]["decode_tok_s"]
            bench.row("roofline", key, "share", achieved / 1e9, bandwidth / 1e9, "GB/s", achieved / bandwidth,
                      key.replace("ours", "engine, our .litertlm").replace("export_hf", "engine, export_hf .litertlm")
                      .replace(et, f"our runtime, {et}"), "memory read bandwidth",
                      goal_key=("roofline", "share") if quant != "none" else ("-", "-"),
                      note=f"{per_token / 1e6:.1f} MB per token")
    if "transformers" in only:
        candidates = {k: measured[k]["decode_tok_s"] for k in measured if k in
                      {f"ours {q}" for q in quants} | {et}}
        best = max(candidates, key=candidates.get)
        ref = measured["transformers"]["decode_tok_s"]
        name = f"our runtime, {et}" if best == et else best.replace("ours", "engine, our .litertlm")
        bench.row("transformers", "best backend", "decode_tok_s", candidates[best], ref, "tok/s",
                  candidates[best] / ref, name, "transformers eager generate (float32)")
        for key, value in candidates.items():
            if key != best:
                bench.row("transformers", key, "decode_tok_s", value, ref, "tok/s", value / ref, key,
                          "transformers eager generate (float32)", goal_key=("-", "-"))
    if "slice" in only:
        twin, sliced = measured["slice twin"]["decode_tok_s"], measured["slice slice"]["decode_tok_s"]
        bench.row("slice", "int8, engine", "decode_tok_s", sliced, twin, "tok/s", sliced / twin, "the slice",
                  "the model it is sliced from", note="E2B slice of the E4B-shaped twin" if p.twin else
                  f"FFN {p.slice_ffn}, layers {list(p.slice_skip)} skipped")
    if "ple" in only:
        for key in ("ple litertlm", "ple executorch"):
            share = measured[key]["ple_resident_share"]
            bench.row("ple", key.split()[1], "resident", share, 1.0, "share", share,
                      f"{len(ids)}-token prompt", "the whole table")


def _rounds(bench: Bench) -> dict[str, dict]:
    """Every job once per round, round 0 a warm-up (it builds each file's XNNPACK weight cache); medians of each
    numeric field over the other rounds, and each run's peak RSS of its process tree."""
    o = bench.options
    runs: dict[str, list[dict]] = {key: [] for key in bench.jobs}
    for round_ in range(o.repeats + 1):
        for i, (key, (cmd, evict)) in enumerate(bench.jobs.items()):
            o.progress(f"round {round_}/{o.repeats} ({'warm-up' if round_ == 0 else 'timed'}): {key} "
                       f"[{i + 1}/{len(bench.jobs)}]")
            if evict is not None:
                drop_from_page_cache(evict)
            m = run_measured(cmd, bench.work.folder / f"run-{key.replace(' ', '-')}.log")
            if round_:
                runs[key].append(json.loads(m["last"]) | {"peak_rss_mib": m["peak_rss_mib"]})
    return {key: {f: statistics.median(r[f] for r in rs) for f in rs[0]} for key, rs in runs.items()}


def distinct_ids(n: int, vocab: int) -> list[int]:
    """n distinct ids spread over the table, as a prompt's tokens are (past the first 300, Gemma's special pieces,
    where the table allows)."""
    import numpy as np

    low = min(300, max(vocab - 2 * n, 0))
    return sorted(int(i) for i in np.random.default_rng(0).choice(np.arange(low, vocab), n, replace=False))


def _prompt_text(tokenizer: Path, ids: list[int]) -> str:
    """Text that the tokenizer encodes back to ids (Google's engine takes text only; its benchmark mode pads the
    prompt with id 0, which would touch one row): each id decoded alone, so that the widened tokenizer's
    placeholders come out as their `<w{id}>` pieces."""
    import sentencepiece as spm

    processor = spm.SentencePieceProcessor(model_file=str(tokenizer))
    return "".join(processor.id_to_piece(i) if processor.is_unknown(i) is False and processor.id_to_piece(i)
                   .startswith("<w") else processor.decode([i]) for i in ids)


def decode_bytes(cfg, quant: str, cache: int) -> float:
    """Bytes one decode step reads: every weight of the decoder graph at its stored width (the LM head is the tied
    embedding: vocab x hidden; the PLE table and the embedding lookups read one row, left out), and the KV cache
    every layer attends over, float32, at the graph's static cache length (KV-shared layers read their source's)."""
    import torch

    from models.text import TextDecoder

    with torch.device("meta"):
        model = TextDecoder(cfg)
    weights = sum(p.numel() for name, p in model.named_parameters() if not name.startswith("per_layer_embedding."))
    kv = cfg.num_layers * 2 * cache * cfg.num_kv_heads * cfg.head_dim * 4
    return weights * BYTES_PER_WEIGHT[quant] + kv


def kv_shared_ceiling(cfg, tokens: int) -> float:
    """The speed-up KV-shared prefill would reach if time followed weights x positions: the full graph runs every
    layer and the LM head (the exporter's full prefill returns every position's logits) on every position, the
    KV-shared one the cache-writing layers on every position and the rest, head included, on the last."""
    import torch

    from models.text import TextDecoder

    with torch.device("meta"):
        model = TextDecoder(cfg)
    layers = [sum(p.numel() for p in layer.parameters()) for layer in model.layers]
    head = cfg.vocab_size * cfg.hidden_size
    own = cfg.first_kv_shared_layer
    return (sum(layers) + head) * tokens / (sum(layers[:own]) * tokens + sum(layers[own:]) + head)


# --- rows measured in this process -----------------------------------------------------------------------------------


def _kv_shared_rows(bench: Bench) -> None:
    o, p = bench.options, bench.preset
    o.progress("kv-shared prefill: torch, litert, executorch (log: run-kv-shared.log)")
    m = run_measured(CHILD + ["kv-shared", str(bench.work.checkpoint()), str(p.prefill), str(o.repeats),
                              str(o.threads), "1" if o.quick else "0"], bench.work.folder / "run-kv-shared.log")
    estimate = kv_shared_ceiling(p.config, p.prefill)
    for backend, seconds in json.loads(m["last"]).items():
        bench.row("kv-shared", backend, "speedup", seconds["kv_shared_s"] * 1e3, seconds["full_s"] * 1e3, "ms",
                  seconds["full_s"] / seconds["kv_shared_s"], "KV-shared prefill", "full prefill",
                  note=f"{p.prefill}-token prompt; weights x positions give {estimate:.2f}x")


def _encoder_rows(bench: Bench, only: set[str]) -> None:
    from runtime_py.bench.encoders import EXPORTED

    o = bench.options
    rows = ",".join(r for r in ("vision", "audio") if r in only)
    o.progress(f"encoders: {rows} (log: run-encoders.log)")
    m = run_measured(CHILD + ["encoders", "1" if o.quick else "0", rows, str(o.repeats), str(o.threads),
                              str(bench.work.folder / "encoders")], bench.work.folder / "run-encoders.log",
                     bench.encoder_env)
    result = json.loads(m["last"])
    measured, failures = result["rows"], result["failures"]
    bench.details["encoders"] = {"rows": measured, "failures": failures, "peak_rss_mib": m["peak_rss_mib"],
                                 "model": "tiny encoders" if o.quick else "published-size encoders"}
    for r in measured:
        if r["backend"] in ("timm eager", "transformers eager"):
            continue
        quant = "int8" if r["backend"].endswith("int8") else "none"
        case = f"{r['size']} px, {r['backend']} ({r['timed']})" if r["encoder"] == "vision" else \
            f"30 s window, {r['backend']} ({r['timed']})"
        reference = "timm eager (float)" if r["encoder"] == "vision" else "transformers eager (float)"
        exported = r["backend"].split()[0] in EXPORTED
        rate, unit = (r["images_per_s"], "images/s") if r["encoder"] == "vision" else (1 / r["real_time_factor"],
                                                                                      "x real time")
        bench.row(r["encoder"], case, "speedup", rate, rate / r["speedup_vs_reference"], unit,
                  r["speedup_vs_reference"], r["backend"], reference,
                  goal_key=(r["encoder"], quant) if exported else ("-", "-"),
                  note=f"cosine {r['cosine_vs_torch']:.6f}")
    for f in failures:
        bench.rows.append({"row": f["encoder"], "case": f["backend"], "measure": "speedup", "ours": None,
                           "reference": None, "unit": "", "ratio": None, "contender": f["backend"], "against": "",
                           "goal": None, "higher_is_better": True, "met": False, "note": f"not measured: {f['error']}"})
