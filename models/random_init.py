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
            p.copy_(random_value(name, p.shape, gen))


def random_value(name: str, shape, gen: torch.Generator) -> torch.Tensor:
    """randomise_'s draw for one parameter, or for a block of its leading rows: the scale depends on shape[1:] only."""
    if len(shape) == 1:
        return 1.0 + 0.2 * torch.randn(shape, generator=gen)
    if "embed" in name and len(shape) == 2 and "proj" not in name:
        return torch.randn(shape, generator=gen) / math.sqrt(shape[-1])
    return torch.randn(shape, generator=gen) / math.sqrt(math.prod(shape[1:]))


def random_tensors(shapes: dict[str, tuple[int, ...]], seed: int, dtype: torch.dtype, block: int = 1 << 24,
                   progress=None):
    """The values randomise_ gives parameters of these shapes, one tensor at a time and drawn in blocks of rows, so
    that a model larger than memory is written without ever being whole (the generator's stream does not depend on
    how it is split into draws of whole multiples of 16 values; tests/test_real_shaped.py checks it). Yields
    (name, tensor); progress(done_bytes, total_bytes) after each tensor."""
    gen = torch.Generator().manual_seed(seed)
    size = torch.empty((), dtype=dtype).element_size()
    total, done = sum(math.prod(s) for s in shapes.values()) * size, 0
    for name in sorted(shapes):
        shape = tuple(shapes[name])
        out = torch.empty(shape, dtype=dtype)
        rows = shape[0] if len(shape) == 1 else max(16, block // math.prod(shape[1:]) // 16 * 16)
        for start in range(0, shape[0], rows):
            stop = min(start + rows, shape[0])
            out[start:stop] = random_value(name, (stop - start, *shape[1:]), gen)
        done += out.numel() * size
        yield name, out
        if progress is not None:
            progress(done, total)


# The media tokens as Gemma 3n's tokenizer spells them, by their config.json ids: LiteRT-LM writes these strings
# into a Gemma 3n prompt as text (its defaults for Gemma 3n, runtime/util PopulateDefaultGemma3N), so each must encode
# to its one id.
MEDIA_PIECES = {"boi_token_id": "<start_of_image>", "eoi_token_id": "<end_of_image>",
                "image_token_id": "<image_soft_token>", "boa_token_id": "<start_of_audio>",
                "eoa_token_id": "<end_of_audio>", "audio_token_id": "<audio_soft_token>"}


def widened_tokenizer(vocab_size: int, hf_config: dict | None = None) -> bytes:
    """The default model's SentencePiece tokenizer (models/assets/tokenizer.model: Gemma's special and chat ids) with
    placeholder pieces `<w{id}>` appended up to `vocab_size`, so that every id a random model of that vocabulary
    generates decodes (Google's engine stops with an error on an id beyond its tokenizer). The placeholders are
    user-defined pieces, so that the text `<w{id}>` encodes to that id: a prompt of chosen ids reaches an engine that
    takes text only (the bench's PLE residency row). hf_config: a checkpoint's config.json, whose media token ids
    get their MEDIA_PIECES names instead (vocab_size then the text config's, which counts the media ids too)."""
    from pathlib import Path

    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString((Path(__file__).parent / "assets" / "tokenizer.model").read_bytes())
    named = {hf_config[key]: piece for key, piece in MEDIA_PIECES.items() if key in (hf_config or {})}
    for i in range(len(proto.pieces), vocab_size):
        piece = proto.pieces.add()
        piece.piece, piece.score = named.get(i, f"<w{i}>"), 0.0
        piece.type = sentencepiece_model_pb2.ModelProto.SentencePiece.USER_DEFINED
    return proto.SerializeToString()
