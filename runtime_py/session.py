"""A session: prompt -> tokens, the same on every backend.

Prefill runs the prompt through fixed-length prefill graphs: full chunks in order, then, if a remainder is left,
the final chunk is the prompt's last T tokens (overlapping the previous chunk; recomputing a position writes the same
keys and values), so the last prompt position is always a real token and its logits are exact. A prompt shorter
than every prefill length goes through the decode graph token by token.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from models.errors import InputError
from runtime_py.components.chat_template import render
from runtime_py.components.sampler import Sampler
from runtime_py.components.stop import StopDetector
from runtime_py.components.tokenizer import Tokenizer


@dataclass
class Timing:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    time_to_first_token_s: float = 0.0
    stopped_by: str = ""

    def line(self, peak_rss_mb: float) -> str:
        prefill_tps = self.prompt_tokens / self.prefill_s if self.prefill_s else float("nan")
        decode_tps = (self.generated_tokens - 1) / self.decode_s if self.decode_s else float("nan")
        return (f"ttft {self.time_to_first_token_s * 1e3:.1f} ms | prefill {prefill_tps:.1f} tok/s "
                f"({self.prompt_tokens} tokens) | decode {decode_tps:.1f} tok/s ({self.generated_tokens} tokens) | "
                f"peak RSS {peak_rss_mb:.0f} MB | stopped by {self.stopped_by}")


@dataclass
class Session:
    executor: object
    tokenizer: Tokenizer
    per_layer_rows: object  # callable ids [T] -> [T, L, P] (the PLE lookup)
    bos_id: int
    stop_ids: list[int]
    vocab_size: int
    timing: Timing = field(default_factory=Timing)
    notice: str = ""

    def prompt_ids(self, prompt: str | list[dict] | list[int]) -> list[int]:
        """A string is wrapped in the chat template as one user turn; a list of dicts is a conversation; a list of
        ints is taken as token ids (BOS included by the caller)."""
        if isinstance(prompt, list) and prompt and all(isinstance(i, (int, np.integer)) for i in prompt):
            ids = [int(i) for i in prompt]
        else:
            if isinstance(prompt, str):
                if not prompt.strip():
                    raise InputError("empty prompt")
                prompt = [{"role": "user", "content": prompt}]
            ids = [self.bos_id] + self.tokenizer.encode(render(prompt))
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise InputError(f"token id {bad[0]} is out of range: the vocabulary has {self.vocab_size} ids")
        return ids

    def _step_inputs(self, ids: list[int]):
        arr = np.asarray(ids, dtype=np.int64)
        return self.executor.embed(arr), self.per_layer_rows(arr)[None]

    def prefill(self, ids: list[int]) -> np.ndarray:
        ex = self.executor
        if len(ids) > ex.cache_len:
            raise InputError(f"prompt of {len(ids)} tokens does not fit the KV cache of {ex.cache_len}")
        ex.reset()
        n = len(ids)
        usable = [t for t in sorted(ex.prefill_lengths, reverse=True) if t <= n]
        if not usable:
            logits = None
            for pos, token in enumerate(ids):
                logits = ex.decode(*self._step_inputs([token]), pos)
            return logits
        T = usable[0]
        starts = list(range(0, n - T + 1, T))
        if starts[-1] + T < n:
            starts.append(n - T)
        for start in starts:
            logits = ex.prefill(*self._step_inputs(ids[start : start + T]), start)
        return logits

    def generate_ids(
        self, prompt, max_new_tokens: int = 32, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
        seed: int = 0,
    ) -> Iterator[int]:
        """Streams generated token ids (stop tokens excluded). Stops at a stop token, after max_new_tokens, or when
        the KV cache is full (then `notice` says so)."""
        sampler, stop = Sampler(temperature, top_k, top_p, seed), StopDetector(self.stop_ids)
        ids = self.prompt_ids(prompt)
        self.timing, self.notice = Timing(prompt_tokens=len(ids)), ""
        t0 = time.perf_counter()
        logits = self.prefill(ids)
        self.timing.prefill_s = time.perf_counter() - t0
        pos, t1 = len(ids), time.perf_counter()
        for i in range(max_new_tokens):
            token = sampler(logits)
            if i == 0:
                self.timing.time_to_first_token_s = time.perf_counter() - t0
            self.timing.generated_tokens += 1
            if stop(token):
                self.timing.stopped_by = f"stop token {token}"
                break
            yield token
            if i == max_new_tokens - 1:
                self.timing.stopped_by = "max_new_tokens"
                break
            if pos >= self.executor.cache_len:
                self.timing.stopped_by = "full KV cache"
                self.notice = (f"stopped: the KV cache is full ({self.executor.cache_len} positions); "
                               "build the bundle with a larger --cache-len for longer generations")
                break
            logits = self.executor.decode(*self._step_inputs([token]), pos)
            pos += 1
        self.timing.decode_s = time.perf_counter() - t1

    def generate(self, prompt, max_new_tokens: int = 32, **sampling) -> Iterator[str]:
        """Streams text pieces; decoding the growing sequence keeps multi-byte characters and spaces intact."""
        out: list[int] = []
        text = ""
        for token in self.generate_ids(prompt, max_new_tokens, **sampling):
            out.append(token)
            new_text = self.tokenizer.decode(out)
            yield new_text[len(text):]
            text = new_text
