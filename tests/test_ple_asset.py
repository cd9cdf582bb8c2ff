"""The PLE asset: written once, memory-mapped, read row by row, equal to the model's own lookup."""

import numpy as np
import pytest
import torch

from contract.ple import PleTable
from exporters.ple import (
    PerLayerEmbedder,
    quantize_rows_int4,
    quantize_rows_int8,
    unpack_int4,
    write_ple_asset,
    write_ple_table,
)
from models.default import default_model
from models.errors import InputError

# int8 with per-row scales: each value is off by at most half a step, scale / 2 = max|row| / 254, times sqrt(P).
INT8_REL_TOL = 1 / 254
INT4_REL_TOL = 1 / 14  # int4: max|row and layer| / 14, at most the row's maximum / 14


@pytest.fixture(scope="module")
def model():
    return default_model()


def _ids(model):
    # A text id beyond the PLE table (reads row 0, like the model) is included.
    return torch.tensor([[0, 5, 17, 319, 320, 383]])


@pytest.mark.parametrize("storage, tol", [("fp32", 0.0), ("bf16", 2**-8), ("fp16", 2**-11), ("int8", INT8_REL_TOL),
                                          ("int4", INT4_REL_TOL)])
def test_rows_equal_the_model_lookup(model, tmp_path, storage, tol):
    table = PleTable(write_ple_asset(model, tmp_path, storage))
    ids = _ids(model)
    expected = model.per_layer_embedding(ids)[0].detach().numpy()
    got = table.rows(ids[0].numpy())
    assert got.shape == expected.shape == (6, model.config.num_layers, model.config.hidden_size_per_layer_input)
    row_max = np.abs(expected).reshape(6, -1).max(axis=1)[:, None, None]
    assert np.all(np.abs(got - expected) <= tol * row_max + 1e-7)
    assert table.storage == storage


def test_out_of_range_ids_are_rejected(model, tmp_path):
    table = PleTable(write_ple_asset(model, tmp_path))
    with pytest.raises(InputError, match="token id 384 is out of range"):
        table.rows([1, 384])
    with pytest.raises(InputError, match="token id -1"):
        table.rows([-1])


def _rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def test_lookup_touches_only_the_rows_in_use(tmp_path):
    """A 128 MiB int8 table: mapping it and reading 8 rows must not bring the table into memory. Page-cache pages
    come into the process in folios of up to 2 MiB on current Linux kernels (seen here: 2 MiB per touched row, even
    with MADV_RANDOM), so the bound is 8 folios plus the scale vector, not 8 rows of 4 KiB."""
    vocab, width = 32768, 4096
    table = torch.randint(-100, 100, (vocab, width), dtype=torch.int8).float()
    path = write_ple_table(table, tmp_path / "big.safetensors", "int8", vocab, 16, 16.0)
    del table
    before = _rss_bytes()
    ple = PleTable(path)
    rows = ple.rows([1, 999, 5000, 12345, 20000, 25000, 30000, 32767])
    grown = _rss_bytes() - before
    assert rows.shape == (8, 16, 256)
    assert grown <= 8 * (2 << 20) + (4 << 20), f"RSS grew by {grown} bytes for 8 rows of a {vocab * width} byte table"


def test_truncated_and_foreign_files_are_refused(model, tmp_path):
    path = write_ple_asset(model, tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="truncated PLE asset"):
        PleTable(path)
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    with pytest.raises(InputError, match="header is not JSON"):
        PleTable(path)
    with pytest.raises(InputError, match="PLE asset missing"):
        PleTable(tmp_path / "nope.safetensors")


def test_int8_rows_quantized_block_by_block_equal_the_whole_table_at_once():
    """The row blocks that keep E2B's bf16 table from a float32 copy give the whole-table quantization's bytes."""
    table = torch.randn(3000, 40, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    whole = table.float()
    scale = whole.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    q = torch.round(whole / scale[:, None]).clamp(-127, 127).to(torch.int8)
    for block in (1, 777, 3000, 8192):
        got_q, got_scale = quantize_rows_int8(table, block)
        assert torch.equal(got_q, q) and torch.equal(got_scale, scale), block


def test_int4_rows_quantized_block_by_block_equal_the_whole_table_at_once():
    """int4 packs two values per byte with a scale per row and layer; blocks of rows give the same bytes, and each
    value is off by at most half a step of its own group."""
    table = torch.randn(3000, 4 * 64, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    packed, scales = quantize_rows_int4(table, groups=4)
    assert packed.shape == (3000, 128) and packed.dtype == torch.int8 and scales.shape == (3000, 4)
    for block in (1, 777, 3000):
        got_packed, got_scales = quantize_rows_int4(table, 4, block)
        assert torch.equal(got_packed, packed) and torch.equal(got_scales, scales), block
    with pytest.raises(InputError, match="--ple-storage int4: rows of width 9"):
        quantize_rows_int4(torch.zeros(2, 9), groups=1)
    q = unpack_int4(packed)
    assert q.min() >= -7 and q.max() <= 7 and torch.equal(q, torch.round(q))
    values = (q.unflatten(1, (4, 64)) * scales[..., None]).flatten(1)
    assert torch.all((values - table.float()).abs() <= scales.repeat_interleave(64, dim=1) / 2 * (1 + 1e-6))


@pytest.mark.parametrize("target", ["litert", "executorch"])
@pytest.mark.parametrize("storage", ["int8", "int4"])
def test_lowered_lookups_read_the_assets_numbers(model, tmp_path, target, storage):
    """The per-layer lookup as each exporter lowers it (LiteRT's per_layer_embedder section, ExecuTorch's portable
    embedding over the .ptd) gives the rows that the safetensors asset gives, for the quantized storages that keep
    the table out of float32 (int4: unpacked in the graph with float arithmetic)."""
    from exporters.litert import PleLookup, convert_lookup

    ids = _ids(model)
    expected = PleTable(write_ple_asset(model, tmp_path, storage)).rows(ids[0].numpy())
    if target == "litert":
        from runtime_py.executors.litert_executor import load_interpreter

        path = convert_lookup(PleLookup(model, storage), "per_layer_embedder", tmp_path / "ple.tflite")
        runner = load_interpreter(path, 1).get_signature_runner("per_layer_embedder")
        got = np.concatenate([runner(token_ids=np.array([[i]], dtype=np.int32))["embeddings"][0] for i in ids[0]])
    else:
        from executorch.runtime import Runtime

        pte, ptd = _lowered_lookup(model, storage, ids, tmp_path)
        cfg = model.config
        table_bytes = cfg.vocab_size_per_layer_input * cfg.num_layers * cfg.hidden_size_per_layer_input
        assert ptd.stat().st_size >= table_bytes // (2 if storage == "int4" else 1)  # in the .ptd
        loaded = Runtime.get().load_program(pte, data_path=ptd)
        got = loaded.load_method("per_layer_embedding").execute([ids])[0][0].numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)


def _lowered_lookup(model, storage: str, ids, folder):
    """The PLE lookup lowered to ExecuTorch alone: (ple.pte, its .ptd holding the table) in folder."""
    from contract.bundle import PTD_FILE
    from exporters.executorch import lower

    with torch.no_grad():
        program = torch.export.export(PerLayerEmbedder(model, storage), (ids,))
    lowered = lower({"per_layer_embedding": program}, {})
    (folder / "ple.pte").write_bytes(lowered.buffer)
    lowered.write_tensor_data_to_file(str(folder))
    return folder / "ple.pte", folder / PTD_FILE


def test_the_executorch_backend_pages_in_only_the_rows_it_reads(tmp_path):
    """ExecuTorch's Python runtime maps the .ptd with mlock, which pinned the whole PLE table in memory as root (2 GB
    on E2B); loaded as runtime_py's executorch backend loads it, none of the table is locked, and lookups bring in
    their rows' pages, not the disk's read-ahead window around each (8 MB on this VM: 60% of E2B's table after 256
    lookups). Here a 16 MB int8 table (65,536 rows of 256 B), its pages dropped before the program loads (as in a
    fresh process; the load's own first reads read ahead too: 76% of the table stayed before the loader dropped them),
    then 32 lookups spread over it."""
    from dataclasses import replace

    from models.config import TINY
    from models.fileio import drop_from_page_cache
    from models.random_init import randomise_
    from models.text import TextDecoder
    from runtime_py.bench.measure import resident_share
    from runtime_py.executors.executorch_executor import load_program, pages_on_demand

    cfg = replace(TINY, vocab_size=65536, vocab_size_per_layer_input=65536, hidden_size_per_layer_input=32)
    model = TextDecoder(cfg).eval()
    randomise_(model, 5)
    ids = torch.arange(32)[None] * 2047
    pte, ptd = _lowered_lookup(model, "int8", ids, tmp_path)
    assert ptd.stat().st_size >= 65536 * 256

    def locked_kib() -> int:
        status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines())
        return int(status["VmLck"].split()[0])

    before = locked_kib()
    drop_from_page_cache(ptd)
    loaded = load_program(pte, ptd)
    with pages_on_demand(pte, ptd):
        method = loaded.load_method("per_layer_embedding")
    assert locked_kib() - before < 1024
    got = method.execute([ids])[0][0].numpy()
    # 32 rows of 256 B: 32 of the table's 4,160 pages.
    assert resident_share(ptd) < 0.05
    np.testing.assert_allclose(got, PleTable(write_ple_asset(model, tmp_path, "int8")).rows(ids[0].numpy()),
                               rtol=1e-6, atol=1e-7)
