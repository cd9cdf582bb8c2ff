"""Config: read from transformers-written config.json (both model types), and the published presets."""

from transformers import Gemma3nConfig, Gemma3nTextConfig

from models.config import E2B, E4B, GLOBAL, SLIDING, TextConfig


def test_e4b_preset_is_transformers_default():
    assert TextConfig.from_hf_dict(Gemma3nTextConfig().to_dict()) == E4B


def test_multimodal_config_reads_its_text_config():
    raw = Gemma3nConfig(text_config=Gemma3nTextConfig(num_hidden_layers=30, intermediate_size=8192,
                                                       num_kv_shared_layers=10)).to_dict()
    assert TextConfig.from_hf_dict(raw) == E2B


def test_legacy_rope_fields():
    raw = Gemma3nTextConfig().to_dict()
    raw.pop("rope_parameters")
    raw.update(rope_theta=123.0, rope_local_base_freq=45.0)
    cfg = TextConfig.from_hf_dict(raw)
    assert (cfg.rope_theta_global, cfg.rope_theta_local) == (123.0, 45.0)


def test_kv_sharing_sources_match_transformers():
    """transformers marks the producer of each type's shared KV as 'store'; our sources must be those layers."""
    for cfg in (E4B, E2B):
        modes = Gemma3nTextConfig(**cfg.to_hf_text_dict()).kv_sharing_modes
        stores = {cfg.layer_types[i]: i for i, m in enumerate(modes) if m == "store"}
        for i in range(cfg.num_layers):
            assert (modes[i] == "reuse") == (cfg.kv_shared_from[i] is not None)
            if cfg.kv_shared_from[i] is not None:
                assert cfg.kv_shared_from[i] == stores[cfg.layer_types[i]]
    assert E4B.kv_shared_from[20:] == (18, 18, 18, 18, 19) * 3
    assert E4B.layer_types.count(GLOBAL) == 7 and E4B.layer_types[:5] == (SLIDING,) * 4 + (GLOBAL,)
