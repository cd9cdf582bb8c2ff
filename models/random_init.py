"""Random initialisation for tests, benchmarks and the embedded default: every parameter random and deterministic
(transformers zero-initialises some, which would switch whole paths off)."""

from __future__ import annotations

import math

import torch


def randomise_(model: torch.nn.Module, seed: int) -> None:
    """Every parameter random and deterministic: matrices ~ N(0, 1/fan_in), 1-D weights (norm scales, AltUp's output
    scale) ~ 1 +- 0.2, embedding tables ~ N(0, 1/H) so that the sqrt(H) embedding scale gives unit-size activations.
    Works on our modules and on transformers' alike (parameters are visited in name order)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if p.ndim == 1:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            elif "embed" in name and p.ndim == 2 and "proj" not in name:
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[-1]))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(math.prod(p.shape[1:])))


def widened_tokenizer(vocab_size: int) -> bytes:
    """The default model's SentencePiece tokenizer (models/assets/tokenizer.model: Gemma's special and chat ids) with
    placeholder pieces `<w{id}>` appended up to `vocab_size`, so that every id a random model of that vocabulary
    generates decodes (Google's engine stops with an error on an id beyond its tokenizer). The placeholders are
    user-defined pieces, so that the text `<w{id}>` encodes to that id: a prompt of chosen ids reaches an engine that
    takes text only (the bench's PLE residency row)."""
    from pathlib import Path

    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString((Path(__file__).parent / "assets" / "tokenizer.model").read_bytes())
    for i in range(len(proto.pieces), vocab_size):
        piece = proto.pieces.add()
        piece.piece, piece.score = f"<w{i}>", 0.0
        piece.type = sentencepiece_model_pb2.ModelProto.SentencePiece.USER_DEFINED
    return proto.SerializeToString()
