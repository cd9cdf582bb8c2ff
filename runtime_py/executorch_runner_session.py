"""The executorch-runner backend: ExecuTorch's stock `MultimodalRunner` (extension/llm/runner, the C++ runner of
ExecuTorch's Android and iOS demo apps, through its Python bindings) on a bundle's model.pte, as a session of its own:
the runner embeds, prefills, samples and stops by itself, so it takes the place of Session, not of an executor.
Users see here what an app built on the runner will give.

The prompt is built as every other backend builds it (chat template, BOS, media spans: runtime_py.components.media)
and handed to the runner as its inputs in order: each run of text ids as a token input, each image as an image
input ([1, 3, S, S] float in [0, 1]), each 30 s audio window as an audio input ([1, 128 + 1, 2997]: the log-mel bins
and the padding mask, models.encoders.runner_audio_input). The runner prefills each input with one text_decoder call.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from models.encoders import runner_audio_input
from models.errors import InputError
from models.multimodal import MediaTokens
from runtime_py.components.chat_template import render
from runtime_py.components.media import as_list, build_media_prompt, has_media_items, image_frames
from runtime_py.components.timing import Timing
from runtime_py.components.tokenizer import Tokenizer
from runtime_py.executors.base import native_output_to_log, stdout_to_log


class ExecuTorchRunnerSession:
    """ExecuTorch's MultimodalRunner on a bundle's model.pte and per_layer_embeddings.ptd. The runner writes each
    piece to the process's stdout as it goes and returns when done, so the pieces come here after the generation
    (the runner's own printing goes to the runtime log). Greedy or temperature sampling only (the runner's sampler
    has no top-k / top-p)."""

    def __init__(self, pte: Path, ptd: Path, tokenizer: Path, bos_id: int, cache_len: int,
                 media_tokens: MediaTokens | None, image_sizes: tuple[int, ...]):
        with native_output_to_log():
            import executorch.kernels.quantized  # noqa: F401  (registers the kernels quantized programs call)
            from executorch.extension.llm import runner

            try:
                self.runner = runner.MultimodalRunner(str(pte), str(tokenizer), str(ptd))
            except Exception as e:  # the bindings raise RuntimeError with the runner's error code
                raise InputError(f"{pte}: ExecuTorch's MultimodalRunner cannot load it ({e})") from None
        self.llm_runner, self.pte = runner, Path(pte)
        self.tokenizer, self.bos_id, self.cache_len = Tokenizer(tokenizer), bos_id, cache_len
        self.media_tokens, self.image_sizes = media_tokens, tuple(image_sizes)
        self.accepts_media = media_tokens is not None
        self.notice, self.timing = "", None

    def runner_inputs(self, ids: list[int], pixel_values: list, audio_windows: list) -> list:
        """The prompt's ids, its media spans replaced by the encoders' inputs, as the runner's input list."""
        soft = {}
        if self.media_tokens is not None:
            soft = {self.media_tokens.image: iter(pixel_values), self.media_tokens.audio: iter(audio_windows)}
        inputs, run, i = [], [], 0
        while i < len(ids):
            if ids[i] not in soft:
                run.append(ids[i])
                i += 1
                continue
            if run:
                inputs.append(self.llm_runner.make_token_input(run))
                run = []
            token, start = ids[i], i
            while i < len(ids) and ids[i] == token:
                i += 1
            per_item = (self.media_tokens.image_soft_tokens if token == self.media_tokens.image
                        else self.media_tokens.audio_soft_tokens)
            for _ in range((i - start) // per_item):
                item = next(soft[token])
                if token == self.media_tokens.image:
                    inputs.append(self.llm_runner.make_image_input(torch.from_numpy(np.ascontiguousarray(item))))
                else:
                    inputs.append(self.llm_runner.make_audio_input(torch.from_numpy(runner_audio_input(*item))))
        if run:
            inputs.append(self.llm_runner.make_token_input(run))
        return inputs

    def generate(self, prompt, max_new_tokens: int = 32, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, seed: int = 0, images=None, audio=None, image_size: int | None = None):
        if top_k or top_p < 1.0:
            raise InputError("--backend executorch-runner: the runner samples by temperature only (no top-k/top-p)")
        t0 = time.perf_counter()
        if image_frames(images) or as_list(audio) or has_media_items(prompt):
            if self.media_tokens is None:
                raise InputError(f"{self.pte}: this bundle has no encoders")
            size = image_size if image_size is not None else self.image_sizes[0] if self.image_sizes else 768
            if self.image_sizes and size != self.image_sizes[0]:
                # The runner calls the method named vision_encoder: the bundle's first (default) size.
                raise InputError(f"--image-size {size}: the runner's vision_encoder takes {self.image_sizes[0]} px")
            media = build_media_prompt(prompt, self.tokenizer, self.bos_id, self.media_tokens, images, audio, size)
            ids, pixel_values, windows = media.ids, media.pixel_values, media.audio_windows
        else:
            if isinstance(prompt, str):
                if not prompt.strip():
                    raise InputError("empty prompt")
                prompt = [{"role": "user", "content": prompt}]
            ids, pixel_values, windows = [self.bos_id] + self.tokenizer.encode(render(prompt)), [], []
        if len(ids) >= self.cache_len:
            raise InputError(f"prompt of {len(ids)} tokens does not fit the KV cache of {self.cache_len}")
        inputs = self.runner_inputs(ids, pixel_values, windows)
        config = self.llm_runner.GenerationConfig(echo=False, max_new_tokens=max_new_tokens, temperature=temperature)
        pieces, stats = [], {}
        t_run = time.perf_counter()
        with native_output_to_log(), stdout_to_log():
            self.runner.reset()
            self.runner.generate(inputs, config, pieces.append, lambda s: stats.update(
                start=s.inference_start_ms, prompt_end=s.prompt_eval_end_ms, first=s.first_token_ms,
                end=s.inference_end_ms))
        self.timing = Timing(prompt_tokens=len(ids), stopped_by="runner")
        if stats:  # the runner's clock, in ms
            self.timing.generated_tokens = len(pieces)  # the runner counts the prefill's token apart
            self.timing.prefill_s = (stats["prompt_end"] - stats["start"]) / 1e3
            self.timing.time_to_first_token_s = t_run - t0 + (stats["first"] - stats["start"]) / 1e3
            self.timing.decode_s = (stats["end"] - stats["first"]) / 1e3
        yield from pieces
