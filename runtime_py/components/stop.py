"""Stop-token detection: generation ends at any of the bundle's stop ids (EOS, <end_of_turn>)."""

from __future__ import annotations


class StopDetector:
    def __init__(self, stop_ids: list[int]):
        self.stop_ids = frozenset(int(i) for i in stop_ids)

    def __call__(self, token: int) -> bool:
        return token in self.stop_ids
