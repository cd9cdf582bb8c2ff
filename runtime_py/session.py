"""A session: prompt (text, and images and audio for a whole Gemma 3n) -> tokens, the same on every backend.

Every prompt position is embedded before the prefill. A whole model (a bundle with encoders) embeds as transformers'
Gemma3nForConditionalGeneration and Gemma3n.embed_prompt do, with or without media: text ids take the executor's
token table, ids of the vision and audio vocabularies the embedders' hard-token rows (in the prompt and when
generated), and the soft-token positions of each media span the encoders' outputs, in span order; the golden vectors
of its bundles and Google's engine on its .litertlm embed the same way. A text-only model takes every id from the
token table. Per-layer (PLE) rows are looked up by
id, ids beyond the PLE table reading row 0.

Prefill runs the embedded prompt through fixed-length prefill graphs: full chunks in order, then, if a remainder is
left, the final chunk is the prompt's last T tokens (overlapping the previous chunk; recomputing a position writes the same
keys and values), so the last prompt position is always a real token and its logits are exact. A prompt shorter
than every prefill length goes through the shortest prefill graph padded, then its last token through decode again
for the logits (a 62-token chat prompt took 2.15 s to its first token through decode alone on the E2B-shaped
ExecuTorch bundle); only a prompt under 1/SHORT_PROMPT_SHARE of that length (or a single token) goes token by token,
since a prefill call costs about as much as 5-6 decode steps (E2B-shaped model, prefill 128: LiteRT 55 ms vs 10.5 ms).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np

from contract.bundle import BundleManifest
from models.errors import InputError
from models.multimodal import MediaTokens
from runtime_py.components.chat_template import render
from runtime_py.components.media import (
    MediaPrompt,
    MediaTokenRows,
    as_list,
    build_media_prompt,
    has_media_items,
    image_frames,
)
from runtime_py.components.sampler import Sampler
from runtime_py.components.stop import StopDetector
from runtime_py.components.timing import Timing
from runtime_py.components.tokenizer import Tokenizer
from runtime_py.executors.base import EncoderRunner, Executor

# Prompts from 1/16 of the shortest prefill length up go through it padded (see the module docstring).
SHORT_PROMPT_SHARE = 16
NO_ENCODERS = ("this bundle has no image or audio encoders (it was built from a text-only model; bundle a whole "
               "Gemma 3n: g3n bundle without --checkpoint or --text-only, or a Gemma3nForConditionalGeneration "
               "checkpoint)")


@dataclass
class Session:
    executor: Executor
    tokenizer: Tokenizer
    per_layer_rows: Callable[[np.ndarray], np.ndarray]  # ids [T] -> [T, L, P] (the PLE lookup)
    bos_id: int
    stop_ids: list[int]
    vocab_size: int
    timing: Timing = field(default_factory=Timing)
    notice: str = ""
    # A whole Gemma 3n's parts (None for a text-only model): the image/audio runner, the embedders' hard-token rows
    # and the media span ids.
    encoders: EncoderRunner | None = None
    media_rows: MediaTokenRows | None = None
    media_tokens: MediaTokens | None = None
    ple_vocab_size: int | None = None  # ids at or beyond it read PLE row 0 (None: the lookup's own rule)
    source: str = ""  # the bundle, for messages
    manifest: BundleManifest | None = None  # a bundle's typed manifest, set by engine.open_bundle

    accepts_media = True  # generate() takes images and audio (a bundle without encoders says so when given them)

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
        self._check_ids(ids)
        return ids

    def _check_ids(self, ids: list[int]) -> None:
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise InputError(f"token id {bad[0]} is out of range: the vocabulary has {self.vocab_size} ids")

    def media_prompt(self, prompt, images=None, audio=None, image_size: int | None = None) -> MediaPrompt:
        """The prompt's ids with a span per image (video frame) and per audio window, and the encoders' inputs.
        Checks everything (files, encoders, sizes, cache room) before any encoder runs."""
        where = f"{self.source}: " if self.source else ""
        if self.encoders is None:
            raise InputError(where + NO_ENCODERS)
        if isinstance(prompt, list) and prompt and all(isinstance(i, (int, np.integer)) for i in prompt):
            raise InputError("a prompt of token ids takes no images or audio: give the prompt as text")
        sizes = tuple(self.encoders.image_sizes)
        size = image_size if image_size is not None else sizes[0] if sizes else 768
        if sizes and size not in sizes:
            raise InputError(f"--image-size {size}: the vision encoder takes {', '.join(map(str, sizes))} px")
        media = build_media_prompt(prompt, self.tokenizer, self.bos_id, self.media_tokens, images, audio, size)
        for kind, present, wanted in (("vision", self.encoders.has_vision, media.pixel_values),
                                      ("audio", self.encoders.has_audio, media.audio_windows)):
            if wanted and not present:
                raise InputError(f"{where}this bundle has no {kind} encoder")
        self._check_ids(media.ids)
        if len(media.ids) > self.executor.cache_len:
            raise InputError(f"prompt of {len(media.ids)} tokens ({media.summary()} included) does not fit the KV "
                             f"cache of {self.executor.cache_len}; use fewer or shorter media, or build the bundle "
                             "with a larger --cache-len")
        return media

    def embed_ids(self, ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """ids [T] -> (embeddings [1, T, H], per-layer rows [1, T, L, P]), looked up in chunks of at most the longest
        prefill length (the most an exported lookup takes). A whole model's media ids take the embedders' rows."""
        arr = np.asarray(ids, dtype=np.int64)
        step = max(self.executor.prefill_lengths)
        ple_ids = arr if self.ple_vocab_size is None else np.where(arr < self.ple_vocab_size, arr, 0)
        chunks = range(0, len(arr), step)
        embeds = np.concatenate([self.executor.embed(arr[i : i + step]) for i in chunks], axis=1)
        rows = np.concatenate([self.per_layer_rows(ple_ids[i : i + step]) for i in chunks], axis=0)[None]
        if self.media_rows is not None:
            embeds = self.media_rows.apply(arr, embeds)
        return embeds, rows

    def encode_media(self, media: MediaPrompt) -> dict[int, np.ndarray]:
        """The encoders' outputs by soft-token id: {image id: [images * 256, H], audio id: [windows * 188, H]}."""
        tokens, out = self.media_tokens, {}
        for token, outputs in ((tokens.image, [self.encoders.image(p) for p in media.pixel_values]),
                               (tokens.audio, [self.encoders.audio(f, m) for f, m in media.audio_windows])):
            if outputs:
                out[token] = np.concatenate([o[0] for o in outputs]).astype(np.float32)
        return out

    def embed_media_prompt(self, media: MediaPrompt, soft: dict[int, np.ndarray] | None = None):
        """(embeddings [1, T, H] with the encoders' outputs at the soft-token positions, per-layer rows)."""
        soft = self.encode_media(media) if soft is None else soft
        embeds, rows = self.embed_ids(media.ids)
        ids = np.asarray(media.ids)
        for token, values in soft.items():
            embeds[0, ids == token] = values.astype(embeds.dtype)
        return embeds, rows

    def prefill(self, ids: list[int]) -> np.ndarray:
        return self.prefill_embeddings(*self.embed_ids(ids))

    def prefill_embeddings(self, embeds: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """embeds [1, n, H], per-layer rows [1, n, L, P] from position 0 -> the last position's logits."""
        ex = self.executor
        n = embeds.shape[1]
        if n > ex.cache_len:
            raise InputError(f"prompt of {n} tokens does not fit the KV cache of {ex.cache_len}")
        ex.reset()
        usable = [t for t in sorted(ex.prefill_lengths, reverse=True) if t <= n]
        shortest = min(ex.prefill_lengths)
        if not usable and n >= max(2, shortest // SHORT_PROMPT_SHARE) and shortest <= ex.cache_len:
            # The shortest prefill graph takes the prompt padded with copies of its last token: their cache rows lie
            # past the prompt, masked until decode overwrites them, so the prompt's rows are exact. Decode then
            # runs the last prompt token again (rewriting its own row) for the logits, as LiteRT-LM does.
            pad = shortest - n
            ex.prefill(np.concatenate([embeds, np.repeat(embeds[:, -1:], pad, axis=1)], axis=1),
                       np.concatenate([rows, np.repeat(rows[:, -1:], pad, axis=1)], axis=1), 0)
            return ex.decode(embeds[:, n - 1 :], rows[:, n - 1 :], n - 1)
        if not usable:
            logits = None
            for pos in range(n):
                logits = ex.decode(embeds[:, pos : pos + 1], rows[:, pos : pos + 1], pos)
            return logits
        T = usable[0]
        starts = list(range(0, n - T + 1, T))
        if starts[-1] + T < n:
            starts.append(n - T)
        for start in starts:
            logits = ex.prefill(embeds[:, start : start + T], rows[:, start : start + T], start)
        return logits

    def generate_ids(
        self, prompt, max_new_tokens: int = 32, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
        seed: int = 0, images=None, audio=None, image_size: int | None = None,
    ) -> Iterator[int]:
        """Streams generated token ids (stop tokens excluded). Stops at a stop token, after max_new_tokens, or when
        the KV cache is full (then `notice` says so).

        images: an image (path, PIL.Image, uint8 array) or a list of images and videos (a video: a list of frames);
        audio: a WAV/FLAC path or a 16 kHz array, or a list of them. With a string prompt they come first in the user
        turn (images, then audio, then the text); a conversation places them with image/audio content items.
        image_size: the vision encoder's input size (default: the bundle's first)."""
        sampler, stop = Sampler(temperature, top_k, top_p, seed), StopDetector(self.stop_ids)
        media = soft = None
        if image_frames(images) or as_list(audio) or has_media_items(prompt):
            t0 = time.perf_counter()  # the time to the first token includes preprocessing and the encoders
            media = self.media_prompt(prompt, images, audio, image_size)
            soft = self.encode_media(media)
            ids = media.ids
        else:
            ids = self.prompt_ids(prompt)
            t0 = time.perf_counter()
        self.timing, self.notice = Timing(prompt_tokens=len(ids)), ""
        t_prefill = time.perf_counter()
        self.timing.media_s = t_prefill - t0 if media is not None else 0.0
        embeds, rows = self.embed_ids(ids) if media is None else self.embed_media_prompt(media, soft)
        logits = self.prefill_embeddings(embeds, rows)
        self.timing.prefill_s = time.perf_counter() - t_prefill
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
            logits = self.executor.decode(*self.embed_ids([token]), pos)
            pos += 1
        self.timing.decode_s = time.perf_counter() - t1

    def generate(self, prompt, max_new_tokens: int = 32, **options) -> Iterator[str]:
        """Streams text pieces; decoding the growing sequence keeps multi-byte characters and spaces intact. Options:
        those of generate_ids (sampling, images, audio, image_size)."""
        out: list[int] = []
        text = ""
        for token in self.generate_ids(prompt, max_new_tokens, **options):
            out.append(token)
            new_text = self.tokenizer.decode(out)
            yield new_text[len(text):]
            text = new_text
