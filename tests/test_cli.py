"""The g3n command line: what it prints, and one clear error line with exit code 2 for every bad input."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import assert_one_error_line, run_cli
from models import load_pretrained
from models.generate import prefill_and_decode

run = run_cli


def test_info_default_model(capsys):
    code, out, _ = run(capsys, "info")
    assert code == 0 and "embedded default" in out and "| core |" in out


def test_info_preset_e2b_json(capsys):
    code, out, _ = run(capsys, "info", "--preset", "e2b", "--json")
    params = json.loads(out)["parameters"]
    assert code == 0 and round(params["total"] / 1e9, 1) == 5.4 and round(params["core"] / 1e9, 1) == 1.9


def test_info_checkpoint(capsys, tiny_checkpoint):
    code, out, _ = run(capsys, "info", "--checkpoint", tiny_checkpoint, "--json")
    assert code == 0 and json.loads(out)["layers"] == 8


def test_generate_prints_the_models_greedy_tokens(capsys, tiny_checkpoint):
    code, out, _ = run(capsys, "generate", "--checkpoint", tiny_checkpoint, "--token-ids", "2,17,301,44",
                       "--max-new-tokens", "6", "--cache-len", "16")
    assert code == 0
    _, _, expected = prefill_and_decode(load_pretrained(tiny_checkpoint), torch.tensor([[2, 17, 301, 44]]), 6, 16)
    assert json.loads(out)["greedy_tokens"] == expected[:6]


def test_slice_command(capsys, tiny_checkpoint, tmp_path):
    code, out, _ = run(capsys, "slice", "--checkpoint", tiny_checkpoint, "--out", tmp_path / "s",
                       "--ffn-widths", "64", "--skip-layers", "6")
    assert code == 0 and load_pretrained(tmp_path / "s").config.num_layers == 7


def test_parity_command_reports_errors_within_tolerance(capsys, tiny_checkpoint):
    code, out, _ = run(capsys, "parity", "--checkpoint", tiny_checkpoint, "--steps", "4")
    report = json.loads(out[: out.index("\n\n")])
    assert code == 0 and report["greedy_tokens_equal"]
    assert report["prefill_max_abs_error"] <= 1e-4 and report["decode_max_abs_error"] <= 1e-4


def _broken(tiny_checkpoint, tmp_path, edit):
    path = tmp_path / "broken"
    shutil.copytree(tiny_checkpoint, path)
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors")
    return path


def test_missing_directory(capsys):
    code, _, err = run(capsys, "generate", "--checkpoint", "/no/such/dir", "--token-ids", "1")
    assert_one_error_line(code, err, "/no/such/dir", "no such checkpoint directory")


def test_missing_keys(capsys, tiny_checkpoint, tmp_path):
    path = _broken(tiny_checkpoint, tmp_path, lambda t: t.pop("model.norm.weight"))
    code, _, err = run(capsys, "generate", "--checkpoint", path, "--token-ids", "1")
    assert_one_error_line(code, err, "missing keys: model.norm.weight")


def test_mismatched_shapes(capsys, tiny_checkpoint, tmp_path):
    path = _broken(tiny_checkpoint, tmp_path, lambda t: t.__setitem__("model.norm.weight", torch.ones(3)))
    code, _, err = run(capsys, "info", "--checkpoint", path)
    assert code == 0  # info reads headers only; loading the weights checks shapes
    code, _, err = run(capsys, "generate", "--checkpoint", path, "--token-ids", "1")
    assert_one_error_line(code, err, "model.norm.weight has shape [3]")


def test_token_id_beyond_vocab(capsys, tiny_checkpoint):
    code, _, err = run(capsys, "generate", "--checkpoint", tiny_checkpoint, "--token-ids", "1,384")
    assert_one_error_line(code, err, "token id 384 is out of range", "384 ids")


def test_prompt_longer_than_the_cache(capsys, tiny_checkpoint):
    ids = ",".join(["5"] * 20)
    code, _, err = run(capsys, "generate", "--checkpoint", tiny_checkpoint, "--token-ids", ids, "--cache-len", "16")
    assert_one_error_line(code, err, "does not fit the KV cache of 16")


def test_malformed_flag_values(capsys, tiny_checkpoint, tmp_path):
    code, _, err = run(capsys, "slice", "--checkpoint", tiny_checkpoint, "--out", tmp_path / "x", "--ffn-widths", "a,b")
    assert_one_error_line(code, err, "--ffn-widths")
    code, _, err = run(capsys, "slice", "--checkpoint", tiny_checkpoint, "--out", tiny_checkpoint, "--ffn-widths", "8")
    assert_one_error_line(code, err, "already exists")


@pytest.mark.parametrize("argv,fragment", [
    (["generate", "--max-new-tokens", "0", "hi"], "--max-new-tokens: 0 is not at least 1"),
    (["generate", "--max-new-tokens", "-3", "hi"], "--max-new-tokens: -3 is not at least 1"),
    (["generate", "--temperature", "nan", "hi"], "--temperature: 'nan' is not a finite number"),
    (["generate", "--temperature", "inf", "hi"], "--temperature: 'inf' is not a finite number"),
    (["generate", "--top-p", "0", "hi"], "--top-p: '0' is not in (0, 1]"),
    (["generate", "--cache-len", "x", "hi"], "--cache-len: 'x' is not an integer"),
    (["generate", "--bogus"], "unrecognized arguments: --bogus"),
    (["bundle", "--out"], "--out: expected one argument"),
    (["harness", "run", "--device", "host"], "required: --bundle"),
    (["generate", "--backend", "litert", "--token-ids", "2,3"], "--backend litert: needs --bundle"),
])
def test_bad_flags_get_one_line(capsys, tmp_path, monkeypatch, argv, fragment):
    monkeypatch.chdir(tmp_path)
    code, _, err = run(capsys, *argv)
    assert_one_error_line(code, err, fragment)
    assert list(tmp_path.iterdir()) == []


def test_a_prompt_that_is_not_utf8_gets_one_line(tmp_path):
    """Bytes a terminal passes that are not UTF-8 (Python keeps them as surrogates in argv)."""
    g3n = Path(sys.executable).parent / "g3n"
    if not g3n.exists():
        pytest.skip(f"no g3n console script beside {sys.executable} (install with pip install -e .)")
    proc = subprocess.run([str(g3n), "generate", "--bundle", str(tmp_path), b"\xff\xfe hi"], capture_output=True,
                          text=True)
    assert_one_error_line(proc.returncode, proc.stderr, "prompt: not valid UTF-8 text")


def test_console_script_exits_2_without_traceback(tmp_path):
    """The installed entry point, as a user runs it."""
    g3n = Path(sys.executable).parent / "g3n"
    if not g3n.exists():
        pytest.skip(f"no g3n console script beside {sys.executable} (install with pip install -e .)")
    proc = subprocess.run([str(g3n), "info", "--checkpoint", str(tmp_path / "missing")], capture_output=True, text=True)
    assert_one_error_line(proc.returncode, proc.stderr, "no such checkpoint directory")
