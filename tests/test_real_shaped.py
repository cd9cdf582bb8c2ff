"""The maker of checkpoints laid out as the published ones (`g3n random-checkpoint`): the real-size shapes are
written tensor by tensor from the meta device, so the same code at the tiny shapes must give exactly what
randomise_ gives a whole model, and what it writes must load in transformers and in our loader."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import run_cli

from models.checkpoint import CONDITIONAL_GENERATION
from models.config import E2B, E4B, TINY
from models.hf_reference import hf_config, published_config, random_hf_model
from models.random_init import random_tensors


def test_streamed_draws_equal_the_whole_models_draws():
    # block=64 splits every matrix into many draws: the values must not depend on the split.
    model = random_hf_model(TINY, CONDITIONAL_GENERATION, seed=5)
    whole = dict(model.named_parameters())
    shapes = {name: tuple(p.shape) for name, p in whole.items()}
    seen = 0
    for name, tensor in random_tensors(shapes, seed=5, dtype=torch.float32, block=64):
        assert torch.equal(tensor, whole[name].detach()), name
        seen += 1
    assert seen == len(whole) > 300  # every tensor: the text decoder, the 12-block vision tower, the audio tower


def test_random_checkpoint_loads_in_transformers_and_ours(capsys, tmp_path):
    from safetensors import safe_open
    from sentencepiece import SentencePieceProcessor
    from transformers import Gemma3nForConditionalGeneration

    from models.checkpoint import load_pretrained

    out = tmp_path / "ckpt"
    code, stdout, _ = run_cli(capsys, "random-checkpoint", "--preset", "tiny", "--out", out, "--seed", "5")
    assert code == 0 and "Gemma3nForConditionalGeneration" in stdout
    assert sorted(p.name for p in out.iterdir()) == ["chat_template.jinja", "config.json", "model.safetensors",
                                                     "tokenizer.model"]
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == [CONDITIONAL_GENERATION] and config["dtype"] == "bfloat16"
    # every text id decodes (the tiny model's own tokenizer already covers its ids)
    assert SentencePieceProcessor(model_file=str(out / "tokenizer.model")).vocab_size() >= \
        TINY.vocab_size_per_layer_input

    reference = random_hf_model(TINY, CONDITIONAL_GENERATION, seed=5)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert sorted(f.keys()) == sorted(n for n, _ in reference.named_parameters())
        for name, p in reference.named_parameters():
            assert torch.equal(f.get_tensor(name), p.detach().to(torch.bfloat16)), name

    hf, info = Gemma3nForConditionalGeneration.from_pretrained(str(out), output_loading_info=True,
                                                               dtype=torch.float32)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ids = torch.tensor([[2, 10, 20, 30]])
    with torch.no_grad():
        logits = hf(input_ids=ids).logits
    assert logits.shape == (1, 4, TINY.vocab_size) and torch.isfinite(logits).all() and logits.std() > 0.1
    ours = load_pretrained(out)
    assert ours.config.text == TINY


@pytest.mark.parametrize("text, layers, parameters", [(E2B, 30, 5.44e9), (E4B, 35, 7.85e9)])
def test_published_config_has_the_published_shapes(text, layers, parameters):
    from transformers import Gemma3nForConditionalGeneration

    config = published_config(text)
    assert config.text_config.num_hidden_layers == layers and config.vision_config.architecture == \
        "mobilenetv5_300m_enc" and config.audio_config.conf_num_hidden_layers == 12
    assert (config.boi_token_id, config.image_token_id, config.audio_token_id) == (255999, 262145, 262273)
    with torch.device("meta"):
        model = Gemma3nForConditionalGeneration(config)
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(parameters, rel=0.01)
    assert hf_config(TINY, CONDITIONAL_GENERATION).text_config.num_hidden_layers == TINY.num_layers


def test_the_tokenizer_spells_the_media_tokens_as_litert_lm_writes_them():
    """LiteRT-LM writes <start_of_image>, <end_of_audio>, ... into a Gemma 3n prompt as text; the real-shaped
    checkpoint's tokenizer must encode each to the config's id (the exporter names them so in the .litertlm), and
    its placeholders must still cover every other id."""
    from sentencepiece import SentencePieceProcessor

    from models.random_init import MEDIA_PIECES, widened_tokenizer

    config = published_config(E2B).to_dict()
    sp = SentencePieceProcessor(model_proto=widened_tokenizer(E2B.vocab_size, config))
    assert sp.vocab_size() == E2B.vocab_size == 262_400
    for key, piece in MEDIA_PIECES.items():
        assert sp.encode(piece) == [config[key]] and sp.id_to_piece(config[key]) == piece, key
    assert sp.encode("<w262399>") == [262_399] and sp.encode("<w262143>") == [262_143]
