"""Real scale: the PLE table of a real-shaped checkpoint (`make real-checkpoints`) written as the asset at each
quantized storage (exporters.ple.write_ple_table, the bytes the LiteRT section and the ExecuTorch .ptd hold too) and
read back by contract.ple.PleTable: bytes, seconds, and the relative error of random rows against the checkpoint's
bf16 table. Writes real-ple.json and real-ple.md into --out and prints the table."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from contract.ple import PleTable  # noqa: E402
from exporters.ple import write_ple_table  # noqa: E402
from runtime_py.bench.report import write_table  # noqa: E402

KEY = "model.language_model.embed_tokens_per_layer.weight"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("out/real"))
    parser.add_argument("--presets", default="e2b,e4b")
    parser.add_argument("--rows", type=int, default=256, help="random rows compared with the bf16 table")
    args = parser.parse_args()
    rows = []
    for preset in args.presets.split(","):
        ckpt = args.out / preset
        if not (ckpt / "model.safetensors.index.json").is_file():
            print(f"error: {ckpt}: no checkpoint (make real-checkpoints writes it)", file=sys.stderr)
            return 2
        text = json.loads((ckpt / "config.json").read_text())["text_config"]
        shard = json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"][KEY]
        with safe_open(ckpt / shard, "pt") as f:
            table = f.get_tensor(KEY)
        ids = np.random.default_rng(0).integers(0, table.shape[0], args.rows)
        reference = table[torch.from_numpy(ids)].float().numpy()
        for storage in ("int8", "int4"):
            print(f"{preset}: writing the {storage} table", file=sys.stderr, flush=True)
            with tempfile.TemporaryDirectory(dir=args.out) as tmp:
                t = time.perf_counter()
                path = write_ple_table(table, Path(tmp) / "ple.safetensors", storage, text["vocab_size"],
                                       text["num_hidden_layers"], 1.0)
                seconds = time.perf_counter() - t
                got = PleTable(path).rows(ids).reshape(len(ids), -1)
                error = float(np.linalg.norm(got - reference) / np.linalg.norm(reference))
                rows.append({"model": preset, "storage": storage, "entries": table.numel(),
                             "bytes": path.stat().st_size, "write_s": round(seconds, 1),
                             f"relative_error_{args.rows}_rows": round(error, 4)})
        write_table(rows, args.out / "real-ple")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
