"""Checkpoint I/O: both Hugging Face layouts, sharded files, saving back, and every malformed input we refuse."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from models import CheckpointError, load_pretrained, load_text_decoder, save_pretrained
from models.checkpoint import INDEX_FILE, SINGLE_FILE
from models.hf_reference import load_hf_model
from models.parity import parity_prompt, text_vocab_size


def _copy(src, tmp_path, name="copy"):
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


def _edit_tensors(path, edit):
    tensors = load_file(path / SINGLE_FILE)
    edit(tensors)
    save_file(tensors, path / SINGLE_FILE, metadata={"format": "pt"})


@pytest.mark.parametrize("fixture, loader", [("tiny_checkpoint", load_text_decoder),
                                             ("tiny_multimodal_checkpoint", load_text_decoder),
                                             ("tiny_multimodal_checkpoint", load_pretrained)],
                         ids=["causal-lm", "conditional-as-text-decoder", "conditional-as-whole-model"])
def test_save_writes_the_same_layout_back(fixture, loader, request, tmp_path):
    """Every tensor written back unchanged (but the tied lm_head): by the whole model, and by the text decoder alone,
    which carries a multimodal checkpoint's tower tensors through."""
    src = request.getfixturevalue(fixture)
    model = loader(src)
    out = tmp_path / "saved"
    save_pretrained(model, out)
    before, after = load_file(src / SINGLE_FILE), load_file(out / SINGLE_FILE)
    assert sorted(after) == sorted(k for k in before if k != "lm_head.weight")
    assert all(torch.equal(before[k], after[k]) for k in after)
    assert json.loads((out / "config.json").read_text())["model_type"] == json.loads(
        (src / "config.json").read_text()
    )["model_type"]
    # transformers reads what we wrote and computes the same logits as our model.
    decoder = getattr(model, "language_model", model)
    ids = parity_prompt(text_vocab_size(model), decoder.config.vocab_size_per_layer_input, 9)
    with torch.no_grad():
        assert (load_hf_model(out)(input_ids=ids).logits - decoder(ids)).abs().max().item() <= 1e-4


def test_sharded_checkpoint_round_trip(tiny_checkpoint, tmp_path):
    model = load_pretrained(tiny_checkpoint)
    out = tmp_path / "sharded"
    save_pretrained(model, out, max_shard_bytes=100_000)
    index = json.loads((out / INDEX_FILE).read_text())
    assert len(set(index["weight_map"].values())) > 1
    reloaded = load_pretrained(out)
    ids = torch.tensor([[2, 7, 99, 5]])
    with torch.no_grad():
        assert torch.equal(reloaded(ids), model(ids))
        assert (load_hf_model(out)(input_ids=ids).logits - model(ids)).abs().max().item() <= 1e-4


def test_missing_directory():
    with pytest.raises(CheckpointError, match="no such checkpoint directory"):
        load_pretrained("/nonexistent/checkpoint")


def test_missing_keys_are_named(tiny_checkpoint, tmp_path):
    path = _copy(tiny_checkpoint, tmp_path)
    _edit_tensors(path, lambda t: t.pop("model.layers.2.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing keys: model\.layers\.2\.mlp\.up_proj\.weight"):
        load_pretrained(path)


def test_unexpected_keys_are_named(tiny_checkpoint, tmp_path):
    path = _copy(tiny_checkpoint, tmp_path)
    _edit_tensors(path, lambda t: t.__setitem__("model.layers.2.mlp.extra.weight", torch.zeros(2)))
    with pytest.raises(CheckpointError, match=r"unexpected keys: model\.layers\.2\.mlp\.extra\.weight"):
        load_pretrained(path)


def test_unused_kv_weights_of_shared_layers_are_accepted(tiny_checkpoint, tmp_path):
    """The published checkpoints keep k/v projections for KV-shared layers; transformers ignores them, so do we."""
    path = _copy(tiny_checkpoint, tmp_path)
    _edit_tensors(path, lambda t: t.__setitem__("model.layers.7.self_attn.k_proj.weight", torch.zeros(32, 64)))
    load_pretrained(path)


def test_mismatched_shapes_are_named(tiny_checkpoint, tmp_path):
    path = _copy(tiny_checkpoint, tmp_path)
    _edit_tensors(path, lambda t: t.__setitem__("model.norm.weight", torch.ones(65)))
    with pytest.raises(CheckpointError, match=r"model\.norm\.weight has shape \[65\], config\.json implies \[64\]"):
        load_pretrained(path)


def test_corrupt_safetensors(tiny_checkpoint, tmp_path):
    path = _copy(tiny_checkpoint, tmp_path)
    (path / SINGLE_FILE).write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_pretrained(path)


def test_pickle_checkpoints_are_never_loaded(tmp_path, tiny_checkpoint):
    path = tmp_path / "pickled"
    path.mkdir()
    shutil.copy(tiny_checkpoint / "config.json", path)
    torch.save({"x": torch.zeros(1)}, path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pickle files are never loaded"):
        load_pretrained(path)


def test_wrong_model_type(tiny_checkpoint, tmp_path):
    path = _copy(tiny_checkpoint, tmp_path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["model_type"] = "llama"
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="model_type is 'llama'"):
        load_pretrained(path)


def test_saving_never_leaves_a_partial_directory(tiny_checkpoint, tmp_path):
    model = load_pretrained(tiny_checkpoint)
    model.carried_tensors = {"model.bad": "not a tensor"}
    with pytest.raises(Exception):
        save_pretrained(model, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def _rss_file_kib() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("RssFile:"))


def test_released_checkpoint_pages_leave_the_process_and_read_back_the_same(tmp_path):
    """An exporter reclaims the checkpoint's mapped pages before its lowering (the export's peak): they leave the
    process's resident memory (RssFile falls by the checkpoint's size), and a later read brings back the same values
    (MADV_PAGEOUT keeps contents). A model built in memory has no file mapping to advise."""
    from dataclasses import replace

    from models.config import TINY
    from models.default import default_model
    from models.fileio import release_mapped_pages
    from models.hf_reference import write_random_checkpoint

    write_random_checkpoint(tmp_path, replace(TINY, vocab_size=131072, vocab_size_per_layer_input=131072))
    size = sum(f.stat().st_size for f in tmp_path.glob("*.safetensors"))
    model = load_pretrained(tmp_path)
    tensors = [*model.parameters(), *model.buffers()]
    sums = [t.double().sum().item() for t in tensors]  # every page read
    before = _rss_file_kib()
    assert release_mapped_pages(tensors) >= size
    assert before - _rss_file_kib() > 0.9 * size / 1024
    assert [t.double().sum().item() for t in tensors] == sums
    assert release_mapped_pages(list(default_model().parameters())) == 0
