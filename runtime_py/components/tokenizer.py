"""Tokenizers: SentencePiece (`tokenizer.model`, what Gemma ships and what the tiny model uses) or a Hugging Face
`tokenizer.json`."""

from __future__ import annotations

from pathlib import Path

from models.errors import InputError

# The embedded default model's tokenizer (models/assets/make_tokenizer.py).
DEFAULT_TOKENIZER = Path(__file__).resolve().parents[2] / "models" / "assets" / "tokenizer.model"
SENTENCEPIECE_FILE, HF_TOKENIZER_FILE = "tokenizer.model", "tokenizer.json"


def checkpoint_tokenizer(checkpoint: Path | None, sentencepiece_only: bool = False) -> Path:
    """The tokenizer a checkpoint folder ships (tokenizer.model, else tokenizer.json unless sentencepiece_only: the
    .litertlm packs SentencePiece only), or the embedded default model's when it ships none (or there is no
    checkpoint: the default model)."""
    names = (SENTENCEPIECE_FILE,) if sentencepiece_only else (SENTENCEPIECE_FILE, HF_TOKENIZER_FILE)
    found = [Path(checkpoint) / n for n in names if checkpoint is not None and (Path(checkpoint) / n).is_file()]
    return found[0] if found else DEFAULT_TOKENIZER


class Tokenizer:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise InputError(f"{self.path}: tokenizer missing")
        try:
            if self.path.suffix == ".json":
                from tokenizers import Tokenizer as HfTokenizer

                self._hf = HfTokenizer.from_file(str(self.path))
                self._sp = None
                self.vocab_size = self._hf.get_vocab_size()
            else:
                import sentencepiece as spm

                self._sp = spm.SentencePieceProcessor(model_file=str(self.path))
                self._hf = None
                self.vocab_size = self._sp.get_piece_size()
        except InputError:
            raise
        except Exception as e:  # both libraries raise their own types for a corrupt file
            raise InputError(f"{self.path}: not a readable tokenizer ({e})") from None

    def encode(self, text: str) -> list[int]:
        """Text to ids, without BOS: special tokens written in the text (e.g. <start_of_turn>) map to their ids."""
        if self._sp is not None:
            return list(self._sp.encode(text))
        return self._hf.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        if self._sp is not None:
            return self._sp.decode(list(ids))
        return self._hf.decode(list(ids), skip_special_tokens=False)

    def token_id(self, piece: str) -> int | None:
        if self._sp is not None:
            i = self._sp.piece_to_id(piece)
            return None if i == self._sp.unk_id() and piece != self._sp.id_to_piece(i) else i
        return self._hf.token_to_id(piece)
