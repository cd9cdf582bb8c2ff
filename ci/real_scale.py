"""Real scale, step 2: `g3n export` of the real-shaped checkpoints (`make real-checkpoints`) to each target and
quantization that fits this machine, each in a fresh process: time, peak RSS of the process tree and of its anonymous
part (what the mapped checkpoint's pages, which the kernel can drop, are not), and the bytes written. Writes
real-scale.json and real-scale.md into --out and prints the table. A cell that fails says so in its row and the log
it left; the run goes on."""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from models.errors import G3nError  # noqa: E402
from runtime_py.bench.measure import run_measured  # noqa: E402
from runtime_py.bench.report import write_table  # noqa: E402

# (checkpoint preset, target, --quant, text only): the ones run by default, in order.
CELLS = [
    ("e2b", "executorch", "8da8w", True),
    ("e2b", "executorch", "8da4w", False),
    ("e4b", "executorch", "8da4w", False),
]


def export_cell(out: Path, preset: str, target: str, quant: str, text_only: bool) -> dict:
    name = f"{preset}-{target}-{quant}" + ("-text" if text_only else "")
    row = {"model": preset, "target": target, "quant": quant, "parts": "text" if text_only else "text+vision+audio"}
    folder = out / name
    shutil.rmtree(folder, ignore_errors=True)
    cmd = [sys.executable, "-m", "runtime_py.cli", "export", "--checkpoint", str(out / preset), "--target", target,
           "--quant", quant, "--out", str(folder), "--log", str(out / f"{name}.converters.log")]
    print(f"{name}: exporting", file=sys.stderr, flush=True)
    try:
        m = run_measured(cmd + (["--text-only"] if text_only else []), out / f"{name}.log")
    except G3nError as e:
        return row | {"status": f"failed: {e}"}
    return row | {"status": "ok", "export_s": round(m["seconds"]), "export_peak_rss_mib": round(m["peak_rss_mib"]),
                  "export_peak_anon_mib": round(m["peak_anon_mib"]),
                  "bytes": sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("out/real"))
    parser.add_argument("--cells", help="comma-separated preset/target/quant[/text], e.g. e2b/executorch/8da8w/text "
                        "(default: every cell of CELLS)")
    args = parser.parse_args()
    cells = CELLS if not args.cells else [
        (*c.split("/")[:3], c.endswith("/text")) for c in args.cells.split(",")]
    rows = []
    for cell in cells:
        if not (args.out / cell[0] / "config.json").is_file():
            print(f"error: {args.out / cell[0]}: no checkpoint (make real-checkpoints writes it)", file=sys.stderr)
            return 2
        rows.append(export_cell(args.out, *cell))
        write_table(rows, args.out / "real-scale")
    return 0


if __name__ == "__main__":
    sys.exit(main())
