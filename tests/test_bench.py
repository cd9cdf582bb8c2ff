"""g3n bench: its measuring tools against independent counts, its bad-input refusals, and (marked long: make long
runs it) the whole command in --quick mode, so that it keeps working: every row measured by the real contenders
(Google's engine on both exporters' files, transformers, ExecuTorch, the encoders' references), its report coherent."""

from __future__ import annotations

import json
import mmap
import os
import tempfile

import pytest
import torch

from models.fileio import drop_from_page_cache
from runtime_py.bench import ROWS, decode_bytes
from runtime_py.bench.measure import interleaved, resident_share, tree_rss_kib
from runtime_py.bench.subjects import PRESETS
from tests.conftest import assert_one_error_line, run_cli


def test_resident_share_counts_the_pages_a_reader_brought_in(tmp_path):
    path = tmp_path / "table.bin"
    path.write_bytes(os.urandom(4 << 20))  # 1024 pages
    drop_from_page_cache(path)
    before = resident_share(path)
    with open(path, "rb") as f:
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_RANDOM)  # no read-ahead: exactly the pages read
        for page in range(0, 1024, 64):
            os.pread(f.fileno(), 1, page * 4096)
    after = resident_share(path)
    if before != 0.0:
        pytest.skip(f"this filesystem keeps evicted pages resident ({before:.2f})")
    assert after == pytest.approx(16 / 1024, abs=4 / 1024), after
    # A range: the first 64 pages hold one page read.
    assert resident_share(path, 0, 64 * 4096) == pytest.approx(1 / 64, abs=1 / 64)


def test_decode_bytes_counts_the_graph_weights_once_and_every_layers_cache():
    cfg = PRESETS["tiny"].config
    from models.text import TextDecoder

    model = TextDecoder(cfg)
    ple = model.per_layer_embedding.weight.numel()
    total = sum(p.numel() for p in model.parameters())
    kv = cfg.num_layers * 2 * 320 * cfg.num_kv_heads * cfg.head_dim * 4
    assert decode_bytes(cfg, "int8", 320) == (total - ple) + kv
    assert decode_bytes(cfg, "none", 320) == 4 * (total - ple) + kv


def test_interleaved_medians_and_process_tree_memory():
    calls = []
    seconds, outputs = interleaved({"a": lambda: calls.append("a") or 1, "b": lambda: calls.append("b") or 2}, 3)
    assert calls == ["a", "b"] * 4 and outputs == {"a": 1, "b": 2} and set(seconds) == {"a", "b"}
    assert tree_rss_kib(os.getpid()) > 50_000  # this Python with torch loaded
    # The anonymous part excludes mapped files' pages: a mapped file read through grows the one, not the other.
    with tempfile.NamedTemporaryFile() as f:
        f.truncate(64 << 20)
        f.flush()
        before = tree_rss_kib(os.getpid()), tree_rss_kib(os.getpid(), "RssAnon")
        with open(f.name, "rb") as g, mmap.mmap(g.fileno(), 0, access=mmap.ACCESS_READ) as m:
            assert sum(m[i] for i in range(0, len(m), 4096)) == 0
            after = tree_rss_kib(os.getpid()), tree_rss_kib(os.getpid(), "RssAnon")
    assert after[0] - before[0] > 60_000 and abs(after[1] - before[1]) < 8_000


@pytest.mark.parametrize("argv, fragment", [
    (["--only", "litertlm,speed"], "'speed'"),
    (["--preset", "e9b"], "--preset"),
    (["--checkpoint", "/nonexistent"], "/nonexistent/config.json"),
    (["--repeats", "0"], "--repeats"),
])
def test_bad_input_is_one_error_line_and_no_report(capsys, tmp_path, argv, fragment):
    code, _, err = run_cli(capsys, "bench", "--report", tmp_path / "report", "--work", tmp_path / "work", *argv)
    assert_one_error_line(code, err, fragment)
    assert not (tmp_path / "report").exists()


@pytest.mark.long
def test_quick_bench_measures_every_row(capsys, tmp_path):
    torch_threads = torch.get_num_threads()
    code, out, err = run_cli(capsys, "bench", "--quick", "--report", tmp_path / "report", "--work", tmp_path / "work")
    torch.set_num_threads(torch_threads)
    assert code == 0, err
    result = json.loads((tmp_path / "report" / "bench.json").read_text())
    assert (tmp_path / "report" / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert out == (tmp_path / "report" / "bench.md").read_text()
    assert {r["row"] for r in result["rows"]} == set(ROWS)
    for r in result["rows"]:
        assert r["note"].startswith("not measured") is False, r  # every contender ran
        assert r["ours"] > 0 and r["reference"] > 0 or r["row"] == "ple", r
        if r["row"] not in ("roofline", "ple"):
            expected = r["reference"] / r["ours"] if r["row"] == "kv-shared" else r["ours"] / r["reference"]
            assert r["ratio"] == pytest.approx(expected, rel=1e-9), r  # kv-shared: times, the others: rates
        if r["goal"] is not None:
            assert r["met"] == (r["ratio"] >= r["goal"] if r["higher_is_better"] else r["ratio"] <= r["goal"])
    runs = result["details"]["runs"]
    # Google's engine ran both exporters' files and decoded; transformers and ExecuTorch generated.
    for key in ("ours int8", "export_hf int8", "slice twin", "slice slice", "transformers", "executorch none"):
        assert runs[key]["decode_tok_s"] > 0, key
    assert 0 < runs["bandwidth"]["bytes_per_s"] < 1e12
    # Every encoder output matched our float embedder (a fast wrong graph cannot pass as a speed-up).
    for r in result["details"]["encoders"]["rows"]:
        assert r["cosine_vs_torch"] > (0.99 if "int8" in r["backend"] else 0.9999), r
