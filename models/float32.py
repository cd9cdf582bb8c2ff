"""A model in float32 without a float32 copy of the whole: shared rather than copied, cast a part at a time.

The exporters cast each part they convert (exporters.weights); the bundle's golden outputs and the torch backend
compute from a bf16 checkpoint through float32_reference, with the float32 model's outputs.
"""

from __future__ import annotations

import copy
import itertools

import torch
from torch import nn


def sharing_copy(module: nn.Module) -> nn.Module:
    """A copy of `module` whose parameters and buffers are the original's tensors: module swaps and quantization
    then replace attributes of the copy, never of the caller's model, and no weight is duplicated."""
    memo = {id(t): t for t in itertools.chain(module.parameters(), module.buffers())}
    return copy.deepcopy(module, memo)


def float32_(module: nn.Module) -> nn.Module:
    """`module` cast to float32 with new Parameter objects: a copy's cast never writes into the caller's shared
    Parameters (a bf16 checkpoint stays bf16), and a float32 tensor is kept as it is, not copied."""
    overwrite = torch.__future__.get_overwrite_module_params_on_conversion()
    torch.__future__.set_overwrite_module_params_on_conversion(True)
    try:
        return module.float()
    finally:
        torch.__future__.set_overwrite_module_params_on_conversion(overwrite)


def float32_reference(model: nn.Module) -> nn.Module:
    """A float32 copy of a TextDecoder or Gemma3n for reference outputs (golden vectors and media) that computes what
    `model.float()` would, bit for bit, without a float32 copy of the whole: each decoder layer is cast on entry and
    back to `model`'s own tensors on exit (one layer is float32 at a time), the PLE table stays as it is and its rows
    are cast as they are read (E2B's table is 9.4 GB in float32), and the rest (the token table, which is also the LM
    head, and the encoders: 6.4 GB of E2B) is cast once. `model` itself is left as it is; a float32 model, or such a
    reference, is its own reference."""
    if getattr(model, "is_float32_reference", False) or all(t.dtype == torch.float32 for t in model.parameters()):
        return model.eval()
    reference = sharing_copy(model)
    reference.is_float32_reference = True
    lm = getattr(reference, "language_model", reference)
    layers, table = lm.layers, lm.per_layer_embedding
    lm.layers, lm.per_layer_embedding = nn.ModuleList(), None
    float32_(reference)
    lm.layers, lm.per_layer_embedding = layers, table
    table.compute_dtype = torch.float32
    for layer in layers:
        _float32_while_running(layer)
    return reference.eval()


def _float32_while_running(module: nn.Module) -> None:
    """Hooks that cast `module` to float32 for each call (new tensors) and put its own tensors back after it."""
    own = {}

    def cast(mod: nn.Module, args) -> None:
        own[mod] = [(store, name, t) for m in mod.modules() for store in (m._parameters, m._buffers)
                    for name, t in store.items() if t is not None]
        float32_(mod)

    def restore(mod: nn.Module, args, output) -> None:
        for store, name, t in own.pop(mod):
            store[name] = t

    module.register_forward_pre_hook(cast)
    module.register_forward_hook(restore)
