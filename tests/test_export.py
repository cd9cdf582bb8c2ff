"""torch.export of the decoder graph for prefill (T > 1) and decode (T = 1) over the static KV cache."""

import torch

from models import load_pretrained


class DecoderGraph(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, inputs_embeds, per_layer_rows, input_pos):
        return self.model.forward_embeddings(inputs_embeds, per_layer_rows, input_pos)


def _inputs(model, ids, start):
    T = ids.shape[1]
    return model.embed(ids), model.per_layer_embedding(ids), torch.arange(start, start + T)


def test_prefill_and_decode_export_and_run_like_eager(tiny_checkpoint):
    model = load_pretrained(tiny_checkpoint, dtype=torch.float32)
    cfg = model.config
    cache_len, prompt_len = 32, 12
    model.setup_caches(cache_len)
    prompt = torch.randint(0, cfg.vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        prefill_ep = torch.export.export(DecoderGraph(model), _inputs(model, prompt, 0)).run_decompositions({})
        decode_ep = torch.export.export(DecoderGraph(model), _inputs(model, prompt[:, :1], prompt_len)).run_decompositions({})

    for ep in (prefill_ep, decode_ep):
        mutated = [s.target for s in ep.graph_signature.output_specs if s.kind.name == "BUFFER_MUTATION"]
        # Only the layers that own a cache write one (2 buffers each); KV-shared layers own none.
        assert len(mutated) == 2 * cfg.first_kv_shared_layer
        assert not [s for s in ep.graph_signature.output_specs if s.kind.name == "PARAMETER_MUTATION"]
        ops = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
        assert not any("erfinv" in op for op in ops)

    # Run the exported programs on one shared cache state and compare with eager, step by step.
    exported_prefill, exported_decode = prefill_ep.module(), decode_ep.module()
    with torch.no_grad():
        model.reset_caches()
        eager = [model.forward_embeddings(*_inputs(model, prompt, 0))]
        token = int(eager[-1][0, -1].argmax())
        tokens = [token]
        for pos in range(prompt_len, prompt_len + 5):
            eager.append(model.forward_embeddings(*_inputs(model, torch.tensor([[token]]), pos)))
            token = int(eager[-1][0, -1].argmax())
            tokens.append(token)

        exported = [exported_prefill(*_inputs(model, prompt, 0))]
        for i, pos in enumerate(range(prompt_len, prompt_len + 5)):
            exported.append(exported_decode(*_inputs(model, torch.tensor([[tokens[i]]]), pos)))
    for a, b in zip(eager, exported):
        assert (a - b).abs().max().item() <= 1e-5
