"""The runtime's shared layers over the torch executor: chunked prefill, greedy decode, stop tokens, a full cache."""

import numpy as np
import pytest
import torch

from models.default import default_model
from models.errors import InputError
from models.generate import prefill_and_decode
from runtime_py.components.chat_template import render
from runtime_py.components.sampler import Sampler
from runtime_py.engine import session_for_model


@pytest.fixture(scope="module")
def model():
    return default_model()


@pytest.mark.parametrize("prompt_len, prefill_lengths", [(23, (8,)), (5, (8,)), (16, (8, 4)), (23, (32,))])
def test_chunked_prefill_and_decode_equal_the_eager_model(model, prompt_len, prefill_lengths):
    """Whatever the chunking (full chunks, an overlapping last chunk, token-by-token for short prompts), the greedy
    tokens equal one uncached-prefill-then-decode run of the eager model."""
    ids = torch.randint(6, 384, (1, prompt_len), generator=torch.Generator().manual_seed(prompt_len)).tolist()[0]
    session = session_for_model(model, cache_len=64, prefill_lengths=prefill_lengths)
    session.stop_ids = []  # compare raw greedy streams
    got = list(session.generate_ids(ids, max_new_tokens=12))
    _, _, expected = prefill_and_decode(model, torch.tensor([ids]), 11, cache_len=64)
    assert got == expected


def test_full_cache_stops_with_a_message(model):
    session = session_for_model(model, cache_len=24, prefill_lengths=(8,))
    session.stop_ids = []
    tokens = list(session.generate_ids(list(range(6, 26)), max_new_tokens=50))
    assert len(tokens) == 5  # positions 20..24: the cache holds 24
    assert session.timing.stopped_by == "full KV cache" and "KV cache is full" in session.notice


def test_prompt_longer_than_the_cache_is_refused(model):
    session = session_for_model(model, cache_len=16)
    with pytest.raises(InputError, match="does not fit the KV cache of 16"):
        list(session.generate_ids(list(range(6, 30))))


def test_bad_prompts(model):
    session = session_for_model(model)
    with pytest.raises(InputError, match="empty prompt"):
        list(session.generate("   "))
    with pytest.raises(InputError, match="token id 999 is out of range"):
        list(session.generate_ids([2, 999]))


def test_chat_template_is_gemmas():
    text = render([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                   {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye"}])
    assert text == ("<start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello<end_of_turn>\n"
                    "<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n")


def test_jinja_template_renders_the_same_text():
    import jinja2

    from runtime_py.components.chat_template import JINJA

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " Hi "},
                {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye"}]
    jinja = jinja2.Environment().from_string(JINJA).render(messages=messages, bos_token="", add_generation_prompt=True)
    assert jinja == render(messages)


def test_text_streams_decode_to_the_token_stream(model):
    session = session_for_model(model)
    pieces = list(session.generate("Write a short story.", max_new_tokens=10))
    assert "".join(pieces) == session.tokenizer.decode(list(session.generate_ids("Write a short story.", 10)))


def test_sampler():
    logits = np.array([0.0, 5.0, 4.9, -2.0])
    assert Sampler()(logits) == 1
    draws = [Sampler(temperature=1.0, top_k=2, seed=s)(logits) for s in range(200)]
    assert set(draws) == {1, 2} and 60 < draws.count(2) < 140  # p(2) = 1 / (1 + e^0.1) = 0.475
    assert {Sampler(temperature=1.0, top_p=0.3, seed=s)(logits) for s in range(50)} == {1}
    with pytest.raises(InputError):
        Sampler(top_p=0)
