"""Stop-token detection: generation ends at any of the bundle's stop ids (EOS, <end_of_turn>)."""

from __future__ import annotations


class StopDetector:
    def __init__(self, stop_ids: list[int]):
        self.stop_ids = frozenset(int(i) for i in stop_ids)

    def __call__(self, token: int) -> bool:
        return token in self.stop_ids


def stop_ids_for(eos_ids, tokenizer) -> list[int]:
    """The model's EOS ids plus the chat template's <end_of_turn>, when the tokenizer has it."""
    ids = set(int(i) for i in eos_ids)
    end_of_turn = tokenizer.token_id("<end_of_turn>")
    if end_of_turn is not None:
        ids.add(end_of_turn)
    return sorted(ids)
