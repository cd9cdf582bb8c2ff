"""KV-sharing prefill: the KV-shared upper layers write no cache, so prefill may run them on the last position only.
Same last-position logits (<= 1e-4 in fp32; seen ~1e-6) and identical caches. Also the functional cache path
(cache as tensors in and out, V transposed: LiteRT style) against the buffer path."""

import torch

from models import load_pretrained


def _caches(model):
    return [(model.layers[i].self_attn.kv_cache.k_cache.clone(), model.layers[i].self_attn.kv_cache.v_cache.clone())
            for i in model.config.cache_owning_layers]


def test_last_position_prefill_equals_full_prefill(tiny_checkpoint):
    model = load_pretrained(tiny_checkpoint)
    ids = torch.randint(0, model.config.vocab_size, (1, 20), generator=torch.Generator().manual_seed(5))
    embeds, rows, pos = model.embed(ids), model.per_layer_embedding(ids), torch.arange(20)
    model.setup_caches(32)
    with torch.no_grad():
        full = model.forward_embeddings(embeds, rows, pos)
        full_caches = _caches(model)
        model.reset_caches()
        last = model.forward_embeddings(embeds, rows, pos, last_position_only=True)
    assert last.shape == (1, 1, model.config.vocab_size)
    assert (last - full[:, -1:]).abs().max().item() <= 1e-4
    for (k1, v1), (k2, v2) in zip(full_caches, _caches(model)):
        assert torch.equal(k1, k2) and torch.equal(v1, v2)


def test_functional_cache_equals_buffer_cache(tiny_checkpoint):
    model = load_pretrained(tiny_checkpoint)
    cfg = model.config
    ids = torch.randint(0, cfg.vocab_size, (1, 12), generator=torch.Generator().manual_seed(6))
    kv = [(torch.zeros(1, cfg.num_kv_heads, 24, cfg.head_dim), torch.zeros(1, cfg.num_kv_heads, cfg.head_dim, 24))
          for _ in cfg.cache_owning_layers]
    model.setup_caches(24)
    with torch.no_grad():
        for start, chunk in ((0, ids[:, :10]), (10, ids[:, 10:11]), (11, ids[:, 11:12])):
            args = (model.embed(chunk), model.per_layer_embedding(chunk), torch.arange(start, start + chunk.shape[1]))
            buffered = model.forward_embeddings(*args)
            functional, kv = model.forward_embeddings(*args, kv_cache=kv)
            # V read transposed sums in another order: a float rounding apart (seen ~1e-6).
            assert (buffered - functional).abs().max().item() <= 1e-5
    for (k1, v1), (k2, v2) in zip(_caches(model), kv):  # the functional V is stored transposed
        assert torch.allclose(k1, k2, atol=1e-5) and torch.allclose(v1, v2.transpose(2, 3), atol=1e-5)
