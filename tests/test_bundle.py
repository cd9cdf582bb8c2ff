"""Bundles of the embedded default model: every target opens and generates, every float backend gives the torch
backend's greedy tokens, and bad bundles or inputs get one clear error line (the two-process rebuild is in
tests/test_reproducible.py)."""

import copy
import hashlib
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from conftest import assert_one_error_line, run_cli
from contract.bundle import TARGET_BACKENDS
from models.default import default_gemma3n, default_model
from models.encoders import golden_media
from models.errors import InputError
from models.float32 import float32_reference
from runtime_py.bundle import build_bundles, golden_vectors
from runtime_py.cli import main
from runtime_py.components.tokenizer import DEFAULT_TOKENIZER, Tokenizer
from runtime_py.engine import open_bundle, session_for_model

PROMPT = "Write a short story about a robot."
# The float32 backends that run here. Core ML needs macOS, and coreml-mil computes in fp16, so its tokens equal
# torch's only where no near tie is at stake (tests/test_coreml_mil.py holds it to that).
RUNNABLE = {target: [b for b in backends if not b.startswith("coreml")] for target, backends in TARGET_BACKENDS.items()}


@pytest.fixture(scope="module")
def bundles(default_bundles):
    return default_bundles


def _greedy(bundle, backend, n=12):
    session = open_bundle(bundle, backend)
    session.stop_ids = []  # compare the raw greedy streams, however soon a random model says <end_of_turn>
    return list(session.generate_ids(PROMPT, max_new_tokens=n))


def _text(bundle, backend, n=12):
    return "".join(open_bundle(bundle, backend).generate(PROMPT, max_new_tokens=n))


@pytest.mark.parametrize("target", list(RUNNABLE))
def test_every_float_backend_gives_the_torch_tokens(bundles, target):
    reference = _greedy(bundles / target, "torch")
    assert len(reference) == 12
    for backend in RUNNABLE[target]:
        if backend == "litertlm":  # Google's engine returns text and stops at stop tokens by itself
            assert _text(bundles / target, backend) == _text(bundles / target, "torch")
        else:
            assert _greedy(bundles / target, backend) == reference, backend


def test_golden_vectors_are_the_torch_backends_output(bundles):
    manifest = json.loads((bundles / "executorch" / "manifest.json").read_text())
    session = open_bundle(bundles / "executorch", "torch")
    session.stop_ids = []
    tokens = list(session.generate_ids(manifest["golden"]["prompt_ids"], max_new_tokens=9))
    assert tokens == manifest["golden"]["greedy_tokens"]


def _digests(root):
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@torch.no_grad()
def test_a_bf16_models_golden_outputs_are_its_float32_copys():
    """build_bundles' reference (models.float32.float32_reference) of a bf16 model gives the golden vectors and
    media of the model's float32 copy, bit for bit, with one decoder layer in float32 at a time, the PLE table never
    cast, and the caller's model untouched: the path a real-size bf16 checkpoint takes."""
    model = default_gemma3n().to(torch.bfloat16)
    before = {k: (v.dtype, v.data_ptr()) for k, v in model.state_dict().items()}
    reference = float32_reference(model)
    layers = reference.language_model.layers
    float32_layers = []
    for layer in layers:
        layer.register_forward_pre_hook(lambda *_: float32_layers.append(  # after the reference's own cast
            sum(next(m.parameters()).dtype == torch.float32 for m in layers)))
    tokenizer = Tokenizer(DEFAULT_TOKENIZER)
    golden, tensors = golden_vectors(reference, tokenizer)
    media = golden_media(reference, (256,))
    assert float32_layers and max(float32_layers) == 1
    assert reference.language_model.per_layer_embedding.weight is model.language_model.per_layer_embedding.weight
    assert {k: (v.dtype, v.data_ptr()) for k, v in model.state_dict().items()} == before

    float32_copy = copy.deepcopy(model).float()
    want_golden, want_tensors = golden_vectors(float32_copy, tokenizer)
    want_media = golden_media(float32_copy, (256,))
    assert golden == want_golden
    for name, tensor in {**tensors, **media}.items():
        assert torch.equal(tensor, {**want_tensors, **want_media}[name]), name

    # The torch backend's session over the bf16 model (a bundle's bf16 reference/ takes this path) likewise.
    streams = []
    for source in (model, float32_copy):
        session = session_for_model(source, cache_len=64)
        session.stop_ids = []
        streams.append(list(session.generate_ids(PROMPT, max_new_tokens=6)))
    assert streams[0] == streams[1]
    assert {k: (v.dtype, v.data_ptr()) for k, v in model.state_dict().items()} == before


def test_a_failed_build_leaves_nothing(tmp_path):
    with pytest.raises(InputError, match="exceeds the cache length"):
        build_bundles(default_model(), tmp_path / "out", ["executorch"], cache_len=8, prefill_lengths=(16,))
    assert list(tmp_path.iterdir()) == []


def _descendants(pid: int) -> set[int]:
    found, todo = set(), [pid]
    while todo:
        for task in Path(f"/proc/{todo.pop()}/task").glob("*"):
            children = (task / "children").read_text().split() if (task / "children").exists() else []
            found |= {int(c) for c in children}
            todo += [int(c) for c in children]
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads process trees from /proc")
def test_sigterm_during_a_build_leaves_nothing_and_stops_the_workers(tmp_path):
    import signal
    import subprocess
    import time

    g3n = Path(sys.executable).with_name("g3n")
    proc = subprocess.Popen([str(g3n), "bundle", "--out", str(tmp_path / "out"), "--text-only"],
                            stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:  # the progress lines: wait until the lowering workers run
        if "queued" in line:
            break
    log, deadline = tmp_path / "out.log", time.monotonic() + 120
    while not log.exists() and time.monotonic() < deadline:  # a worker opens it first thing (slow on a busy machine)
        time.sleep(0.2)
    time.sleep(2)
    workers = _descendants(proc.pid)
    assert workers
    proc.send_signal(signal.SIGTERM)
    err = proc.stderr.read()
    assert proc.wait(timeout=60) == 143
    assert err.strip().splitlines()[-1].startswith("error: terminated") and "Traceback" not in err
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_alive(pid) for pid in workers)
    # The converters' log stays (it says how far the build got); no output folder, no temporary one.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.log"]


def _cli(capsys, *argv):
    code, _, err = run_cli(capsys, *argv)
    return code, err


def _copy(bundles, tmp_path, target="executorch"):
    dst = tmp_path / "copy"
    shutil.copytree(bundles, dst)
    return dst / target


def test_tampered_file_is_named(bundles, tmp_path, capsys):
    bundle = _copy(bundles, tmp_path)
    with open(bundle / "chat_template.jinja", "a") as f:
        f.write(" ")
    code, err = _cli(capsys, "generate", "--bundle", bundle, "hi")
    assert_one_error_line(code, err, "chat_template.jinja")


def test_same_size_modification_is_caught_by_sha256(bundles, tmp_path, capsys):
    bundle = _copy(bundles, tmp_path)
    data = bytearray((bundle / "golden.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (bundle / "golden.safetensors").write_bytes(bytes(data))
    code, err = _cli(capsys, "generate", "--bundle", bundle, "hi")
    assert_one_error_line(code, err, "sha256 differs")


def test_missing_and_truncated_files(bundles, tmp_path, capsys):
    bundle = _copy(bundles, tmp_path, "ios")
    ple = bundle / "per_layer_embeddings.safetensors"
    ple.write_bytes(ple.read_bytes()[:1000])
    code, err = _cli(capsys, "info", "--bundle", bundle)
    assert_one_error_line(code, err, "per_layer_embeddings.safetensors: 1000 bytes")
    (bundle / "tokenizer.model").unlink()
    ple.unlink()
    code, err = _cli(capsys, "info", "--bundle", bundle)
    assert_one_error_line(code, err, "missing")


def test_unknown_schema_version(bundles, tmp_path, capsys):
    bundle = _copy(bundles, tmp_path)
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["schema_version"] = 99
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    code, err = _cli(capsys, "generate", "--bundle", bundle, "hi")
    assert_one_error_line(code, err, "schema_version 99 is not supported")


def _set(manifest: dict, key: str, value) -> None:
    *parents, last = key.split(".")
    for part in parents:
        manifest = manifest[part]
    if value is _DELETE:
        del manifest[last]
    else:
        manifest[last] = value


_DELETE = object()


def _first_file(bundle) -> dict:
    return json.loads((bundle / "manifest.json").read_text())["files"][0]


# (what is edited, the value, a fragment the one error line names). Each is a manifest a hostile or careless writer
# could hand over with every file hash right.
MANIFEST_EDITS = [
    ("files", lambda b: [dict(_first_file(b), path="../../../../etc/passwd")], "not a plain relative path"),
    ("files", lambda b: [dict(_first_file(b), path="/etc/passwd")], "not a plain relative path"),
    ("files", lambda b: [], "files"),
    ("files", lambda b: [_first_file(b), _first_file(b)], "listed twice"),
    ("reference.path", lambda b: "../../elsewhere", "reference.path"),
    ("export_spec.cache_len", lambda b: 1e9, "export_spec.cache_len"),
    ("export_spec.cache_len", lambda b: 96.0, "export_spec.cache_len: 96.0 is not of type 'integer'"),
    ("export_spec.cache_len", lambda b: 2048, "max_position_embeddings"),
    ("export_spec.block_size", lambda b: True, "export_spec.block_size"),
    ("schema_version", lambda b: True, "schema_version True is not supported"),
    ("tokenizer", lambda b: _DELETE, "'tokenizer' is a required property"),
    ("tokenizer.bos_id", lambda b: "2", "tokenizer.bos_id"),
    ("tokenizer.stop_ids", lambda b: [10**6], "tokenizer.stop_ids"),
    ("unexpected", lambda b: 1, "'unexpected' was unexpected"),
    ("runtime", lambda b: "coreml", "runtime"),
    ("model.config.num_key_value_heads", lambda b: 3, "num_key_value_heads"),
]


@pytest.mark.parametrize("key,value,fragment", MANIFEST_EDITS, ids=[f"{k}-{i}" for i, (k, _, _) in
                                                                    enumerate(MANIFEST_EDITS)])
def test_a_manifest_out_of_its_schema_is_refused_naming_the_key(bundles, tmp_path, capsys, key, value, fragment):
    bundle = tmp_path / "executorch"
    shutil.copytree(bundles / "executorch", bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    _set(manifest, key, value(bundle))
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    before = _digests(tmp_path)
    code, err = _cli(capsys, "info", "--bundle", bundle)
    assert_one_error_line(code, err, fragment)
    assert _digests(tmp_path) == before


def test_a_kv_cache_larger_than_the_machine_is_refused_before_allocating(bundles, tmp_path, capsys):
    bundle = _copy(bundles, tmp_path)
    manifest = json.loads((bundle / "manifest.json").read_text())
    cfg = manifest["model"]["config"]
    cfg.update(max_position_embeddings=2**20, num_key_value_heads=cfg["num_attention_heads"], head_dim=4096)
    manifest["export_spec"]["cache_len"] = 2**20
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    code, err = _cli(capsys, "generate", "--bundle", bundle, "--backend", "torch", "hi")
    assert_one_error_line(code, err, "export_spec.cache_len", "GiB")


def test_unlisted_files_and_symlinks_are_refused(bundles, tmp_path, capsys):
    bundle = _copy(bundles, tmp_path)
    (bundle / "extra.bin").write_bytes(b"x")
    code, err = _cli(capsys, "info", "--bundle", bundle)
    assert_one_error_line(code, err, "extra.bin: not listed in the manifest")
    (bundle / "extra.bin").unlink()
    tokenizer = bundle / "tokenizer.model"
    tokenizer.rename(tmp_path / "tokenizer.model")
    tokenizer.symlink_to(tmp_path / "tokenizer.model")
    code, err = _cli(capsys, "info", "--bundle", bundle)
    assert_one_error_line(code, err, "tokenizer.model: a symbolic link")


def test_info_prints_the_bundle_digest(bundles, capsys):
    from contract.bundle import sha256_of

    code, out, _ = run_cli(capsys, "info", "--bundle", bundles / "executorch")
    assert code == 0 and f"bundle digest (sha256 of manifest.json, which lists every file's sha256): " \
        f"{sha256_of(bundles / 'executorch' / 'manifest.json')}" in out


def test_bad_prompts_and_backends(bundles, capsys):
    code, err = _cli(capsys, "generate", "--bundle", bundles / "executorch", "   ")
    assert_one_error_line(code, err, "empty prompt")
    code, err = _cli(capsys, "generate", "--bundle", bundles / "executorch", "--backend", "tpu", "hi")
    assert_one_error_line(code, err, "unknown backend 'tpu'")
    code, err = _cli(capsys, "generate", "--bundle", bundles / "executorch", "--backend", "litert", "hi")
    assert_one_error_line(code, err, "runs android bundles")
    code, err = _cli(capsys, "generate", "--checkpoint", bundles / "reference", "--token-ids", "2,384")
    assert_one_error_line(code, err, "token id 384 is out of range")
    # Google's engine fails in C++ on a prompt past its cache; the session says why first.
    code, err = _cli(capsys, "generate", "--bundle", bundles / "android", "--backend", "litertlm", "word " * 200)
    assert_one_error_line(code, err, "does not fit the KV cache of 96")


def test_token_ids_run_on_the_bundles_backend(bundles, capsys):
    """--token-ids with --bundle runs that bundle's --backend (not the default model): ExecuTorch's greedy ids equal
    the torch backend's on the bundle's reference; Google's engine, which takes text only, is refused in one line."""
    greedy = {}
    for backend in ("torch", "executorch"):
        code, out, _ = run_cli(capsys, "generate", "--bundle", bundles / "executorch", "--backend", backend,
                               "--token-ids", "2,10,20,30", "--max-new-tokens", "6")
        assert code == 0
        greedy[backend] = json.loads(out)["greedy_tokens"]
    assert len(greedy["torch"]) == 6 and greedy["executorch"] == greedy["torch"]
    code, _, err = run_cli(capsys, "generate", "--bundle", bundles / "android", "--backend", "litertlm",
                           "--token-ids", "2,10")
    assert_one_error_line(code, err, "--token-ids: the litertlm backend takes text only")


@pytest.mark.skipif(sys.platform == "darwin", reason="checks the message Linux users get")
def test_coreml_backend_says_it_needs_macos(bundles, capsys):
    code, err = _cli(capsys, "generate", "--bundle", bundles / "ios", "--backend", "coreml", "hi")
    assert_one_error_line(code, err, "macOS")


def test_generate_prints_text_and_a_timing_line(bundles, capsys):
    code = main(["generate", "--bundle", str(bundles / "executorch"), "--backend", "executorch",
                 "--max-new-tokens", "5", PROMPT])
    out, err = capsys.readouterr()
    assert code == 0 and out.strip()
    assert "ttft" in err and "prefill" in err and "decode" in err and "peak RSS" in err


def test_converter_output_goes_to_the_log_and_progress_to_the_terminal(tmp_path, capfd):
    # What the converters write to file descriptors 1 and 2 (C++ and absl logs, litert-torch's progress tree, and in
    # a real process Python's own streams, which write there) goes to the log; the stream the block yields stays on
    # the terminal.
    import os

    from runtime_py.bundle import output_to

    log = tmp_path / "export.log"
    with output_to(log) as terminal:
        os.write(2, b"I0000 flatbuffer_export.cc:4410] Estimated count of arithmetic ops\n")
        os.write(1, b"(00:00) [START] LiteRT-Torch Convert\n")
        print("lowering: progress line", file=terminal)
    print("after the block")
    out, err = capfd.readouterr()
    assert "lowering: progress line" in err and "after the block" in out
    assert "Estimated count" not in out + err and "LiteRT-Torch" not in out + err
    assert log.read_text().splitlines() == ["I0000 flatbuffer_export.cc:4410] Estimated count of arithmetic ops",
                                            "(00:00) [START] LiteRT-Torch Convert"]
