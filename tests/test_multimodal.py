"""The whole Gemma 3n (text decoder, audio and vision towers, embedders) against transformers'
Gemma3nForConditionalGeneration on a checkpoint that transformers wrote from random init, every parameter randomised.

Tolerance 1e-4 on logits in fp32 (logits of a few units): the same operations in the same order leave only
float reassociation differences (~1e-6)."""

import pytest
import torch
from safetensors.torch import load_file

from models import InputError, load_pretrained
from models.checkpoint import gemma3n_hf_name
from models.multimodal import Gemma3n, expand_media_placeholders
from models.parity import compare_multimodal_with_transformers


@pytest.fixture(scope="module")
def ours(tiny_multimodal_checkpoint):
    return load_pretrained(tiny_multimodal_checkpoint, dtype=torch.float32)


def test_the_whole_checkpoint_loads_into_our_model(ours, tiny_multimodal_checkpoint):
    assert isinstance(ours, Gemma3n)
    stored = load_file(tiny_multimodal_checkpoint / "model.safetensors")
    state = ours.state_dict()
    assert {gemma3n_hf_name(k) for k in state} == set(stored) - {"lm_head.weight"}
    assert all(torch.equal(v, stored[gemma3n_hf_name(k)]) for k, v in state.items())


def test_prompt_with_an_image_and_audio_matches_transformers(tiny_multimodal_checkpoint):
    report = compare_multimodal_with_transformers(tiny_multimodal_checkpoint, steps=8)
    for component in ("audio_encoder", "vision_tower"):
        assert report[component]["max_abs_error"] <= 1e-4 * report[component]["scale"], (component, report[component])
    assert report["audio_features"]["max_abs_error"] <= 1e-4 * report["audio_features"]["scale"]
    assert report["prompt_tokens"] > 256 + 188
    assert report["prefill_logits"]["max_abs_error"] <= 1e-4, report["prefill_logits"]
    assert report["decode_logits"]["max_abs_error"] <= 1e-4, report["decode_logits"]
    assert report["greedy_tokens_equal"], report


def test_soft_token_count_must_match_the_prompt(ours):
    tokens = ours.config.tokens
    ids = torch.tensor([expand_media_placeholders([2, 7, tokens.boi, 9], tokens)])
    images = torch.zeros(2, tokens.image_soft_tokens, ours.config.text.hidden_size)
    with pytest.raises(InputError, match="256 image soft-token positions but 512"):
        ours.embed_prompt(ids, images)
    # Without images the placeholders keep the vision embedder's row for their id, as in transformers (a soft-token
    # id generated in decode).
    embeds, _ = ours.embed_prompt(torch.tensor([[2, tokens.image]]))
    with torch.no_grad():
        torch.testing.assert_close(embeds[0, 1], ours.embed_vision.embed_ids(torch.tensor([tokens.image]))[0])


def test_long_audio_takes_one_span_per_window(ours):
    tokens = ours.config.tokens
    ids = expand_media_placeholders([2, tokens.boa, 7, tokens.boa], tokens, audio_windows=[2, 1])
    assert ids.count(tokens.audio) == 3 * tokens.audio_soft_tokens
    assert ids.count(tokens.boa) == ids.count(tokens.eoa) == 3
    with pytest.raises(InputError, match="2 <start_of_audio> placeholders for 1 audio clips"):
        expand_media_placeholders([tokens.boa, tokens.boa], tokens, audio_windows=[1])
