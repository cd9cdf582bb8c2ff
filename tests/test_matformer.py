"""MatFormer slicing: sub-models that transformers loads and runs, equal to ours, and the published E2B slice."""

import json

import pytest
import torch
from safetensors.torch import load_file

from models import InputError, load_text_decoder
from models.config import E2B, E4B, GLOBAL, SLIDING
from models.hf_reference import load_hf_model
from models.matformer import e2b_plan, slice_checkpoint, sliced_config
from models.parity import parity_prompt, text_vocab_size


def _same_logits(path, prompt_len=20):
    ours, hf = load_text_decoder(path), load_hf_model(path)
    ids = parity_prompt(text_vocab_size(ours), ours.config.vocab_size_per_layer_input, prompt_len)
    with torch.no_grad():
        err = (ours(ids) - hf(input_ids=ids).logits).abs().max().item()
    assert err <= 1e-4
    return ours


def test_mix_n_match_slice(tiny_checkpoint, tmp_path):
    # Tiny has 8 layers, 5..7 KV-shared reading layers 4 (sliding) and 3 (global). Drop layer 1 (non-shared,
    # not a source) and layer 6 (shared); give every kept layer its own width.
    out = tmp_path / "mix"
    widths = [128, 64, 96, 32, 128, 80]
    cfg = slice_checkpoint(tiny_checkpoint, out, ffn_widths=widths, skip_layers=[1, 6])
    assert cfg.num_layers == 6 and list(cfg.ffn_widths) == widths and cfg.num_kv_shared_layers == 2
    assert cfg.layer_types == (SLIDING, SLIDING, GLOBAL, SLIDING, SLIDING, GLOBAL)
    assert cfg.activation_sparsity == (0.95, 0.0, 0.0, 0.0, 0.0, 0.0)
    src, dst = load_file(tiny_checkpoint / "model.safetensors"), load_file(out / "model.safetensors")
    # Layer 3 of the slice is layer 4 of the source: its leading 32 neurons.
    assert torch.equal(dst["model.layers.3.mlp.gate_proj.weight"], src["model.layers.4.mlp.gate_proj.weight"][:32])
    assert torch.equal(dst["model.layers.3.mlp.down_proj.weight"], src["model.layers.4.mlp.down_proj.weight"][:, :32])
    P = 16
    ple_src, ple_dst = src["model.embed_tokens_per_layer.weight"], dst["model.embed_tokens_per_layer.weight"]
    assert torch.equal(ple_dst[:, 1 * P : 2 * P], ple_src[:, 2 * P : 3 * P])
    _same_logits(out)


def test_slice_of_a_multimodal_checkpoint_keeps_its_towers(tiny_multimodal_checkpoint, tmp_path):
    out = tmp_path / "mm"
    slice_checkpoint(tiny_multimodal_checkpoint, out, ffn_widths=[64])
    dst = load_file(out / "model.safetensors")
    assert any(k.startswith("model.vision_tower.") for k in dst)
    assert any(k.startswith("model.audio_tower.") for k in dst)
    _same_logits(out)


def test_e2b_preset_is_the_published_slice(e4b_shaped_checkpoint, tmp_path):
    out = tmp_path / "e2b"
    cfg = slice_checkpoint(e4b_shaped_checkpoint, out, preset="e2b")
    assert cfg.num_layers == 30 and cfg.ffn_widths == (8192,) * 30
    assert cfg.num_kv_shared_layers == 10
    assert cfg.layer_types == E2B.layer_types and cfg.activation_sparsity == E2B.activation_sparsity
    meta = json.loads((out / "config.json").read_text())["matformer_slice"]
    assert meta["skipped_layers"] == [20, 21, 22, 23, 24] and meta["source_layers"][20] == 25
    _same_logits(out)


def test_e2b_plan_on_the_e4b_config_gives_the_e2b_config():
    assert sliced_config(E4B, *e2b_plan(E4B))[0] == E2B


def test_e2b_preset_needs_an_e4b_shaped_checkpoint(tiny_checkpoint, tmp_path):
    with pytest.raises(InputError, match="E4B-shaped"):
        slice_checkpoint(tiny_checkpoint, tmp_path / "x", preset="e2b")
    assert not (tmp_path / "x").exists()


def test_dropping_a_kv_source_is_refused(tiny_checkpoint, tmp_path):
    with pytest.raises(InputError, match="changes the KV source"):
        slice_checkpoint(tiny_checkpoint, tmp_path / "x", skip_layers=[4])


@pytest.mark.parametrize(
    "widths, skip, message",
    [([999], [], "must be in 1..128"), ([64, 64], [], "one per kept layer"), (None, [8], "does not exist"),
     (None, [0, 0], "listed twice")],
)
def test_bad_slice_requests(tiny_checkpoint, tmp_path, widths, skip, message):
    with pytest.raises(InputError, match=message):
        slice_checkpoint(tiny_checkpoint, tmp_path / "x", ffn_widths=widths, skip_layers=skip)


# --- MatFormer Lab's slicing table -------------------------------------------------------------------------------

def _widths(*groups: tuple[int, str]) -> str:
    return "[" + ", ".join(w for n, w in groups for _ in range(n)) + "]"


# Google's table layout (as mistral.rs ships it: matformer_configs/gemma3n.csv), rows sized for the E4B-shaped toy
# checkpoint (35 layers, FFN width 8256): the published E2B row as Google writes it, a Mix-n-Match row of the toy's
# own widths, and a row of the real E4B's widths (16384), wider than the toy.
MATFORMER_CSV = "\n".join([
    "name,# Layers,# Effective Params (B),MMLU PT accuracy,FFN Hidden Dims,Layers Skipped",
    f'Config for official E2B Model,30,1.91,50.90%,"{_widths((30, "2_048 * 4"))}","[20, 21, 22, 23, 24]"',
    f'Toy mix (layer-level),35,0.01,,"{_widths((4, "2_048 * 4"), (1, "8_256"), (30, "2_048 * 4"))}",',
    f'Config for E2.49B (block-level),35,2.49,54.50%,"{_widths((20, "2_048 * 4"), (5, "2_048 * 8"), (10, "2_048 * 4"))}",',
    'Broken row,2,0,,"[2_048 * x, 8192]",',
]) + "\n"


@pytest.fixture
def matformer_csv(tmp_path):
    path = tmp_path / "gemma3n.csv"
    path.write_text(MATFORMER_CSV)
    return path


def test_a_slice_by_name_from_the_matformer_table(capsys, e4b_shaped_checkpoint, matformer_csv, tmp_path):
    """The table's E2B row gives the same tensors as --preset e2b; a Mix-n-Match row gets the widths it lists."""
    from conftest import run_cli

    code, _, err = run_cli(capsys, "slice", "--checkpoint", e4b_shaped_checkpoint, "--out", tmp_path / "by-name",
                           "--matformer-config", matformer_csv, "--slice-name", "Config for official E2B Model")
    assert code == 0, err
    slice_checkpoint(e4b_shaped_checkpoint, tmp_path / "preset", preset="e2b")
    by_name, preset = load_file(tmp_path / "by-name" / "model.safetensors"), load_file(tmp_path / "preset" /
                                                                                         "model.safetensors")
    assert by_name.keys() == preset.keys() and all(torch.equal(by_name[k], preset[k]) for k in preset)
    config = json.loads((tmp_path / "by-name" / "config.json").read_text())
    assert config["matformer_slice"]["name"] == "Config for official E2B Model"
    assert config["matformer_slice"]["skipped_layers"] == [20, 21, 22, 23, 24]

    code, _, err = run_cli(capsys, "slice", "--checkpoint", e4b_shaped_checkpoint, "--out", tmp_path / "mix",
                           "--matformer-config", matformer_csv, "--slice-name", "Toy mix (layer-level)")
    assert code == 0, err
    mixed = load_text_decoder(tmp_path / "mix").config
    assert mixed.ffn_widths == (8192,) * 4 + (8256,) + (8192,) * 30 and mixed.num_layers == 35


@pytest.mark.parametrize("argv, fragments", [
    (["--slice-name", "Config for E9B"], ["--slice-name", "'Config for E9B' is not in", "Toy mix (layer-level)",
                                          "Config for official E2B Model"]),
    (["--slice-name", "Config for E2.49B (block-level)"], ["--ffn-widths", "16384"]),
    (["--slice-name", "Broken row"], ["Broken row", "FFN Hidden Dims", "'2_048 * x'"]),
    (["--preset", "e2b", "--slice-name", "Toy mix (layer-level)"], ["--preset", "--matformer-config", "not several"]),
    ([], ["--matformer-config and --slice-name together"]),
])
def test_bad_matformer_table_requests(capsys, e4b_shaped_checkpoint, matformer_csv, tmp_path, argv, fragments):
    from conftest import assert_one_error_line, run_cli

    code, _, err = run_cli(capsys, "slice", "--checkpoint", e4b_shaped_checkpoint, "--out", tmp_path / "x",
                           "--matformer-config", matformer_csv, *argv)
    assert_one_error_line(code, err, *fragments)
    assert not (tmp_path / "x").exists()


def test_a_matformer_table_without_its_columns_is_refused(capsys, e4b_shaped_checkpoint, tmp_path):
    from conftest import assert_one_error_line, run_cli

    table = tmp_path / "t.csv"
    table.write_text("name,widths\nA,[1]\n")
    code, _, err = run_cli(capsys, "bundle", "--checkpoint", e4b_shaped_checkpoint, "--out", tmp_path / "b",
                           "--matformer-config", table, "--slice-name", "A")
    assert_one_error_line(code, err, "--matformer-config", "no column '# Layers', 'FFN Hidden Dims', 'Layers Skipped'")
    assert not (tmp_path / "b").exists()
