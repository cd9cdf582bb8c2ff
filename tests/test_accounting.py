"""Parameter accounting against the published figures and against transformers' own count."""

import pytest

from models.accounting import count_checkpoint, count_config
from models.config import E2B, E4B, TINY
from models.hf_reference import load_hf_model


def test_e2b_matches_the_published_figures():
    counts = count_config(E2B)
    # Google: "5.44B raw, 1.91B effective". Our count leaves out the k/v weights that the released files keep for
    # the 10 KV-shared layers (21M parameters that nothing reads), hence 5.42B and 1.88B.
    assert counts.total / 1e9 == pytest.approx(5.4, abs=0.05)
    assert counts.core / 1e9 == pytest.approx(1.9, abs=0.05)
    assert counts.ple_table == 262_144 * 30 * 256
    assert counts.total == counts.core + counts.ple_table + counts.text_embedding + counts.audio + counts.vision


def test_e4b_is_larger_and_shares_the_encoders():
    e2b, e4b = count_config(E2B), count_config(E4B)
    assert e4b.total / 1e9 == pytest.approx(7.8, abs=0.1)
    assert (e4b.audio, e4b.vision) == (e2b.audio, e2b.vision)


@pytest.mark.parametrize("fixture", ["tiny_checkpoint", "tiny_multimodal_checkpoint"])
def test_checkpoint_count_equals_transformers(fixture, request):
    path = request.getfixturevalue(fixture)
    counts = count_checkpoint(path)
    hf = load_hf_model(path)
    assert counts.total == sum(p.numel() for p in hf.parameters())  # tied LM head counted once by both
    assert counts.core == count_config(TINY, multimodal=False).core
