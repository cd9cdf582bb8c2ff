"""Real scale, step 2: `g3n export` of the real-shaped checkpoints (`make real-checkpoints`) to each target and
quantization that fits this machine, each in a fresh process: time, peak RSS of the process tree and of its anonymous
part (what the mapped checkpoint's pages, which the kernel can drop, are not), and the bytes written. Writes
real-scale.json and real-scale.md into --out and prints the table. A cell that fails says so in its row and the log
it left; the run goes on. Then each ExecuTorch cell's files run in our runtime's executorch executor, also in a fresh
process (runtime_py.bench.children): a prompt of distinct ids (256, or fewer where the cache must keep room for the
decoded tokens), then DECODE tokens: prefill and decode tokens/s, time to first token, the run's peak RSS and the
share of the PLE table (.ptd) resident after the prompt (mincore); and ExecuTorch's stock MultimodalRunner on the same
files, a short prompt: its peak RSS and the share of the .ptd resident. Each LiteRT cell's .litertlm runs in Google's
LiteRT-LM engine (run_litert_cell), the same columns but the stock runner's (the engine is the stock runtime, and
our runtime's litertlm backend). Rows of cells not run this time are kept;
--runs-only measures the run columns of cells already exported, keeping their export columns. --via bundle makes
each cell with `g3n bundle` at the level whose scheme the cell names, for the cell's target (its export columns then
include the golden vectors and the reference checkpoint's copy; its bytes are still the model files'), and each
bundle cell is then held to its float reference by `g3n compare` (compare_cell)."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from contract.bundle import EMBEDDINGS_FILE, PLE_ASSET_FILE  # noqa: E402
from models.errors import G3nError  # noqa: E402
from models.fileio import drop_from_page_cache  # noqa: E402
from runtime_py.bench import distinct_ids  # noqa: E402
from runtime_py.bench.measure import run_measured  # noqa: E402
from runtime_py.bench.report import write_table  # noqa: E402
from runtime_py.bench.subjects import CHILD  # noqa: E402
from runtime_py.bundle import ENCODER_QUANT_LEVELS, PLE_LEVELS, QUANT_LEVELS, TARGETS  # noqa: E402

BUNDLE_TARGET = {target: bundle for bundle, target in TARGETS.items()}  # exporter target -> g3n bundle target

# (checkpoint preset, target, --quant, text only): the ones run by default, in order.
CELLS = [
    ("e2b", "executorch", "8da8w", True),
    ("e2b", "executorch", "8da4w", False),
    ("e4b", "executorch", "8da4w", False),
    ("e2b", "litert", "int4-blockwise", False),
    ("e2b", "coreml", "int4-per-block", False),
]
PROMPT, DECODE = 256, 16
EXPORT_COLUMNS = ("model", "target", "quant", "parts", "via", "status", "export_s", "export_peak_rss_mib",
                  "export_peak_anon_mib", "bytes")


def bundle_flags(target: str, quant: str, text_only: bool) -> list[str]:
    """The PLE storage and encoder scheme `g3n bundle` gives the level that exports `target` with `quant` (at int4:
    an int4 table, int8 encoders), so that a cell's bytes are the bundle's."""
    level = bundle_level(target, quant)
    return ["--ple-storage", PLE_LEVELS[level]] + (
        [] if text_only else ["--encoder-quant", ENCODER_QUANT_LEVELS[level][target]])


def bundle_level(target: str, quant: str) -> str:
    """The `g3n bundle --quant` level whose scheme for `target` is `quant`."""
    return [level for level, schemes in QUANT_LEVELS.items() if schemes.get(target) == quant][-1]


def cell_name(preset: str, target: str, quant: str, text_only: bool, via: str = "export") -> str:
    return ("bundle-" if via == "bundle" else "") + f"{preset}-{target}-{quant}" + ("-text" if text_only else "")


def cell_row(preset: str, target: str, quant: str, text_only: bool, via: str = "export") -> dict:
    row = {"model": preset, "target": target, "quant": quant, "parts": "text" if text_only else "text+vision+audio"}
    return row | ({"via": "g3n bundle"} if via == "bundle" else {})  # rows without "via": g3n export


def cell_files(out: Path, name: str, target: str, via: str = "export") -> Path:
    """The folder with a cell's model files: the export's, or the bundle's target folder."""
    return out / name / BUNDLE_TARGET[target] if via == "bundle" else out / name


def export_cell(out: Path, preset: str, target: str, quant: str, text_only: bool, via: str = "export") -> dict:
    """`g3n export` of the cell's scheme, or with via="bundle" `g3n bundle` of its level for the target (golden
    vectors and the reference checkpoint included), measured."""
    name, row = cell_name(preset, target, quant, text_only, via), cell_row(preset, target, quant, text_only, via)
    folder = out / name
    shutil.rmtree(folder, ignore_errors=True)
    cmd = [sys.executable, "-m", "runtime_py.cli", via, "--checkpoint", str(out / preset)]
    cmd += (["--targets", BUNDLE_TARGET[target], "--quant", bundle_level(target, quant)] if via == "bundle" else
            ["--target", target, "--quant", quant, *bundle_flags(target, quant, text_only)])
    cmd += ["--out", str(folder), "--log", str(out / f"{name}.converters.log")] + (["--text-only"] if text_only else [])
    print(f"{name}: {via}", file=sys.stderr, flush=True)
    try:
        m = run_measured(cmd, out / f"{name}.log")
    except G3nError as e:
        return row | {"status": f"failed: {e}"}
    return row | {"status": "ok", "export_s": round(m["seconds"]), "export_peak_rss_mib": round(m["peak_rss_mib"]),
                  "export_peak_anon_mib": round(m["peak_anon_mib"]),
                  "bytes": bundle_bytes(cell_files(out, name, target, via))}


def bundle_bytes(folder: Path) -> int:
    """What a phone loads: the .litertlm for LiteRT (an export leaves the .tflite files it packed beside it), the
    .pte and .ptd for ExecuTorch; for Core ML the packages, the PLE asset and (in a bundle) the token table."""
    files = [f for f in folder.iterdir() if f.suffix in (".litertlm", ".pte", ".ptd")
             or f.name in (PLE_ASSET_FILE, EMBEDDINGS_FILE)]
    files += [f for package in folder.glob("*.mlpackage") for f in package.rglob("*") if f.is_file()]
    return sum(f.stat().st_size for f in files)


def cell_cache_len(folder: Path) -> int:
    """The KV-cache length of an export (export.json) or a bundle's target folder (manifest.json)."""
    record = folder / "export.json"
    if record.is_file():
        return json.loads(record.read_text())["spec"]["cache_len"]
    return json.loads((folder / "manifest.json").read_text())["export_spec"]["cache_len"]


def run_cell(out: Path, row: dict, name: str, folder: Path) -> dict:
    """The run columns of an exported ExecuTorch cell (see the module's docstring); its files in `folder`."""
    pte, ptd = folder / "model.pte", folder / "per_layer_embeddings.ptd"
    cache = cell_cache_len(folder)
    config = json.loads((out / row["model"] / "config.json").read_text())
    vocab = config.get("text_config", config)["vocab_size_per_layer_input"]
    ids = distinct_ids(min(PROMPT, cache - DECODE), vocab)
    for path in (pte, ptd):
        drop_from_page_cache(path)
    print(f"{name}: running a {len(ids)}-token prompt and {DECODE} tokens", file=sys.stderr, flush=True)
    try:
        m = run_measured(CHILD + ["executorch", str(pte), str(ptd), str(cache), str(len(ids)), str(DECODE),
                                  json.dumps(ids)], out / f"{name}.run.log")
    except G3nError as e:
        return row | {"run": f"failed: {e}"}
    result = json.loads(m["last"])
    for path in (pte, ptd):
        drop_from_page_cache(path)
    tokenizer = out / row["model"] / "tokenizer.model"
    try:
        stock = run_measured([sys.executable, __file__, "--stock-runner", str(pte), str(ptd), str(tokenizer)],
                             out / f"{name}.run.log")
        stock_columns = {"stock_runner_peak_anon_mib": round(stock["peak_anon_mib"]),
                         "stock_runner_ple_resident": f"{json.loads(stock['last'])['ple_resident_share']:.2%}"}
    except G3nError as e:
        stock_columns = {"stock_runner": f"failed: {e}"}
    return row | {"run": "ok", "prompt_tokens": len(ids), "prefill_tok_s": round(result["prefill_tok_s"], 2),
                  "decode_tok_s": round(result["decode_tok_s"], 2), "ttft_s": round(result["ttft_s"], 2),
                  "run_peak_rss_mib": round(m["peak_rss_mib"]), "run_peak_anon_mib": round(m["peak_anon_mib"]),
                  "ple_resident": f"{result['ple_resident_share']:.2%}"} | stock_columns


def run_litert_cell(out: Path, row: dict, name: str, folder: Path) -> dict:
    """The run columns of an exported LiteRT cell: Google's LiteRT-LM engine (which our runtime's litertlm backend
    is) on the .litertlm, in fresh processes: its benchmark (a prompt of the same length, which it fills itself,
    then DECODE tokens; XNNPACK's weight cache in a folder of its own, made by the first, untimed, load) for the
    speeds, then a session prefilling a prompt of distinct ids as text for the share of the PLE section resident."""
    import tempfile

    from runtime_py.bench import _prompt_text

    model = folder / "model.litertlm"
    cache = cell_cache_len(folder)
    config = json.loads((out / row["model"] / "config.json").read_text())
    # The engine's benchmark decodes nothing (0 tokens/s) after a prompt longer than half the cache (E2B text, cache
    # 256: 128 + 16 decoded, 129 + 16 none), whatever the decode count: at most half the cache.
    ids = distinct_ids(min(PROMPT, cache // 2), config.get("text_config", config)["vocab_size_per_layer_input"])
    log = out / f"{name}.run.log"
    print(f"{name}: running a {len(ids)}-token prompt and {DECODE} tokens", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(dir=out) as xnn:
        try:
            run_measured(CHILD + ["engine", str(model), "2", xnn, "8", "1", str(cache)], log)  # builds the cache
            drop_from_page_cache(model)
            m = run_measured(CHILD + ["engine", str(model), "2", xnn, str(len(ids)), str(DECODE), str(cache)], log)
            drop_from_page_cache(model)
            text = _prompt_text(out / row["model"] / "tokenizer.model", ids)
            ple = json.loads(run_measured(CHILD + ["engine-ple", str(model), "2", xnn, str(cache), text], log)["last"])
        except G3nError as e:
            return row | {"run": f"failed: {e}"}
    result = json.loads(m["last"])
    return row | {"run": "ok", "prompt_tokens": len(ids), "prefill_tok_s": round(result["prefill_tok_s"], 2),
                  "decode_tok_s": round(result["decode_tok_s"], 2), "ttft_s": round(result["ttft_s"], 2),
                  "run_peak_rss_mib": round(m["peak_rss_mib"]), "run_peak_anon_mib": round(m["peak_anon_mib"]),
                  "ple_resident": f"{ple['ple_resident_share']:.2%}"}


def run_coreml_cell(out: Path, row: dict, name: str, folder: Path) -> dict:
    """The run columns Linux can give a Core ML cell: none for an export; for a bundle's ios folder, the coreml-mil
    executor (runtime_py.executors.mil: the saved MIL programs run op by op) greedy on the golden prompt, its tokens
    against the golden vectors'. Core ML itself predicts on macOS only; the executor's speed is not a phone's."""
    manifest = folder / "manifest.json"
    if not manifest.is_file():
        return row | {"run": "no Linux runtime for an export (--via bundle runs coreml-mil)"}
    golden = json.loads(manifest.read_text())["golden"]
    steps = len(golden["greedy_tokens"])
    cmd = [sys.executable, "-m", "runtime_py.cli", "generate", "--bundle", str(folder), "--backend", "coreml-mil",
           "--token-ids", ",".join(map(str, golden["prompt_ids"])), "--max-new-tokens", str(steps)]
    print(f"{name}: coreml-mil on the golden prompt", file=sys.stderr, flush=True)
    try:
        m = run_measured(cmd, out / f"{name}.run.log")
    except G3nError as e:
        return row | {"run": f"failed: {e}"}
    tokens = json.loads(m["last"])["greedy_tokens"]
    same = sum(a == b for a, b in zip(tokens, golden["greedy_tokens"]))
    return row | {"run": f"coreml-mil: {same} of {steps} greedy tokens the golden's", "run_s": round(m["seconds"]),
                  "prompt_tokens": len(golden["prompt_ids"]), "run_peak_rss_mib": round(m["peak_rss_mib"]),
                  "run_peak_anon_mib": round(m["peak_anon_mib"])}


def compare_cell(out: Path, row: dict, name: str, folder: Path) -> dict:
    """A bundle cell's `g3n compare` against its float reference (the bundle's reference checkpoint) on the golden
    prompt, 8 teacher-forced steps, in a fresh process, held to the limits measured at real size
    (ci/thresholds-real.json, which compare picks for a real-size model): pass or the breaches, each backend's
    decode cosine, its time and peak RSS."""
    if not (folder / "manifest.json").is_file():
        return row
    report = out / f"{name}-compare"
    shutil.rmtree(report, ignore_errors=True)
    cmd = [sys.executable, "-m", "runtime_py.cli", "compare", "--bundle", str(folder), "--report", str(report),
           "--localise", "never", "--steps", "8"]
    print(f"{name}: g3n compare", file=sys.stderr, flush=True)
    try:
        m = run_measured(cmd, out / f"{name}.compare.log")
        measured = {"compare_s": round(m["seconds"]), "compare_peak_rss_mib": round(m["peak_rss_mib"])}
    except G3nError as e:  # exit 1 (a limit passed) still writes the report
        measured = {"compare_error": str(e)}
    if not (report / "report.json").is_file():
        return row | {"compare": "failed"} | measured
    result = json.loads((report / "report.json").read_text())
    cosines = [f"{r['cell']} {r['metrics']['decoder.decode']['cosine']:.3f}" for r in result["rows"]
               if "cosine" in r.get("metrics", {}).get("decoder.decode", {})]
    verdict = "pass" if result["passed"] else "FAIL: " + "; ".join(result["breaches"])
    return row | {"compare": verdict, "compare_decode_cosine": ", ".join(cosines)} | measured


def stock_runner(pte: str, ptd: str, tokenizer: str) -> int:
    """Child: ExecuTorch's MultimodalRunner (the demo apps' runner) loads the files and prefills a short prompt;
    prints the share of the .ptd then resident."""
    import executorch.kernels.quantized  # noqa: F401  (registers the kernels quantized programs call)
    from executorch.extension.llm import runner

    from runtime_py.bench.measure import resident_share

    runner.MultimodalRunner(pte, tokenizer, ptd).prefill([runner.make_text_input("Hello there")])
    print(json.dumps({"ple_resident_share": resident_share(Path(ptd))}))
    return 0


def main() -> int:
    if sys.argv[1:2] == ["--stock-runner"]:
        return stock_runner(*sys.argv[2:5])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("out/real"))
    parser.add_argument("--cells", help="comma-separated preset/target/quant[/text], e.g. e2b/executorch/8da8w/text "
                        "(default: every cell of CELLS)")
    parser.add_argument("--runs-only", action="store_true", help="measure the run columns of cells exported before")
    parser.add_argument("--via", choices=("export", "bundle"), default="export",
                        help="make each cell with g3n export (default) or g3n bundle (its level, golden vectors and "
                        "reference checkpoint included: out/bundle-<cell>/<target>)")
    args = parser.parse_args()
    cells = CELLS if not args.cells else [
        (*c.split("/")[:3], c.endswith("/text")) for c in args.cells.split(",")]
    table = args.out / "real-scale.json"
    rows = json.loads(table.read_text()) if table.is_file() else []
    for cell in cells:
        if not (args.out / cell[0] / "config.json").is_file():
            print(f"error: {args.out / cell[0]}: no checkpoint (make real-checkpoints writes it)", file=sys.stderr)
            return 2
        key, name = cell_row(*cell, args.via), cell_name(*cell, args.via)
        files = cell_files(args.out, name, cell[1], args.via)
        match = {"via": None} | key  # an export cell's row has no "via"
        old = next((r for r in rows if {k: r.get(k) for k in match} == match), None)
        if args.runs_only:
            if old is None or old.get("status") != "ok" or not files.is_dir():
                print(f"error: {files}: not made (run without --runs-only first)", file=sys.stderr)
                return 2
            row = {k: v for k, v in old.items() if k in EXPORT_COLUMNS}
        else:
            row = export_cell(args.out, *cell, args.via)
        if row.get("status") == "ok":
            run = {"executorch": run_cell, "litert": run_litert_cell, "coreml": run_coreml_cell}[cell[1]]
            row = compare_cell(args.out, run(args.out, row, name, files), name, files)
        rows = [row if r is old else r for r in rows] if old is not None else rows + [row]
        write_table(rows, args.out / "real-scale")
    return 0


if __name__ == "__main__":
    sys.exit(main())
