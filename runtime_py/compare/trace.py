"""The inputs and traces every row runs: the prompt through a backend's lookups and graphs with the session's
prefill schedule, the float references (decoder and encoders), the golden media, and Google's engine's greedy text."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from models.errors import InputError
from runtime_py.compare.metrics import embedding_metrics, greedy_text_agreement


@dataclass
class Trace:
    """One backend's run over the comparison inputs: logits [N + 1, V] and, per graph call, its layer outputs."""

    logits: np.ndarray
    calls: list[list[np.ndarray]] = field(default_factory=list)
    call_logits: list[np.ndarray] = field(default_factory=list)


class _Recording:
    """An executor whose prefill/decode calls are recorded: their logits and `layer_outputs()` after each call.
    media_rows (runtime_py.components.media.MediaTokenRows): a whole model's embedders' rows, which the ids of their
    vocabularies embed as (see embed_as_whole_model)."""

    def __init__(self, executor, layer_outputs, media_rows=None):
        self.executor, self.layer_outputs, self.media_rows = executor, layer_outputs, media_rows
        self.cache_len, self.prefill_lengths = executor.cache_len, executor.prefill_lengths
        self.calls, self.call_logits = [], []

    def embed(self, ids):
        return embed_as_whole_model(self.executor, ids, self.media_rows)

    def reset(self):
        self.executor.reset()

    def _record(self, logits):
        self.calls.append(self.layer_outputs())
        self.call_logits.append(np.asarray(logits, np.float32))
        return logits

    def prefill(self, embeds, rows, start):
        return self._record(self.executor.prefill(embeds, rows, start))

    def decode(self, embeds, rows, pos):
        return self._record(self.executor.decode(embeds, rows, pos))


def embed_as_whole_model(executor, ids: np.ndarray, media_rows=None) -> np.ndarray:
    """The executor's token embeddings [1, T, H] of ids [T]; with media_rows, the ids of a whole model's vision and
    audio vocabularies take their embedders' rows, as Gemma3n.embed_prompt (and transformers' Gemma3nModel) embeds
    every prompt. Only a model whose text pieces share ids with those vocabularies (the tiny default's 384-id
    vocabulary) sees a difference; the published vocabulary keeps its media ids for media."""
    embeds = executor.embed(ids)
    return embeds if media_rows is None else media_rows.apply(np.asarray(ids, np.int64), np.asarray(embeds))


def run_trace(executor, per_layer_rows, prompt_ids: list[int], steps: int, forced_tokens: list[int] | None = None,
              layer_outputs=lambda: [], media_rows=None) -> tuple[Trace, list[int]]:
    """Prefill (the session's chunk schedule), then `steps` decode steps. The decode inputs are `forced_tokens`
    (teacher forcing) or, without them, the trace's own greedy tokens. media_rows: embed as a whole model
    (embed_as_whole_model). Returns the trace and its argmax tokens."""
    from runtime_py.session import Session

    if len(prompt_ids) + steps > executor.cache_len:
        raise InputError(f"prompt of {len(prompt_ids)} tokens plus {steps} decode steps does not fit the KV cache of "
                         f"{executor.cache_len}; use fewer --steps or a bundle with a larger --cache-len")
    recording = _Recording(executor, layer_outputs, media_rows)
    # Only the session's prefill schedule is used: no tokenizer, stop ids or id check (the ids are the caller's).
    session = Session(recording, None, per_layer_rows, bos_id=prompt_ids[0], stop_ids=[], vocab_size=0)
    logits = [np.asarray(session.prefill(prompt_ids), np.float32)]
    tokens = [int(logits[0].argmax())]
    for s in range(steps):
        token = forced_tokens[s] if forced_tokens is not None else tokens[-1]
        arr = np.asarray([token], dtype=np.int64)
        logits.append(np.asarray(recording.decode(recording.embed(arr), per_layer_rows(arr)[None], len(prompt_ids) + s),
                                 np.float32))
        tokens.append(int(logits[-1].argmax()))
    return Trace(np.stack(logits), recording.calls, recording.call_logits), tokens


def prompt_ids_for(prompt: str, tokenizer, bos_id: int) -> list[int]:
    """The prompt as one user turn of the chat template, with BOS: what every backend (and Google's engine) sees."""
    from runtime_py.components.chat_template import render

    return [bos_id] + tokenizer.encode(render([{"role": "user", "content": prompt}]))


class FloatReference:
    """The float PyTorch model as the reference runtime: its trace for one cache schedule, with layer outputs.
    model: a TextDecoder, or a whole Gemma3n, whose prompts embed the ids of its media vocabularies as the
    embedders' rows (embed_as_whole_model); the decoder is traced either way."""

    def __init__(self, model):
        from models.float32 import float32_reference
        from runtime_py.compare.debug_export import FloatLookups
        from runtime_py.components.media import MediaTokenRows

        # Not model.float(): a bf16 real-size model would be cast whole (22 GB for E2B), the caller's tensors too.
        reference = float32_reference(model)
        whole = reference if hasattr(reference, "language_model") else None
        self.model = whole.language_model if whole is not None else reference
        self.media_rows = MediaTokenRows.from_model(whole) if whole is not None else None
        self.lookups = FloatLookups(self.model)
        self._traces: dict = {}
        self._lookups: dict = {}

    def embed(self, ids: np.ndarray) -> np.ndarray:
        return self._lookup("embed", ids, lambda a: embed_as_whole_model(self.lookups, a, self.media_rows))

    def per_layer_rows(self, ids: np.ndarray) -> np.ndarray:
        return self._lookup("per_layer_rows", ids, lambda a: self.lookups.per_layer_rows(a))

    def _lookup(self, kind: str, ids: np.ndarray, compute) -> np.ndarray:
        ids = np.asarray(ids)
        key = (kind, ids.shape, tuple(int(i) for i in ids.reshape(-1)))
        if key not in self._lookups:
            self._check_held(kind)
            self._lookups[key] = compute(ids)
        return self._lookups[key]

    def release(self) -> None:
        """Drops the model; what was computed stays answerable (at real size the reference and a backend would not
        both fit in memory: E2B's reference is 15-19 GB)."""
        self.model = self.lookups = None

    def _check_held(self, what: str) -> None:
        if self.model is None:
            raise RuntimeError(f"the float reference was released before its {what} was computed")

    def trace(self, prompt_ids: list[int], steps: int, cache_len: int, prefill_lengths) -> tuple[Trace, list[int]]:
        from runtime_py.compare.debug_export import tapped_layers
        from runtime_py.executors.torch_executor import TorchExecutor

        key = (tuple(prompt_ids), steps, cache_len, tuple(prefill_lengths))
        if key not in self._traces:
            self._check_held("trace")
            executor = TorchExecutor(self.model, cache_len, tuple(prefill_lengths))
            with tapped_layers(self.model) as taps:
                def layer_outputs():
                    out = [t.numpy().copy() for t in taps]
                    taps.clear()
                    return out

                self._traces[key] = run_trace(executor, self.lookups.per_layer_rows, prompt_ids, steps,
                                              layer_outputs=layer_outputs, media_rows=self.media_rows)
        return self._traces[key]


class EncoderReference:
    """The float PyTorch encoders of a bundle's reference model (the whole Gemma3n), each output on a golden input
    computed once however many bundles and backends are compared with it."""

    def __init__(self, model):
        from runtime_py.executors.torch_executor import TorchEncoders

        self.encoders = TorchEncoders(model)
        self._outputs: dict = {}

    def run(self, component: str, *inputs: np.ndarray) -> np.ndarray:
        import hashlib

        key = (component, *(hashlib.sha256(np.ascontiguousarray(x).tobytes()).hexdigest() for x in inputs))
        if key not in self._outputs:
            if self.encoders is None:
                raise RuntimeError(f"the float encoders were released before their {component} output was computed")
            fn = self.encoders.image if component == "vision_encoder" else self.encoders.audio
            self._outputs[key] = fn(*inputs)
        return self._outputs[key]

    def release(self) -> None:
        """Drops the encoders; the outputs computed stay answerable."""
        self.encoders = None


def golden_media_inputs(bundle: Path, manifest: dict) -> list[tuple[str, str, int | None, tuple[np.ndarray, ...]]]:
    """(component, input label, image size or None, encoder inputs) for every encoder input the bundle's golden media
    give: the golden image at each of the bundle's image sizes, then the golden clip's window."""
    from safetensors.numpy import load_file

    from models.audio import SAMPLE_RATE

    entry = manifest["encoders"]
    path = Path(bundle) / entry["golden_media"]["file"]
    media = load_file(str(path))
    components = set(entry["components"])
    inputs = []
    try:
        if "vision" in components:
            for size in entry["image_sizes"]:
                inputs.append(("vision_encoder", f"{size} px", int(size), (media[f"pixel_values_{size}"],)))
        if "audio" in components:
            seconds = media["audio_waveform"].size / SAMPLE_RATE
            inputs.append(("audio_encoder", f"{seconds:.3g} s clip in a 30 s window", None,
                           (media["audio_features"], media["audio_padding_mask"])))
    except KeyError as e:
        raise InputError(f"{path}: no tensor {e.args[0]!r} (golden media of a bundle with encoders "
                         f"{sorted(components)})") from None
    return inputs


def encoder_entries(runner, reference: EncoderReference, inputs) -> list[dict]:
    """Each golden input through the backend's encoders and the float ones -> one entry per input."""
    entries = []
    for component, label, size, args in inputs:
        got = runner.image(*args) if component == "vision_encoder" else runner.audio(*args)
        entries.append({"component": component, "input": label, "size": size,
                        "metrics": embedding_metrics(reference.run(component, *args), got), "breaches": []})
    return entries


def litertlm_greedy(bundle: Path, manifest: dict, tokenizer, prompt: str, ref_tokens: list[int], stop_ids,
                    threads: int) -> dict:
    """Google's engine generates greedily from the same prompt; its text is matched against the float model's greedy
    tokens, detokenized, up to the first stop token (where the engine stops too)."""
    from runtime_py.engine import open_bundle

    session = open_bundle(bundle, "litertlm", threads)
    text = "".join(session.generate(prompt, max_new_tokens=len(ref_tokens)))
    return greedy_text_agreement(text, ref_tokens, stop_ids, tokenizer)
