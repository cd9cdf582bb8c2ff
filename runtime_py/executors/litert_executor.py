"""The litert backend: the .litertlm's TFLite sections run by ai_edge_litert's Interpreter (XNNPACK), with the KV
cache carried between calls as numpy arrays under LiteRT-LM's tensor names; and the litertlm backend: Google's own
LiteRT-LM engine on the same file (runtime_py.litertlm_session) reads its sections here."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from contract.bundle import (
    DECODE,
    EMBEDDER_SECTION,
    ENCODER_SECTIONS,
    PER_LAYER_EMBEDDER_SECTION,
    PREFILL_DECODE_SECTION,
    prefill_name,
)
from models.errors import InputError
from runtime_py.executors.base import native_output_to_log


def litertlm_section_ranges(path: Path) -> list[tuple[str, int, int]]:
    """The TFLite models of a .litertlm in file order, as (model type, begin, end byte): prefill_decode, embedder,
    per_layer_embedder, vision_encoder, ... A type may occur more than once (vision_encoder, one section per group of
    image sizes)."""
    from litert_lm_builder import litertlm_header_schema_py_generated as schema
    from litert_lm_builder import litertlm_peek

    try:
        header = litertlm_peek.read_litertlm_header(str(path), io.StringIO())
    except (ValueError, OSError, IndexError) as e:
        raise InputError(f"{path}: not a readable .litertlm file ({e})") from None
    sections = header.SectionMetadata()
    out = []
    for i in range(sections.ObjectsLength()):
        obj = sections.Objects(i)
        if obj.DataType() == schema.AnySectionDataType.TFLiteModel:
            model_type = (litertlm_peek.get_model_type(obj) or "").removeprefix("tf_lite_")
            out.append((model_type, obj.BeginOffset(), obj.EndOffset()))
    return out


def litertlm_section_list(path: Path, types: set[str] | None = None) -> list[tuple[str, bytes]]:
    """The TFLite models of a .litertlm in file order, as (model type, bytes). types: read only these (the others are
    not loaded; a decoder section is gigabytes)."""
    out = []
    with open(path, "rb") as f:
        for model_type, begin, end in litertlm_section_ranges(path):
            if types is None or model_type in types:
                f.seek(begin)
                out.append((model_type, f.read(end - begin)))
    return out


def litertlm_sections(path: Path) -> dict[str, bytes]:
    """The TFLite models of a .litertlm by model type; of a repeated type the last, the one LiteRT-LM loads."""
    return dict(litertlm_section_list(path))


def load_interpreter(model: bytes | Path, threads: int):
    """ai_edge_litert's Interpreter over one section (bytes) or .tflite file, XNNPACK applied now (allocate_tensors),
    so that TFLite's INFO line about it goes to the runtime log rather than to the terminal at the first call."""
    from ai_edge_litert.interpreter import Interpreter

    source = {"model_path": str(model)} if isinstance(model, Path) else {"model_content": model}
    with native_output_to_log():
        loaded = Interpreter(**source, num_threads=threads)
        loaded.allocate_tensors()
    return loaded


class LiteRtExecutor:
    name = "litert"

    def __init__(self, litertlm: Path, cache_len: int, prefill_lengths: tuple[int, ...], threads: int = 2):
        sections = litertlm_sections(litertlm)
        missing = {PREFILL_DECODE_SECTION, EMBEDDER_SECTION, PER_LAYER_EMBEDDER_SECTION} - set(sections)
        if missing:
            raise InputError(f"{litertlm}: no {', '.join(sorted(missing))} section")
        self.decoder = load_interpreter(sections[PREFILL_DECODE_SECTION], threads)
        self.embedder = load_interpreter(sections[EMBEDDER_SECTION], threads)
        self.per_layer_embedder = load_interpreter(sections[PER_LAYER_EMBEDDER_SECTION], threads)
        self.cache_len, self.prefill_lengths = cache_len, tuple(prefill_lengths)
        self._runners = {name: self.decoder.get_signature_runner(name) for name in self.decoder.get_signature_list()}
        self._cache_inputs = {
            name: detail for name, detail in self.decoder.get_signature_runner(DECODE).get_input_details().items()
            if name.startswith("kv_cache_")
        }
        self.reset()

    def _lookup(self, interpreter, ids: np.ndarray) -> np.ndarray:
        runner = interpreter.get_signature_runner(next(iter(interpreter.get_signature_list())))
        rows = [runner(token_ids=np.array([[i]], dtype=np.int32))["embeddings"] for i in ids]
        return np.concatenate(rows, axis=1)

    def embed(self, ids: np.ndarray) -> np.ndarray:
        return self._lookup(self.embedder, ids)

    def per_layer_rows(self, ids: np.ndarray) -> np.ndarray:
        return self._lookup(self.per_layer_embedder, ids)[0]

    def _call(self, signature: str, embeds, rows, start: int) -> dict[str, np.ndarray]:
        """One signature call; the KV cache outputs become the next call's inputs. Returns every output."""
        T = embeds.shape[1]
        out = self._runners[signature](
            embeddings=embeds.astype(np.float32),
            per_layer_embeddings=rows.astype(np.float32),
            input_pos=np.arange(start, start + T, dtype=np.int32),
            mask=np.zeros((1, 1, T, self.cache_len), np.float32),  # not read: the graph builds its masks
            **self.cache,
        )
        self.cache = {k: out[k] for k in self.cache}
        return out

    def _run(self, signature: str, embeds, rows, start: int) -> np.ndarray:
        return self._call(signature, embeds, rows, start)["logits"][0, -1]

    def prefill(self, embeds, rows, start: int) -> np.ndarray:
        return self._run(prefill_name(embeds.shape[1]), embeds, rows, start)

    def decode(self, embeds, rows, pos: int) -> np.ndarray:
        return self._run(DECODE, embeds, rows, pos)

    def reset(self) -> None:
        self.cache = {name: np.zeros(d["shape"], np.float32) for name, d in self._cache_inputs.items()}


class LiteRtEncoders:
    """The encoder sections of a bundle's model.litertlm run by ai_edge_litert's Interpreter: the interface of
    runtime_py.executors.base.EncoderRunner. The sections take LiteRT-LM's layouts (exporters.litert): images channels last,
    the vision adapter's extra <end_of_image> row (dropped here), the audio encoder's 3008-frame window with a
    valid-frame mask (our 2997 frames are zero-padded; the conformer is causal, so no token changes)."""

    name = "litert"

    def __init__(self, litertlm: Path, components: tuple[str, ...], threads: int = 2):
        """components: what the bundle lists ("vision", "audio"); each must have its sections."""
        self.litertlm = Path(litertlm)
        sections = litertlm_section_list(self.litertlm, set(ENCODER_SECTIONS))
        by_type: dict[str, list[bytes]] = {}
        for model_type, data in sections:
            by_type.setdefault(model_type, []).append(data)
        load = lambda data: load_interpreter(data, threads)  # noqa: E731
        components = set(components)
        self._vision: dict[int, object] = {}  # size -> signature runner
        self._interpreters = []  # the runners' interpreters must outlive them
        # The last vision_encoder section is the default size (the one LiteRT-LM runs); earlier ones hold the others.
        for data in reversed(by_type.get("vision_encoder", [])):
            interpreter = load(data)
            self._interpreters.append(interpreter)
            for signature in interpreter.get_signature_list():
                runner = interpreter.get_signature_runner(signature)
                self._vision.setdefault(int(runner.get_input_details()["images"]["shape"][1]), runner)
        self.has_vision = bool(self._vision) and "vision_adapter" in by_type
        self.has_audio = all(t in by_type for t in ("audio_encoder_hw", "audio_adapter"))
        for component, present in (("vision", self.has_vision), ("audio", self.has_audio)):
            if component in components and not present:
                raise InputError(f"{self.litertlm}: the manifest lists the {component} encoder but the file has no "
                                 f"{component} encoder and adapter sections")
        self.image_sizes = tuple(self._vision) if self.has_vision else ()
        if self.has_vision:
            self._vision_adapter = self._runner(load(by_type["vision_adapter"][-1]))
        if self.has_audio:
            self._audio_encoder = self._runner(load(by_type["audio_encoder_hw"][-1]))
            self._audio_adapter = self._runner(load(by_type["audio_adapter"][-1]))
            self.audio_frames = int(self._audio_encoder.get_input_details()["src_inputs"]["shape"][1])

    def _runner(self, interpreter):
        self._interpreters.append(interpreter)
        return interpreter.get_signature_runner(next(iter(interpreter.get_signature_list())))

    def image(self, pixel_values: np.ndarray) -> np.ndarray:
        from runtime_py.executors.base import check_image_size

        if not self.has_vision:
            raise InputError(f"{self.litertlm}: this bundle has no vision encoder")
        size = check_image_size(pixel_values, self.image_sizes, str(self.litertlm))
        images = np.ascontiguousarray(np.asarray(pixel_values, np.float32).transpose(0, 2, 3, 1))
        features = self._vision[size](images=images)["features"]
        # The adapter appends the <end_of_image> row for LiteRT-LM; the interface gives the image's own tokens.
        return self._vision_adapter(soft_tokens=features)["mm_embedding"][:, :-1]

    def audio(self, features: np.ndarray, padding_mask: np.ndarray) -> np.ndarray:
        from contract.bundle import AUDIO_WINDOW_FRAMES

        if not self.has_audio:
            raise InputError(f"{self.litertlm}: this bundle has no audio encoder")
        features, padding_mask = np.asarray(features, np.float32), np.asarray(padding_mask, np.float32)
        if features.shape != (1, AUDIO_WINDOW_FRAMES, 128) or padding_mask.shape != (1, AUDIO_WINDOW_FRAMES):
            raise InputError(f"audio features {list(features.shape)} and padding_mask {list(padding_mask.shape)}: "
                             f"expected [1, {AUDIO_WINDOW_FRAMES}, 128] and [1, {AUDIO_WINDOW_FRAMES}]")
        src = np.zeros((1, self.audio_frames, 128), np.float32)
        src[:, :AUDIO_WINDOW_FRAMES] = features
        valid = np.zeros((1, self.audio_frames), bool)
        valid[:, :AUDIO_WINDOW_FRAMES] = padding_mask < 0.5
        encoded = self._audio_encoder(src_inputs=src, mask=valid)
        return self._audio_adapter(features=encoded["features"], mask=encoded["mask"])["audio_embeddings"]
