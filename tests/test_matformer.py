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
