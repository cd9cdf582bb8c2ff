"""Writes models/assets/tokenizer.model: the tiny model's SentencePiece tokenizer (384 pieces, Gemma's special ids).

Run `python models/assets/make_tokenizer.py`. Training is deterministic (one thread, no sampling or shuffling of
the fixed corpus below), so the file only changes when this script does. Ids: <pad>=0, <eos>=1, <bos>=2, <unk>=3
(Gemma's order), then the chat markers <start_of_turn>=4 and <end_of_turn>=5 and the newline (6) as user-defined
pieces that the tokenizer never splits, then 377 BPE pieces.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import sentencepiece as spm

VOCAB_SIZE = 384  # models.config.TINY.vocab_size
CHAT_MARKERS = ("<start_of_turn>", "<end_of_turn>")
# The chat template puts a newline after each role name; as its own piece it survives encode/decode.
NEWLINE = "\n"
PATH = Path(__file__).with_name("tokenizer.model")

CORPUS = """\
The quick brown fox jumps over the lazy dog while the small cat sleeps in the warm sun.
A phone runs the language model on its own processor, without sending a single word to a server.
The model reads the prompt one token at a time and writes the answer one token at a time.
Every layer keeps a cache of keys and values, so that the next token does not repeat the work of the last.
Small models are fast and cheap; large models know more and need more memory.
She opened the window, looked at the rain and decided to stay at home with a good book.
We measured the error of every variant against the float model and wrote the numbers down.
The weather today is cold in the morning, mild in the afternoon and clear in the evening.
Please write a short story about a robot who learns to cook bread for the people of a quiet village.
He asked the teacher how the moon moves around the earth and why the tides rise and fall.
Good tests compare real numbers with a reference and say why the tolerance is what it is.
Children like to play outside, to run in the park, to climb trees and to watch the birds.
The train leaves the station at seven, stops in three towns and arrives at the coast before noon.
Water boils at one hundred degrees, and ice melts when the air around it becomes warm enough.
Thank you for your help; the answer was clear, short and exactly what I needed to know.
What is the capital of France? Paris is the capital of France, and it lies on the river Seine.
Could you translate this sentence into German, Spanish and Italian for my friends?
The garden has roses, tulips and a small tree that gives apples at the end of the summer.
Numbers such as 1, 2, 3, 10, 42 and 2024 appear in dates, prices, counts and measurements.
Music, painting and poetry help people share what they feel when words alone are not enough.
"""


def train() -> bytes:
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS.splitlines() * 4),
        model_writer=model,
        model_type="bpe",
        vocab_size=VOCAB_SIZE,
        pad_id=0,
        eos_id=1,
        bos_id=2,
        unk_id=3,
        pad_piece="<pad>",
        eos_piece="<eos>",
        bos_piece="<bos>",
        unk_piece="<unk>",
        user_defined_symbols=[*CHAT_MARKERS, NEWLINE],
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,  # as Gemma's tokenizer: no space is invented before the text
        character_coverage=1.0,
        normalization_rule_name="identity",  # no NFKC table: keeps the file a few KiB
        num_threads=1,
        input_sentence_size=0,
        shuffle_input_sentence=False,
        minloglevel=2,
    )
    return model.getvalue()


def main() -> None:
    data = train()
    processor = spm.SentencePieceProcessor(model_proto=data)
    assert processor.get_piece_size() == VOCAB_SIZE, processor.get_piece_size()
    tmp = PATH.with_name(PATH.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, PATH)
    markers = {m: processor.piece_to_id(m) for m in CHAT_MARKERS}
    print(f"wrote {PATH} ({len(data)} bytes, {VOCAB_SIZE} pieces, chat markers {markers})")


if __name__ == "__main__":
    main()
