"""What the bench runs in child processes, one measurement per fresh process (so that each one's peak RSS is its
own and no run warms another's caches): `python -m runtime_py.bench.children KIND ARGS...`, the result as JSON on
the last line of stdout.

    export_hf CHECKPOINT OUT RECIPE PREFILL CACHE     litert-torch's own exporter (three workarounds, below)
    engine MODEL THREADS XNNPACK_CACHE PREFILL DECODE CACHE
                                                      one LiteRT-LM benchmark run (the engine's own counters)
    engine-ple MODEL THREADS XNNPACK_CACHE CACHE TEXT a prompt through the engine, then the share of
                                                      the .litertlm's per_layer_embedder section that is resident
    executorch PTE PTD CACHE PREFILL DECODE IDS      our runtime's executorch executor: prefill and decode timed,
                                                      then the share of the .ptd (the PLE table) resident
    transformers CHECKPOINT THREADS PREFILL DECODE    transformers' eager generate on the checkpoint, float32
    bandwidth THREADS                                 memory read bandwidth (runtime_py.bench.measure)
    kv-shared CHECKPOINT PREFILL REPEATS THREADS QUICK  both prefill graphs per backend (runtime_py.bench.prefill)
    encoders TINY ROWS REPEATS THREADS FOLDER         the encoder rows (runtime_py.bench.encoders)
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path


def export_hf(checkpoint: str, out: str, recipe: str, prefill: str, cache: str) -> dict:
    """litert-torch's export_hf with this environment's workarounds: TensorFlow's copy of the TFLite schema (a package
    re-exporting ai_edge_litert's: TensorFlow is not installed), the activation-sparsity multiplier that
    transformers 5 leaves at 0, and its Gemma 3n patches imported before its entry module."""
    tmp = tempfile.mkdtemp(prefix="tf-shim-")
    package = Path(tmp) / "tensorflow" / "lite" / "python"
    package.mkdir(parents=True)
    for folder in (package.parents[1], package.parent, package):
        (folder / "__init__.py").write_text("")
    (package / "schema_py_generated.py").write_text("from ai_edge_litert.schema_py_generated import *  # noqa\n")
    sys.path.insert(0, tmp)  # a package on disk: torch looks tensorflow up with find_spec
    import torch
    from litert_torch.generative.export_hf.model_ext.gemma3n import patch

    def gaussian_topk(self, inputs):
        multiplier = statistics.NormalDist().inv_cdf(self.activation_sparsity)
        cutoff = inputs.mean(-1, keepdim=True) + inputs.std(-1, keepdim=True, unbiased=False) * multiplier
        return torch.relu(inputs - cutoff)

    patch.Gemma3nTextMLP._gaussian_topk = gaussian_topk
    # After the Gemma 3n patches: the other order stops in transformers' kernel-hub decorator.
    from litert_torch.generative.export_hf import export as lib

    lib.export(checkpoint, out, prefill_lengths=[int(prefill)], cache_length=int(cache), quantization_recipe=recipe)
    return {}


def _cpu_engine(model: str, threads: str, cache_dir: str, cache: str):
    from litert_lm import Engine, interfaces

    return Engine(model, backend=interfaces.CPU(thread_count=int(threads)), max_num_tokens=int(cache),
                  cache_dir=cache_dir)


def engine(model: str, threads: str, cache_dir: str, prefill: str, decode: str, cache: str) -> dict:
    from litert_lm import benchmark, interfaces

    info = benchmark.Benchmark(
        model_path=model, backend=interfaces.CPU(thread_count=int(threads)), prefill_tokens=int(prefill),
        decode_tokens=int(decode), max_num_tokens=int(cache), cache_dir=cache_dir,
    ).run()
    return {"prefill_tok_s": info.last_prefill_tokens_per_second, "decode_tok_s": info.last_decode_tokens_per_second,
            "ttft_s": info.time_to_first_token_in_second}


def engine_ple(model: str, threads: str, cache_dir: str, cache: str, text: str) -> dict:
    """text: the prompt (runtime_py.bench._prompt_text: the engine takes text only)."""
    from runtime_py.bench.measure import resident_share
    from runtime_py.executors.litert_executor import litertlm_section_ranges

    engine = _cpu_engine(model, threads, cache_dir, cache)
    session = engine.create_session(apply_prompt_template=False)
    session.run_prefill([text])
    begin, end = next((b, e) for t, b, e in litertlm_section_ranges(Path(model)) if t == "per_layer_embedder")
    return {"ple_resident_share": resident_share(Path(model), begin, end), "ple_bytes": end - begin}


def executorch(pte: str, ptd: str, cache: str, prefill: str, decode: str, ids: str) -> dict:
    import numpy as np

    from runtime_py.bench.measure import resident_share
    from runtime_py.executors.executorch_executor import ExecuTorchExecutor

    executor = ExecuTorchExecutor(Path(pte), Path(ptd), int(cache), (int(prefill),))
    prompt = np.asarray(json.loads(ids))
    t0 = time.perf_counter()
    logits = executor.prefill(executor.embed(prompt), executor.per_layer_rows(prompt)[None], 0)
    ttft = time.perf_counter() - t0
    ple = resident_share(Path(ptd))
    pos, t1 = len(prompt), time.perf_counter()
    for _ in range(int(decode)):
        token = int(np.argmax(logits))
        ids = np.asarray([token])
        logits = executor.decode(executor.embed(ids), executor.per_layer_rows(ids)[None], pos)
        pos += 1
    seconds = time.perf_counter() - t1
    return {"prefill_tok_s": len(prompt) / ttft, "decode_tok_s": int(decode) / seconds, "ttft_s": ttft,
            "ple_resident_share": ple}


def transformers(checkpoint: str, threads: str, prefill: str, decode: str) -> dict:
    """Eager generate, greedy, no stop: a streamer stamps each token as generate hands it over, so that decode
    tokens/s is the decode tokens over the time between the first generated token and the last."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.generation.streamers import BaseStreamer

    class Stamps(BaseStreamer):
        def __init__(self):
            self.times = []

        def put(self, value):  # first the prompt, then each new token
            self.times.append(time.perf_counter())

        def end(self):
            pass

    torch.set_num_threads(int(threads))
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    ids = torch.randint(3, model.config.vocab_size, (1, int(prefill)), generator=torch.Generator().manual_seed(0))
    new = 1 + int(decode)
    with torch.no_grad():
        model.generate(ids, max_new_tokens=2, min_new_tokens=2, do_sample=False)  # warm-up
        stamps, t0 = Stamps(), time.perf_counter()
        model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, streamer=stamps)
    first, last = stamps.times[1], stamps.times[-1]
    return {"decode_tok_s": int(decode) / (last - first), "ttft_s": first - t0,
            "prefill_tok_s": int(prefill) / (first - t0)}


def bandwidth(threads: str) -> dict:
    from runtime_py.bench.measure import memory_bandwidth

    return {"bytes_per_s": memory_bandwidth(int(threads))}


def kv_shared(checkpoint: str, prefill: str, repeats: str, threads: str, quick: str = "0") -> dict:
    """Both prefill graphs on torch, litert and executorch (runtime_py.bench.prefill): median seconds. quick "1":
    torch and litert only (ExecuTorch's lowering of the two prefill methods takes minutes even on the tiny model;
    tests/test_kv_shared_prefill.py checks that graph)."""
    import torch

    from models.checkpoint import load_text_decoder
    from runtime_py.bench.prefill import prefill_seconds

    torch.set_num_threads(int(threads))
    model = load_text_decoder(checkpoint, dtype=torch.float32).eval()
    ids = torch.randint(0, model.config.vocab_size, (1, int(prefill)), generator=torch.Generator().manual_seed(0))
    out = {}
    for backend in ("torch", "litert") if quick == "1" else ("torch", "litert", "executorch"):
        print(f"kv-shared prefill: {backend}", file=sys.stderr, flush=True)
        seconds = prefill_seconds(backend, model, ids, int(repeats))
        out[backend] = {"full_s": seconds[False], "kv_shared_s": seconds[True]}
    return out


def encoders(tiny: str, only: str, repeats: str, threads: str, folder: str) -> dict:
    """The encoder rows (runtime_py.bench.encoders): tiny "1" for the default model's encoders."""
    import torch

    from runtime_py.bench import encoders as bench

    torch.set_num_threads(int(threads))
    torch.set_flush_denormal(True)  # random weights underflow in places; trained ones rarely do
    model = bench.bench_model(tiny=tiny == "1")

    def log(message):
        print(message, file=sys.stderr, flush=True)

    # The tiny encoders (--quick) are exported to LiteRT, float only: int8 is the same path with another scheme, each
    # export of a whole model costs minutes, and the shared multimodal bundles' tests run the ExecuTorch encoders.
    backends = ("torch", "litert") if tiny == "1" else ("torch", "litert", "executorch")
    rows, failures = [], []
    quants = ("none",) if tiny == "1" else ("none", "int8")
    wanted = tuple(e for e in ("vision", "audio") if e in only.split(","))
    sizes = (256,) if tiny == "1" else (256, 512, 768)
    # Published-size encoders are exported one at a time: a conversion that runs out of memory (LiteRT's float audio
    # encoder did) then costs its own row only.
    groups = [wanted] if tiny == "1" else [(e,) for e in wanted]
    runners = {e: r for group in groups for e, r in zip(group, [bench.open_exported(
        group, backends, model, sizes, Path(folder), int(threads), log, failures, quants)] * len(group))}
    if "vision" in wanted:
        rows += bench.bench_vision(model, sizes, backends, int(repeats), runners["vision"], log)
    if "audio" in wanted:
        rows += bench.bench_audio(model, backends, int(repeats), runners["audio"], log)
    return {"rows": rows, "failures": failures}


KINDS = {"export_hf": export_hf, "engine": engine, "engine-ple": engine_ple, "executorch": executorch,
         "transformers": transformers, "bandwidth": bandwidth, "kv-shared": kv_shared, "encoders": encoders}

if __name__ == "__main__":
    import os

    # Converters and runtimes print to stdout too: everything goes to stderr (the bench's log of this run), and the
    # result alone to the real stdout.
    result_fd = os.dup(1)
    os.dup2(2, 1)
    kind, *args = sys.argv[1:]
    result = KINDS[kind](*args)
    sys.stdout.flush()
    os.write(result_fd, (json.dumps(result) + "\n").encode())
