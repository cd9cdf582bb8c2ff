"""The KV-shared prefill row: the KV-shared upper layers write no cache, so the prefill graphs run them on the last
prompt position only (ExportSpec.kv_shared_prefill). Both prefill graphs of the same model, side by side, on each
backend: torch eager, and each exporter's own graph run by the runtime's executor. The full graph (the exporter's
`--full-prefill`) returns every position's logits, the KV-shared one the last position's: the speed-up includes the
LM head on the other positions (runtime_py.bench.kv_shared_ceiling: what weights x positions give; attention over the
prompt in the shared layers, and the logits' softcapping, are saved beyond it)"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from runtime_py.bench.measure import interleaved


def prefill_seconds(backend: str, model, ids: torch.Tensor, repeats: int) -> dict[bool, float]:
    """{kv_shared: median seconds of one prefill of ids} for both graphs."""
    if backend == "torch":
        return _torch(model, ids, repeats)
    if backend == "litert":
        return _litert(model, ids, repeats)
    return _executorch(model, ids, repeats)


def _torch(model, ids, repeats):
    model.setup_caches(ids.shape[1])
    args = (model.embed(ids), model.per_layer_embedding(ids), torch.arange(ids.shape[1]))

    def run(last_only):
        def prefill():
            with torch.no_grad():
                return model.forward_embeddings(*args, last_position_only=last_only)

        return prefill

    return interleaved({last: run(last) for last in (False, True)}, repeats)[0]


def _litert(model, ids, repeats):
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
            spec = ExportSpec(target="litert", cache_len=T, prefill_lengths=(T,), kv_shared_prefill=last)
            folder = Path(tmp) / f"litert-{last}"
            export(model, spec, folder, tokenizer_path=DEFAULT_TOKENIZER)
            executors[last] = LiteRtExecutor(folder / LITERTLM_FILE, T, (T,))
        return interleaved({last: (lambda e=e: e.prefill(embeds, rows, 0)) for last, e in executors.items()},
                           repeats)[0]


def _executorch(model, ids, repeats):
    """The ExecuTorch exporter's decoder step (its decoder copy, norm swaps, GELU decomposition, XNNPACK lowering with
    the shared-buffer memory plan) at the prompt's length, both variants as two methods of one program; the embedder
    is left out (XNNPACK's partitioner takes minutes per 30-layer method)."""
    from executorch.runtime import Runtime

    from exporters.executorch import DecoderStep, export_decoder, gelu_tanh, lower

    T = ids.shape[1]
    decoder = export_decoder(model, T)
    joined = torch.cat([model.embed(ids), model.per_layer_embedding(ids).flatten(-2)], -1).detach()
    args = (joined, torch.arange(T))
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
        return interleaved({last: (lambda m=m: m.execute(list(args))) for last, m in methods.items()}, repeats)[0]
