"""Our TextDecoder against transformers' Gemma3n on checkpoints transformers wrote.

Tolerance 1e-4 on logits in fp32: both sides run the same fp32 arithmetic, so only summation order differs (seen:
0 for prefill, ~1e-5 for cached decode, where transformers' dynamic sliding cache drops old keys and we mask them).
"""

import pytest
import torch

from models import load_pretrained
from models.config import GLOBAL, SLIDING
from models.hf_reference import load_hf_model
from models.parity import compare_with_transformers, parity_prompt

TOL = 1e-4
STEPS = 20


def _check_parity(checkpoint, prompt_len):
    report = compare_with_transformers(checkpoint, prompt_len, STEPS)
    assert report["prefill_max_abs_error"] <= TOL
    assert report["decode_max_abs_error"] <= TOL  # the worst of the 20 steps
    assert report["greedy_tokens_equal"]
    assert report["logit_scale"] > 1.0  # the logits are not all ~0 (which would make any error look small)


def test_tiny_config_exercises_every_feature(tiny_checkpoint):
    cfg = load_pretrained(tiny_checkpoint).config
    assert cfg.num_kv_shared_layers >= 2
    shared_types = {cfg.layer_types[i] for i in range(cfg.first_kv_shared_layer, cfg.num_layers)}
    assert shared_types == {SLIDING, GLOBAL}
    assert any(s > 0 for s in cfg.activation_sparsity) and any(s == 0 for s in cfg.activation_sparsity)
    assert cfg.vocab_size > cfg.vocab_size_per_layer_input
    assert cfg.altup_num_inputs == 4 and cfg.laurel_rank > 0 and cfg.final_logit_softcapping


def test_causal_lm_prefill_and_cached_decode_match_transformers(tiny_checkpoint):
    # 24 prompt tokens against a sliding window of 8: sliding layers must drop old keys.
    _check_parity(tiny_checkpoint, prompt_len=24)


def test_short_prompt_within_the_window(tiny_checkpoint):
    _check_parity(tiny_checkpoint, prompt_len=3)


def test_conditional_generation_text_part_matches_transformers(tiny_multimodal_checkpoint):
    _check_parity(tiny_multimodal_checkpoint, prompt_len=17)


def test_uncached_forward_matches_transformers(tiny_checkpoint):
    ours, hf = load_pretrained(tiny_checkpoint), load_hf_model(tiny_checkpoint)
    prompt = parity_prompt(ours.config.vocab_size, ours.config.vocab_size_per_layer_input, 30, seed=7)
    with torch.no_grad():
        assert (ours(prompt) - hf(input_ids=prompt).logits).abs().max().item() <= TOL


def test_per_layer_rows_enter_as_a_graph_input(tiny_checkpoint):
    """The PLE lookup lives outside forward_embeddings: feeding the rows in gives the same logits, and the rows
    matter (zeroing them changes the logits, so the PLE path is live in the random model)."""
    ours = load_pretrained(tiny_checkpoint)
    ids = parity_prompt(ours.config.vocab_size, ours.config.vocab_size_per_layer_input, 12)
    with torch.no_grad():
        rows = ours.per_layer_embedding(ids)
        assert rows.shape == (1, 12, ours.config.num_layers, ours.config.hidden_size_per_layer_input)
        full = ours(ids)
        split = ours.forward_embeddings(ours.embed(ids), rows)
        no_ple = ours.forward_embeddings(ours.embed(ids), torch.zeros_like(rows))
    assert torch.equal(full, split)
    assert (full - no_ple).abs().max().item() > 1e-2


def test_altup_clip_does_not_mutate_parameters(tiny_checkpoint):
    ours = load_pretrained(tiny_checkpoint).train()
    altup = ours.layers[0].altup
    with torch.no_grad():
        altup.prediction_coefs.weight[0, 0] = 500.0
    before = altup.prediction_coefs.weight.clone()
    ours(torch.tensor([[1, 2, 3]]))
    assert torch.equal(altup.prediction_coefs.weight, before)


def test_activation_sparsity_constant_is_the_normal_quantile(tiny_checkpoint):
    ours = load_pretrained(tiny_checkpoint)
    mlp = ours.layers[0].mlp
    assert mlp.sparsity == 0.95
    expected = torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor(0.95)).item()
    assert mlp.std_multiplier == pytest.approx(expected, abs=0)
    assert mlp.std_multiplier == pytest.approx(1.6448536, abs=1e-6)
