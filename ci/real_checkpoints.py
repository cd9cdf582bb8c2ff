"""Real-scale step 1 (the real-scale issue, item 1): checkpoints laid out as the published google/gemma-3n-E2B-it and
-E4B-it (`g3n random-checkpoint --preset e2b|e4b`), each written in a fresh process with its wall time and the peak RSS
of its process tree, then loaded by transformers (bf16) for one forward pass, measured the same way. Writes
checkpoints.json and checkpoints.md in the output folder; a checkpoint already there is reused (not re-timed).

    python ci/real_checkpoints.py [--out out/real] [--presets e2b,e4b]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from runtime_py.bench.measure import run_measured  # noqa: E402
from runtime_py.bench.report import write_table  # noqa: E402

PROMPT = [2] + list(range(100, 110))  # <bos> and ten text ids (within the tiny vocabulary too)


def forward(checkpoint: str) -> None:
    """transformers' Gemma3nForConditionalGeneration on the checkpoint, bf16, one forward pass over a short prompt."""
    import torch
    from transformers import Gemma3nForConditionalGeneration

    torch.set_num_threads(2)
    model, info = Gemma3nForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.bfloat16,
                                                                  output_loading_info=True)
    missing, unexpected = info["missing_keys"], info["unexpected_keys"]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([PROMPT])).logits.float()
    print(json.dumps({"missing_keys": len(missing), "unexpected_keys": len(unexpected),
                      "parameters": sum(p.numel() for p in model.parameters()),
                      "logits_shape": list(logits.shape), "finite": bool(torch.isfinite(logits).all()),
                      "logits_std": float(logits.std()), "greedy_next": int(logits[0, -1].argmax())}))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("out/real"))
    parser.add_argument("--presets", default="e2b,e4b")
    parser.add_argument("--forward", help=argparse.SUPPRESS)  # the child: one checkpoint's forward pass
    args = parser.parse_args()
    if args.forward:
        forward(args.forward)
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for preset in args.presets.split(","):
        checkpoint = args.out / preset
        row = {"preset": preset}
        if not checkpoint.exists():
            print(f"writing {checkpoint}", file=sys.stderr)
            m = run_measured([sys.executable, "-m", "runtime_py.cli", "random-checkpoint", "--preset", preset,
                              "--out", str(checkpoint)], args.out / f"{preset}-write.log")
            row |= {"write_s": round(m["seconds"]), "write_peak_rss_mib": round(m["peak_rss_mib"])}
        row["bytes"] = sum(f.stat().st_size for f in checkpoint.iterdir())
        row["shards"] = len(list(checkpoint.glob("model-*.safetensors")))
        print(f"transformers forward pass on {checkpoint}", file=sys.stderr)
        m = run_measured([sys.executable, __file__, "--forward", str(checkpoint)], args.out / f"{preset}-forward.log")
        row |= {"forward_s": round(m["seconds"]), "forward_peak_rss_mib": round(m["peak_rss_mib"])}
        row |= json.loads(m["last"])
        rows.append(row)
    write_table(rows, args.out / "checkpoints")
    return 0


if __name__ == "__main__":
    sys.exit(main())
