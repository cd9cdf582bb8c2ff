"""ExecuTorch's 8da4w at each Linear block size (32, 64, 128): on a 4-layer decoder of E2B's widths scaled down
(hidden 512, FFN 2048, PLE 64, vocabulary 16,384; random weights), the logits' mean relative error against the float
model over a 32-token prompt (eager: the lowering equals torchao's eager result) and the .pte's bytes; and the scales
that the published E2B and E4B decoders' Linears carry at each block size (counted from their shapes on the meta
device; XNNPACK stores a bf16 scale per block). Writes int4-blocks.json and int4-blocks.md into --out and prints the
table."""

from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from exporters.executorch import (  # noqa: E402
    DecoderStep,
    PerLayerEmbedder,
    TokenEmbedder,
    export_decoder,
    export_executorch,
    int4_block,
    quantize_decoder_,
)
from exporters.spec import ExportSpec  # noqa: E402
from models.config import E2B, E4B, TINY_4_LAYERS  # noqa: E402
from models.random_init import randomise_  # noqa: E402
from models.text import TextDecoder  # noqa: E402
from runtime_py.bench.report import write_table  # noqa: E402

BLOCKS = (32, 64, 128)
SCALED = dataclasses.replace(TINY_4_LAYERS, hidden_size=512, ffn_widths=(2048,) * 4, vocab_size=16384,
                             hidden_size_per_layer_input=64)
PROMPT, CACHE = 32, 64


def linears(decoder) -> list[torch.nn.Linear]:
    return [m for n, m in decoder.named_modules() if isinstance(m, torch.nn.Linear) and not n.endswith("_coefs")]


def scales(decoder, block: int) -> int:
    return sum(m.weight.numel() // b for m in linears(decoder) if (b := int4_block(m.in_features, block)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("out/int4-blocks"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    model = TextDecoder(SCALED)
    randomise_(model, 5)
    model.eval()
    ids = torch.randint(0, SCALED.vocab_size, (1, PROMPT), generator=torch.Generator().manual_seed(1))
    float_decoder = export_decoder(model, CACHE)
    with torch.no_grad():
        reference = DecoderStep(float_decoder, False)(TokenEmbedder(model, PerLayerEmbedder(model, "fp32"), None)(ids),
                                                      torch.arange(PROMPT))
        embedded = TokenEmbedder(model, PerLayerEmbedder(model, "fp32"), None, "8da4w")(ids)
    published = {}
    for name, cfg in (("e2b", E2B), ("e4b", E4B)):
        with torch.device("meta"):
            published[name] = export_decoder(TextDecoder(cfg), CACHE)
    rows = []
    for block in BLOCKS:
        print(f"linear blocks of {block}", file=sys.stderr, flush=True)
        spec = ExportSpec("executorch", cache_len=CACHE, prefill_lengths=(PROMPT,), quant="8da4w", ple_storage="int4",
                          block_size=block)
        decoder = copy.deepcopy(float_decoder)
        quantize_decoder_(decoder, spec)
        with torch.no_grad():
            logits = DecoderStep(decoder, False)(embedded, torch.arange(PROMPT))
        error = ((logits - reference).norm(dim=-1) / reference.norm(dim=-1)).mean().item()
        top1 = (logits.argmax(-1) == reference.argmax(-1)).float().mean().item()
        with tempfile.TemporaryDirectory(dir=args.out) as tmp:
            t = time.perf_counter()
            pte = export_executorch(model, spec, Path(tmp) / "bundle")
            seconds, size = time.perf_counter() - t, pte.stat().st_size
        rows.append({"linear_block": block, "mean_relative_logit_error": round(error, 3),
                     "top1_agreement": round(top1, 3), "scaled_pte_bytes": size, "export_s": round(seconds),
                     "scaled_scales": scales(decoder, block),
                     **{f"{name}_scales": scales(d, block) for name, d in published.items()}})
    write_table(rows, args.out / "int4-blocks")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
