"""Prefill speed-up from KV sharing: the 10 KV-shared layers of an E2B-shaped model run on the last prompt position
only. Measures both prefill graphs side by side, in one run, on each backend available here, and prints the ratio.

    python ci/bench_kv_shared_prefill.py [--prompt-len 256] [--repeats 5] [--json out.json]

The model is E2B's layer structure (30 layers, 10 KV-shared, 4:1 sliding/global, sparsity on the first 10) at a
width that runs in seconds on 2 CPU cores. The layer count alone bounds the speed-up at 30/20 = 1.5x; attention over
the prompt in the 20 cache-writing layers is unchanged, and the LM head runs once either way.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.config import E2B  # noqa: E402
from models.random_init import randomise_  # noqa: E402
from models.text import TextDecoder  # noqa: E402

E2B_SHAPED = replace(
    E2B,
    vocab_size=4096,
    vocab_size_per_layer_input=4096,
    hidden_size=256,
    hidden_size_per_layer_input=32,
    ffn_widths=(1024,) * 30,
    num_heads=4,
    num_kv_heads=1,
    head_dim=64,
    laurel_rank=32,
    sliding_window=128,
)


def _median_seconds(fns: dict, repeats: int) -> dict:
    """Median wall time of each function, the functions run alternately so that load on the machine hits all alike."""
    for fn in fns.values():
        fn()  # warm-up
    times = {key: [] for key in fns}
    for _ in range(repeats):
        for key, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - t)
    return {key: statistics.median(ts) for key, ts in times.items()}


def bench_torch(model, ids, repeats):
    model.setup_caches(ids.shape[1])
    args = (model.embed(ids), model.per_layer_embedding(ids), torch.arange(ids.shape[1]))

    def run(last_only):
        def prefill():
            with torch.no_grad():
                model.forward_embeddings(*args, last_position_only=last_only)

        return prefill

    return _median_seconds({last: run(last) for last in (False, True)}, repeats)


def bench_exported(target, model, ids, repeats):
    """Both prefill graphs exported by the target's exporter and run by the runtime's executor for that target."""
    if target == "executorch":
        return bench_executorch(model, ids, repeats)
    from contract.bundle import LITERTLM_FILE
    from exporters import export
    from exporters.spec import ExportSpec
    from runtime_py.engine import DEFAULT_TOKENIZER
    from runtime_py.executors.litert_executor import LiteRtExecutor

    T = ids.shape[1]
    embeds, rows = model.embed(ids).detach().numpy(), model.per_layer_embedding(ids).detach().numpy()
    executors = {}
    with tempfile.TemporaryDirectory() as tmp:
        for last in (False, True):
            spec = ExportSpec(target=target, cache_len=T, prefill_lengths=(T,), kv_shared_prefill=last)
            folder = Path(tmp) / f"{target}-{last}"
            export(model, spec, folder, tokenizer_path=DEFAULT_TOKENIZER)
            executors[last] = LiteRtExecutor(folder / LITERTLM_FILE, T, (T,))
        return _median_seconds({last: (lambda e=e: e.prefill(embeds, rows, 0)) for last, e in executors.items()},
                               repeats)


def bench_executorch(model, ids, repeats):
    """The ExecuTorch exporter's prefill graph (its decoder copy, norm swaps, GELU decomposition, XNNPACK lowering
    with the shared-buffer memory plan), both variants as two methods of one program; the decode method and the
    embedders are left out, since lowering a 30-layer graph takes XNNPACK's partitioner many minutes per method."""
    from executorch.runtime import Runtime

    from exporters.executorch import DecoderStep, export_decoder, gelu_tanh, lower

    T = ids.shape[1]
    decoder = export_decoder(model, T)
    args = (model.embed(ids).detach(), model.per_layer_embedding(ids).detach(), torch.arange(T))
    programs = {}
    with torch.no_grad():
        for last in (False, True):
            ep = torch.export.export(DecoderStep(decoder, last), args, strict=False)
            programs[f"prefill_{'kv_shared' if last else 'full'}"] = ep.run_decompositions(
                {torch.ops.aten.gelu.default: gelu_tanh})
    program = lower(programs, {"get_max_seq_len": T})
    with tempfile.TemporaryDirectory() as tmp:
        pte = Path(tmp) / "prefill.pte"
        with open(pte, "wb") as f:
            program.write_to_file(f)
        loaded = Runtime.get().load_program(pte)
        methods = {last: loaded.load_method(f"prefill_{'kv_shared' if last else 'full'}") for last in (False, True)}
        return _median_seconds({last: (lambda m=m: m.execute(list(args))) for last, m in methods.items()}, repeats)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--backends", default="torch,executorch,litert")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = TextDecoder(E2B_SHAPED)
    randomise_(model, 0)
    model.eval()
    ids = torch.randint(0, E2B_SHAPED.vocab_size, (1, args.prompt_len))
    rows = []
    for backend in args.backends.split(","):
        try:
            t = bench_torch(model, ids, args.repeats) if backend == "torch" else bench_exported(
                backend, model, ids, args.repeats)
        except ImportError as e:
            print(f"{backend}: skipped ({e})", file=sys.stderr)
            continue
        rows.append({"backend": backend, "prompt_len": args.prompt_len, "full_prefill_s": t[False],
                     "kv_shared_prefill_s": t[True], "speedup": t[False] / t[True]})
    print(json.dumps(rows, indent=2))
    print("\n| backend | prompt | full prefill | KV-shared prefill | speed-up |\n| --- | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['backend']} | {r['prompt_len']} | {r['full_prefill_s'] * 1e3:.1f} ms | "
              f"{r['kv_shared_prefill_s'] * 1e3:.1f} ms | {r['speedup']:.2f}x |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
