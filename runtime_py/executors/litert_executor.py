"""The litert backend: the .litertlm's TFLite sections run by ai_edge_litert's Interpreter (XNNPACK), with the KV
cache carried between calls as numpy arrays under LiteRT-LM's tensor names; and the litertlm backend: Google's own
LiteRT-LM engine on the same file."""

from __future__ import annotations

import io
import tempfile
from pathlib import Path

import numpy as np

from models.errors import InputError


def litertlm_section_list(path: Path, types: set[str] | None = None) -> list[tuple[str, bytes]]:
    """The TFLite models of a .litertlm in file order, as (model type, bytes): prefill_decode, embedder,
    per_layer_embedder, vision_encoder, ... A type may occur more than once (vision_encoder, one section per group of
    image sizes). types: read only these (the others are not loaded; a decoder section is gigabytes)."""
    from litert_lm_builder import litertlm_header_schema_py_generated as schema
    from litert_lm_builder import litertlm_peek

    try:
        header = litertlm_peek.read_litertlm_header(str(path), io.StringIO())
    except (ValueError, OSError, IndexError) as e:
        raise InputError(f"{path}: not a readable .litertlm file ({e})") from None
    sections = header.SectionMetadata()
    out = []
    with open(path, "rb") as f:
        for i in range(sections.ObjectsLength()):
            obj = sections.Objects(i)
            if obj.DataType() != schema.AnySectionDataType.TFLiteModel:
                continue
            model_type = (litertlm_peek.get_model_type(obj) or "").removeprefix("tf_lite_")
            if types is None or model_type in types:
                f.seek(obj.BeginOffset())
                out.append((model_type, f.read(obj.EndOffset() - obj.BeginOffset())))
    return out


def litertlm_sections(path: Path) -> dict[str, bytes]:
    """The TFLite models of a .litertlm by model type; of a repeated type the last, the one LiteRT-LM loads."""
    return dict(litertlm_section_list(path))


class LiteRtExecutor:
    name = "litert"

    def __init__(self, litertlm: Path, cache_len: int, prefill_lengths: tuple[int, ...], threads: int = 2):
        from ai_edge_litert.interpreter import Interpreter

        sections = litertlm_sections(litertlm)
        missing = {"prefill_decode", "embedder", "per_layer_embedder"} - set(sections)
        if missing:
            raise InputError(f"{litertlm}: no {', '.join(sorted(missing))} section")
        self.decoder = Interpreter(model_content=sections["prefill_decode"], num_threads=threads)
        self.embedder = Interpreter(model_content=sections["embedder"], num_threads=threads)
        self.per_layer_embedder = Interpreter(model_content=sections["per_layer_embedder"], num_threads=threads)
        self.cache_len, self.prefill_lengths = cache_len, tuple(prefill_lengths)
        self._runners = {name: self.decoder.get_signature_runner(name) for name in self.decoder.get_signature_list()}
        self._cache_inputs = {
            name: detail for name, detail in self.decoder.get_signature_runner("decode").get_input_details().items()
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
        return self._run(f"prefill_{embeds.shape[1]}", embeds, rows, start)

    def decode(self, embeds, rows, pos: int) -> np.ndarray:
        return self._run("decode", embeds, rows, pos)

    def reset(self) -> None:
        self.cache = {name: np.zeros(d["shape"], np.float32) for name, d in self._cache_inputs.items()}


ENCODER_SECTIONS = ("vision_encoder", "vision_adapter", "audio_encoder_hw", "audio_adapter", "end_of_audio")


class LiteRtEncoders:
    """The encoder sections of a bundle's model.litertlm run by ai_edge_litert's Interpreter: the interface of
    runtime_py.executors.encoders. The sections take LiteRT-LM's layouts (exporters.litert): images channels last,
    the vision adapter's extra <end_of_image> row (dropped here), the audio encoder's 3008-frame window with a
    valid-frame mask (our 2997 frames are zero-padded; the conformer is causal, so no token changes)."""

    name = "litert"

    def __init__(self, bundle: Path, manifest: dict, threads: int = 2):
        from ai_edge_litert.interpreter import Interpreter

        self.litertlm = Path(bundle) / "model.litertlm"
        sections = litertlm_section_list(self.litertlm, set(ENCODER_SECTIONS))
        by_type: dict[str, list[bytes]] = {}
        for model_type, data in sections:
            by_type.setdefault(model_type, []).append(data)
        load = lambda data: Interpreter(model_content=data, num_threads=threads)  # noqa: E731
        components = set(manifest.get("export_spec", {}).get("components", []))
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
        from runtime_py.executors.encoders import check_image_size

        if not self.has_vision:
            raise InputError(f"{self.litertlm}: this bundle has no vision encoder")
        size = check_image_size(pixel_values, self.image_sizes, str(self.litertlm))
        images = np.ascontiguousarray(np.asarray(pixel_values, np.float32).transpose(0, 2, 3, 1))
        features = self._vision[size](images=images)["features"]
        # The adapter appends the <end_of_image> row for LiteRT-LM; the interface gives the image's own tokens.
        return self._vision_adapter(soft_tokens=features)["mm_embedding"][:, :-1]

    def audio(self, features: np.ndarray, padding_mask: np.ndarray) -> np.ndarray:
        from exporters.encoders import AUDIO_WINDOW_FRAMES

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


class LitertLmSession:
    """Google's LiteRT-LM engine on a .litertlm. The engine tokenizes, samples and stops by itself and its Python API
    returns text, so this session offers text generation only. A text prompt is rendered with our chat template and
    run through a Session (the engine adds BOS, the metadata's start token). Images and audio go through the
    engine's Conversation API, the only one that takes media: the engine renders its own template, decodes the files,
    resizes images to the metadata's size (stb, Catmull-Rom; ours is bilinear), computes its own log-mel spectrogram
    (USM settings, not transformers') and gives a clip only its valid tokens; so its media prompts are close to, not
    the same as, the other backends'."""

    def __init__(self, litertlm: Path, cache_len: int, threads: int = 2):
        import litert_lm

        litert_lm.set_min_log_severity(litert_lm.LogSeverity.ERROR)  # the engine logs every section it skips
        self.litert_lm, self.cache_len, self.litertlm = litert_lm, cache_len, Path(litertlm)
        types = {t for t, _ in litertlm_section_list(self.litertlm, {"vision_encoder", "audio_encoder_hw"})}
        self.has_vision, self.has_audio = "vision_encoder" in types, "audio_encoder_hw" in types
        self.accepts_media = self.has_vision or self.has_audio
        cpu = litert_lm.Backend.CPU(thread_count=threads)
        try:
            # The engine caches XNNPACK-packed weights beside the model unless told otherwise: never inside a bundle.
            cache_dir = Path(tempfile.gettempdir()) / "g3n-litert-lm-cache"
            cache_dir.mkdir(exist_ok=True)
            self.engine = litert_lm.Engine(str(litertlm), backend=cpu,
                                           activation_data_type=litert_lm.ActivationDataType.FLOAT32,
                                           cache_dir=str(cache_dir), vision_backend=cpu if self.has_vision else None,
                                           audio_backend=cpu if self.has_audio else None)
        except Exception as e:  # the engine raises RuntimeError subclasses for unreadable files
            raise InputError(f"{litertlm}: LiteRT-LM cannot open it ({e})") from None
        self.notice = ""
        self.timing = None

    def generate(self, prompt, max_new_tokens: int = 32, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, seed: int = 0, images=None, audio=None, image_size: int | None = None):
        import time

        from runtime_py.components.chat_template import render
        from runtime_py.components.media import as_list, image_frames
        from runtime_py.session import Timing, _has_media_items

        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        has_media = bool(image_frames(images) or as_list(audio) or _has_media_items(prompt))
        if isinstance(prompt, str) and not prompt.strip() and not has_media:
            raise InputError("empty prompt")
        sampler = self.litert_lm.SamplerConfig(top_k=1) if temperature == 0 else self.litert_lm.SamplerConfig(
            top_k=top_k or 40, top_p=top_p, temperature=temperature, seed=seed)
        if has_media:
            yield from self._generate_with_media(prompt, sampler, max_new_tokens, images, audio, image_size)
            return
        session = self.engine.create_session(apply_prompt_template=False, sampler_config=sampler,
                                             max_output_tokens=max_new_tokens)
        text = render(messages)
        self.timing = timing = Timing(prompt_tokens=1 + len(self.engine.tokenize(text)), stopped_by="engine")
        t0 = time.perf_counter()
        session.run_prefill([text])
        timing.prefill_s = time.perf_counter() - t0
        pieces = []
        try:
            for response in session.run_decode_async():
                if not pieces:
                    timing.time_to_first_token_s = time.perf_counter() - t0
                pieces.append(response.texts[0])
                yield response.texts[0]
        finally:
            session.close()
        timing.decode_s = time.perf_counter() - t0 - timing.time_to_first_token_s
        # The engine reports text only (its benchmark counters need a benchmark-enabled engine): count by re-encoding.
        timing.generated_tokens = len(self.engine.tokenize("".join(pieces))) if pieces else 0

    def _generate_with_media(self, prompt, sampler, max_new_tokens: int, images, audio, image_size):
        """The conversation, its media items as the engine takes them (files by path, arrays and images as PNG or
        WAV bytes), the last turn sent, the earlier ones given as history."""
        import time

        from runtime_py.components.media import _media_items, as_list, image_frames
        from runtime_py.session import Timing

        frames, clips = image_frames(images), as_list(audio)
        if isinstance(prompt, str):
            content = ([{"type": "image", "image": f} for f in frames] + [{"type": "audio", "audio": c} for c in clips]
                       + [{"type": "text", "text": prompt}])
            messages = [{"role": "user", "content": content}]
        else:
            messages = _media_items(prompt, as_list(images), clips)
        kinds = {item.get("type") for m in messages if isinstance(m.get("content"), list) for item in m["content"]}
        for kind, present in (("image", self.has_vision), ("audio", self.has_audio)):
            if kind in kinds and not present:
                raise InputError(f"{self.litertlm}: this bundle has no {'vision' if kind == 'image' else kind} encoder")
        size = self._image_size()
        if image_size is not None and "image" in kinds and image_size != size:
            raise InputError(f"--image-size {image_size}: LiteRT-LM resizes images to the bundle's {size} px")
        *history, last = [self._engine_message(m) for m in messages]
        conversation = self.engine.create_conversation(messages=history or None, sampler_config=sampler,
                                                       max_output_tokens=max_new_tokens)
        self.timing = timing = Timing(stopped_by="engine")
        t0 = time.perf_counter()
        pieces = []
        try:
            for chunk in conversation.send_message_async(last):
                piece = "".join(item.get("text", "") for item in chunk.get("content", []) if isinstance(item, dict))
                if not pieces:
                    timing.time_to_first_token_s = timing.prefill_s = time.perf_counter() - t0
                pieces.append(piece)
                yield piece
            timing.decode_s = time.perf_counter() - t0 - timing.time_to_first_token_s
            generated = len(self.engine.tokenize("".join(pieces))) if pieces else 0
            timing.prompt_tokens, timing.generated_tokens = conversation.token_count - generated, generated
        finally:
            conversation.close()

    def _image_size(self) -> int | None:
        from litert_lm_builder import litertlm_header_schema_py_generated as schema
        from litert_lm_builder import litertlm_peek
        from litert_lm_builder.runtime.proto import llm_metadata_pb2

        header = litertlm_peek.read_litertlm_header(str(self.litertlm), io.StringIO())
        with open(self.litertlm, "rb") as f:
            for i in range(header.SectionMetadata().ObjectsLength()):
                obj = header.SectionMetadata().Objects(i)
                if obj.DataType() == schema.AnySectionDataType.LlmMetadataProto:
                    f.seek(obj.BeginOffset())
                    meta = llm_metadata_pb2.LlmMetadata.FromString(f.read(obj.EndOffset() - obj.BeginOffset()))
                    return meta.llm_model_type.gemma3n.image_tensor_height or None
        return None

    @staticmethod
    def _engine_message(message: dict) -> dict:
        import base64
        import os

        content = message.get("content")
        if not isinstance(content, list):
            return message
        items = []
        for item in content:
            kind = item.get("type") if isinstance(item, dict) else None
            if kind not in ("image", "audio"):
                items.append(item)
                continue
            value = item[kind]
            buffer = io.BytesIO()
            # Decoded by our loaders first, whatever the source: a missing or corrupt file gets the same one-line
            # error as on every other backend (the engine's own decoders fail with an internal error), and the
            # engine reads the pixels and samples the other backends read (EXIF rotation, alpha on white, mono
            # 16 kHz).
            if kind == "image":
                from PIL import Image

                from models.vision import _rgb_uint8

                rgb = _rgb_uint8(value, str(value) if isinstance(value, (str, os.PathLike)) else "image")
                Image.fromarray(rgb.permute(1, 2, 0).numpy()).save(buffer, format="PNG")
            else:
                import soundfile

                from models.audio import load_audio

                soundfile.write(buffer, load_audio(value), 16_000, format="WAV")  # PCM 16: what the engine surely reads
            items.append({"type": kind, "blob": base64.b64encode(buffer.getvalue()).decode()})
        return {**message, "content": items}
