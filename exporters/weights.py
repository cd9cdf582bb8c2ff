"""How every exporter holds a real-size checkpoint's weights: loaded in its own dtype (a bf16 E2B is 22 GB in
float32, this machine has 24), shared rather than copied, and cast to float32 a part at a time, each part for as long
as its conversion needs it."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from models.fileio import release_mapped_pages
from models.float32 import float32_, sharing_copy
from models.text import TextDecoder, in_dtype


def float32_copy(module: nn.Module) -> nn.Module:
    """`module` in float32 for one conversion, the caller's left in its dtype: what is float32 already is shared.
    The cast read the caller's weights: their checkpoint's pages are reclaimed (release_checkpoint_pages)."""
    copied = float32_(sharing_copy(module)).eval()
    release_checkpoint_pages(module)
    return copied


def release_checkpoint_pages(module: nn.Module) -> None:
    """The pages of the memory-mapped checkpoint behind `module`'s weights, once read into a conversion's own copy,
    given back (models.fileio.release_mapped_pages: the contents stay, a later read faults them in again), so that
    a real-size export's memory is its conversion's, not the checkpoint's as well."""
    release_mapped_pages([*module.parameters(), *module.buffers()])


class LinearHeadDecoder(TextDecoder):
    """The decoder with its tied LM head as an nn.Linear of its own (sharing the embedding's storage), so that torchao
    quantizes the head like any other Linear and the token-embedding table stays as it is. softcap_in_head: the head's
    weight is already divided by the logit softcap (decoder_half(fold_scales=True))."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.softcap_in_head = False

    def logits(self, hidden: Tensor) -> Tensor:
        logits = self.lm_head(hidden)
        cap = self.config.final_logit_softcapping
        if not cap:
            return logits
        return torch.tanh(logits if self.softcap_in_head else logits / cap) * cap


def decoder_half(model: TextDecoder, fold_scales: bool = False) -> LinearHeadDecoder:
    """The decoder graph's half of `model`: no PLE table (a lookup outside the graph, 2.0B of E2B's parameters), the
    token embedding kept only as the LM head, every weight `model`'s own tensor.

    fold_scales: the two constant multiplies that follow a Linear (the softcap's 1/cap after the LM head, the
    per-layer projection's scale) multiplied into its weight, in float32 (new tensors, the caller's untouched), as
    TFLite's converter folds them itself. In lightweight conversion of the whole TextDecoder (no half), the
    converter wrote those two folded weights once per signature (E2B's LM head: 2.1 GB in float32 each time); the
    half with its scales folded here writes each once (on a 4-layer decoder of E2B's widths the half alone does too:
    which of the two changes mattered is not isolated)."""
    with torch.device("meta"):
        half = LinearHeadDecoder(model.config)
    state = {k: v for k, v in model.state_dict().items()
             if not k.startswith("per_layer_embedding.") and k != "embed_tokens.weight"}
    state["lm_head.weight"] = model.embed_tokens.weight.detach()
    half.per_layer_embedding = half.embed_tokens = None
    half.load_state_dict(state, assign=True)
    half.init_buffers()
    if fold_scales:
        cap = model.config.final_logit_softcapping
        if cap:
            half.lm_head.weight = nn.Parameter(half.lm_head.weight.float() * in_dtype(1.0 / cap, torch.float32),
                                               requires_grad=False)
            half.softcap_in_head = True
        projection = half.per_layer_model_projection
        scale = in_dtype(half.per_layer_projection_scale, torch.float32)
        projection.weight = nn.Parameter(projection.weight.float() * scale, requires_grad=False)
        half.per_layer_projection_scale = 1.0
    return half.eval()
