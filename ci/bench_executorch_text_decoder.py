"""The ExecuTorch decoder as one dynamic-shape method (text_decoder, what the LLM runner calls) against fixed-shape
graphs of the same decoder (decode at 1 token, prefill at 128), lowered into one program and timed interleaved
(medians), on issue 19's scaled E2B shape: 30 layers (10 KV-shared), hidden 512, FFN 2048, 8 heads / 2 KV heads,
vocabulary 65,536, cache 1024, float. Lowering the three methods takes about 16 minutes on 2 cores.

    python ci/bench_executorch_text_decoder.py [--repeats 7]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from exporters.executorch import DecoderStep, export_decoder, gelu_tanh, lower  # noqa: E402
from models.random_init import randomise_  # noqa: E402
from models.text import TextDecoder  # noqa: E402
from runtime_py.bench.subjects import PRESETS  # noqa: E402

SCALED_E2B = PRESETS["scaled-e2b"].config
CACHE, PROMPT = 1024, 128


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    model = TextDecoder(SCALED_E2B)
    randomise_(model, 1)
    decoder = export_decoder(model.eval(), CACHE)
    width = SCALED_E2B.hidden_size + SCALED_E2B.num_layers * SCALED_E2B.hidden_size_per_layer_input

    def export(tokens: int, dynamic: bool):
        dim = torch.export.Dim("tokens", min=1, max=CACHE) if dynamic else None
        with torch.no_grad():
            sample = (torch.zeros(1, tokens, width), torch.arange(tokens))
            program = torch.export.export(DecoderStep(decoder, True), sample,
                                          dynamic_shapes=({1: dim}, {0: dim}) if dynamic else None, strict=False)
            return program.run_decompositions({torch.ops.aten.gelu.default: gelu_tanh})

    t0 = time.time()
    programs = {"decode": export(1, False), f"prefill_{PROMPT}": export(PROMPT, False), "text_decoder": export(2, True)}
    names = list(programs)
    lowered = lower(programs, {})
    print(f"exported and lowered in {time.time() - t0:.0f} s", flush=True)
    from executorch.runtime import Runtime

    with tempfile.TemporaryDirectory() as tmp:
        pte = Path(tmp) / "decoder.pte"
        pte.write_bytes(lowered.buffer)
        program = Runtime.get().load_program(pte)
        methods = {name: program.load_method(name) for name in names}
        one, chunk = torch.randn(1, 1, width), torch.randn(1, PROMPT, width)
        prefill, positions = methods[f"prefill_{PROMPT}"], torch.arange(PROMPT)
        calls = {
            "decode, fixed shape": lambda: methods["decode"].execute([one, torch.tensor([200])]),
            "text_decoder, 1 token": lambda: methods["text_decoder"].execute([one, torch.tensor([200])]),
            f"prefill_{PROMPT}, fixed shape": lambda: prefill.execute([chunk, positions]),
            f"text_decoder, {PROMPT} tokens": lambda: methods["text_decoder"].execute([chunk, positions]),
        }
        times = {name: [] for name in calls}
        for call in calls.values():
            call()
        for _ in range(args.repeats):  # interleaved: the dynamic method changes shape between calls, as in use
            for name, call in calls.items():
                t = time.perf_counter()
                call()
                times[name].append(time.perf_counter() - t)
    print("| call | median ms |\n| --- | ---: |")
    for name, ts in times.items():
        print(f"| {name} | {statistics.median(ts) * 1e3:.2f} |")


if __name__ == "__main__":
    main()
