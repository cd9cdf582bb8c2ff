"""Configuration of the Gemma 3n text decoder: one dataclass, read from a Hugging Face config.json, with presets."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from models.errors import CheckpointError

SLIDING = "sliding_attention"
GLOBAL = "full_attention"


@dataclass(frozen=True)
class TextConfig:
    vocab_size: int = 262_400
    vocab_size_per_layer_input: int = 262_144
    hidden_size: int = 2048
    hidden_size_per_layer_input: int = 256
    ffn_widths: tuple[int, ...] = (16_384,) * 35
    num_layers: int = 35
    num_heads: int = 8
    num_kv_heads: int = 2
    head_dim: int = 256
    layer_types: tuple[str, ...] = tuple(GLOBAL if (i + 1) % 5 == 0 else SLIDING for i in range(35))
    sliding_window: int = 512
    rope_theta_global: float = 1_000_000.0
    rope_theta_local: float = 10_000.0
    rms_norm_eps: float = 1e-6
    final_logit_softcapping: float | None = 30.0
    attention_bias: bool = False
    altup_num_inputs: int = 4
    altup_active_idx: int = 0
    altup_coef_clip: float | None = 120.0
    altup_correct_scale: bool = True
    laurel_rank: int = 64
    num_kv_shared_layers: int = 15
    activation_sparsity: tuple[float, ...] = (0.95,) * 10 + (0.0,) * 25
    max_position_embeddings: int = 32_768
    pad_token_id: int = 0
    bos_token_id: int = 2
    eos_token_ids: tuple[int, ...] = (1,)

    def __post_init__(self):
        n = self.num_layers
        for name in ("ffn_widths", "layer_types", "activation_sparsity"):
            if len(getattr(self, name)) != n:
                raise CheckpointError(f"config: {name} has {len(getattr(self, name))} entries, expected num_layers={n}")
        unknown = set(self.layer_types) - {SLIDING, GLOBAL}
        if unknown:
            raise CheckpointError(f"config: layer_types has unknown entries {sorted(unknown)}")
        if not 0 <= self.num_kv_shared_layers < n:
            raise CheckpointError(f"config: num_kv_shared_layers={self.num_kv_shared_layers} must be in [0, {n})")
        if self.num_heads % self.num_kv_heads:
            raise CheckpointError("config: num_attention_heads must be a multiple of num_key_value_heads")
        self.kv_shared_from  # validates that every shared layer has a source

    @property
    def first_kv_shared_layer(self) -> int:
        return self.num_layers - self.num_kv_shared_layers

    @property
    def kv_shared_from(self) -> tuple[int | None, ...]:
        """For each layer, the layer whose KV it reuses: the last non-shared layer of the same attention type."""
        first = self.first_kv_shared_layer
        sources: list[int | None] = [None] * first
        for i in range(first, self.num_layers):
            owners = [j for j in range(first) if self.layer_types[j] == self.layer_types[i]]
            if not owners:
                raise CheckpointError(
                    f"config: KV-shared layer {i} ({self.layer_types[i]}) has no earlier non-shared layer of its type"
                )
            sources.append(owners[-1])
        return tuple(sources)

    @property
    def cache_owning_layers(self) -> tuple[int, ...]:
        return tuple(range(self.first_kv_shared_layer))

    # --- Hugging Face config.json ---------------------------------------------------------------------------

    @classmethod
    def from_hf_dict(cls, raw: dict) -> "TextConfig":
        model_type = raw.get("model_type")
        if model_type == "gemma3n":
            text = raw.get("text_config")
            if not isinstance(text, dict):
                raise CheckpointError("config.json: model_type gemma3n without a text_config object")
        elif model_type == "gemma3n_text":
            text = raw
        else:
            raise CheckpointError(f"config.json: model_type is {model_type!r}, expected 'gemma3n' or 'gemma3n_text'")
        return cls._from_text_dict(text, raw)

    @classmethod
    def _from_text_dict(cls, t: dict, root: dict) -> "TextConfig":
        d = cls()
        n = int(t.get("num_hidden_layers", d.num_layers))
        ffn = t.get("intermediate_size", 16_384)
        ffn = tuple(int(w) for w in ffn) if isinstance(ffn, (list, tuple)) else (int(ffn),) * n
        layer_types = t.get("layer_types") or [GLOBAL if (i + 1) % 5 == 0 else SLIDING for i in range(n)]
        sparsity = t.get("activation_sparsity_pattern")
        if sparsity is None:
            sparsity = [0.95] * (10 if n > 10 else 0) + [0.0] * (n - (10 if n > 10 else 0))
        elif isinstance(sparsity, (int, float)):
            sparsity = [float(sparsity)] * n
        theta_global, theta_local = _rope_thetas(t)
        act = t.get("hidden_activation", "gelu_pytorch_tanh")
        if act != "gelu_pytorch_tanh":
            raise CheckpointError(f"config.json: hidden_activation {act!r} is not supported (gelu_pytorch_tanh)")
        eos = t.get("eos_token_id", root.get("eos_token_id", 1))
        eos = tuple(eos) if isinstance(eos, (list, tuple)) else (eos,)
        try:
            return cls(
                vocab_size=int(t.get("vocab_size", d.vocab_size)),
                vocab_size_per_layer_input=int(t.get("vocab_size_per_layer_input", d.vocab_size_per_layer_input)),
                hidden_size=int(t.get("hidden_size", d.hidden_size)),
                hidden_size_per_layer_input=int(t.get("hidden_size_per_layer_input", d.hidden_size_per_layer_input)),
                ffn_widths=ffn,
                num_layers=n,
                num_heads=int(t.get("num_attention_heads", d.num_heads)),
                num_kv_heads=int(t.get("num_key_value_heads", d.num_kv_heads)),
                head_dim=int(t.get("head_dim", d.head_dim)),
                layer_types=tuple(layer_types),
                sliding_window=int(t.get("sliding_window", d.sliding_window)),
                rope_theta_global=theta_global,
                rope_theta_local=theta_local,
                rms_norm_eps=float(t.get("rms_norm_eps", d.rms_norm_eps)),
                final_logit_softcapping=t.get("final_logit_softcapping", d.final_logit_softcapping),
                attention_bias=bool(t.get("attention_bias", False)),
                altup_num_inputs=int(t.get("altup_num_inputs", d.altup_num_inputs)),
                altup_active_idx=int(t.get("altup_active_idx", d.altup_active_idx)),
                altup_coef_clip=t.get("altup_coef_clip", d.altup_coef_clip),
                altup_correct_scale=bool(t.get("altup_correct_scale", d.altup_correct_scale)),
                laurel_rank=int(t.get("laurel_rank", d.laurel_rank)),
                num_kv_shared_layers=int(t.get("num_kv_shared_layers", d.num_kv_shared_layers)),
                activation_sparsity=tuple(float(s) for s in sparsity),
                max_position_embeddings=int(t.get("max_position_embeddings", d.max_position_embeddings)),
                pad_token_id=int(t.get("pad_token_id", 0) or 0),
                bos_token_id=int(t.get("bos_token_id", root.get("bos_token_id", 2)) or 2),
                eos_token_ids=tuple(int(e) for e in eos if e is not None),
            )
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"config.json: malformed text config ({e})") from None

    def to_hf_text_dict(self, base: dict | None = None) -> dict:
        """The gemma3n_text config.json fields, over `base` (keeps fields this class does not model)."""
        out = dict(base or {})
        out.update(
            model_type="gemma3n_text",
            vocab_size=self.vocab_size,
            vocab_size_per_layer_input=self.vocab_size_per_layer_input,
            hidden_size=self.hidden_size,
            hidden_size_per_layer_input=self.hidden_size_per_layer_input,
            intermediate_size=list(self.ffn_widths),
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            layer_types=list(self.layer_types),
            sliding_window=self.sliding_window,
            rope_parameters={
                GLOBAL: {"rope_type": "default", "rope_theta": self.rope_theta_global},
                SLIDING: {"rope_type": "default", "rope_theta": self.rope_theta_local},
            },
            rms_norm_eps=self.rms_norm_eps,
            final_logit_softcapping=self.final_logit_softcapping,
            attention_bias=self.attention_bias,
            altup_num_inputs=self.altup_num_inputs,
            altup_active_idx=self.altup_active_idx,
            altup_coef_clip=self.altup_coef_clip,
            altup_correct_scale=self.altup_correct_scale,
            laurel_rank=self.laurel_rank,
            num_kv_shared_layers=self.num_kv_shared_layers,
            activation_sparsity_pattern=list(self.activation_sparsity),
            max_position_embeddings=self.max_position_embeddings,
            hidden_activation="gelu_pytorch_tanh",
            pad_token_id=self.pad_token_id,
            bos_token_id=self.bos_token_id,
            eos_token_id=list(self.eos_token_ids) if len(self.eos_token_ids) > 1 else self.eos_token_ids[0],
            tie_word_embeddings=True,
        )
        for old in ("rope_theta", "rope_local_base_freq", "rope_scaling"):
            out.pop(old, None)
        return out


def _rope_thetas(t: dict) -> tuple[float, float]:
    params = t.get("rope_parameters")
    if params:
        for kind, p in params.items():
            if p and p.get("rope_type", "default") != "default":
                raise CheckpointError(f"config.json: rope_type {p.get('rope_type')!r} for {kind} is not supported")
        return float(params[GLOBAL]["rope_theta"]), float(params[SLIDING]["rope_theta"])
    if t.get("rope_scaling"):
        raise CheckpointError("config.json: rope_scaling is not supported")
    return float(t.get("rope_theta", 1_000_000.0)), float(t.get("rope_local_base_freq", 10_000.0))


def read_hf_config(checkpoint_dir: Path) -> dict:
    from models.fileio import read_json_object

    return read_json_object(checkpoint_dir, "config.json", "checkpoint", "a Hugging Face checkpoint needs config.json",
                            CheckpointError)


def _pattern(n: int) -> tuple[str, ...]:
    return tuple(GLOBAL if (i + 1) % 5 == 0 else SLIDING for i in range(n))


# The published checkpoints (google/gemma-3n-E2B, -E4B). E2B is the MatFormer slice of E4B: width 8192, layers 20-24 gone.
E4B = TextConfig()
E2B = replace(
    E4B,
    num_layers=30,
    ffn_widths=(8192,) * 30,
    layer_types=_pattern(30),
    num_kv_shared_layers=10,
    activation_sparsity=(0.95,) * 10 + (0.0,) * 20,
)
# Keeps every feature at toy size: 2 AltUp-predicted streams beyond the active one, LAuReL, PLE (with a PLE vocabulary
# smaller than the text vocabulary, as in the real model), sparsity on the first two layers, a sliding window shorter
# than test prompts, and three KV-shared layers of both attention types.
TINY = TextConfig(
    vocab_size=384,
    vocab_size_per_layer_input=320,
    hidden_size=64,
    hidden_size_per_layer_input=16,
    ffn_widths=(128,) * 8,
    num_layers=8,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    layer_types=(SLIDING, SLIDING, SLIDING, GLOBAL) * 2,
    sliding_window=8,
    laurel_rank=8,
    num_kv_shared_layers=3,
    activation_sparsity=(0.95, 0.95) + (0.0,) * 6,
    max_position_embeddings=512,
)
# The tiny preset cut to 4 layers (sliding, global, then one KV-shared layer of each type): the fewest layers with every
# kind, for tests whose cost is lowering (not a preset: no bundle uses it).
TINY_4_LAYERS = replace(
    TINY,
    num_layers=4,
    layer_types=(SLIDING, GLOBAL, SLIDING, GLOBAL),
    num_kv_shared_layers=2,
    ffn_widths=(128,) * 4,
    activation_sparsity=(0.95, 0.0, 0.0, 0.0),
)
PRESETS = {"e2b": E2B, "e4b": E4B, "tiny": TINY}
