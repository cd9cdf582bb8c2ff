"""The litertlm backend: Google's LiteRT-LM engine (`litert_lm`) on a bundle's .litertlm, as a session of its own
(the engine tokenizes, samples and stops by itself, so it takes the place of Session, not of an executor)."""

from __future__ import annotations

import io
import tempfile
from pathlib import Path

from models.errors import InputError
from runtime_py.components.chat_template import render
from runtime_py.components.media import (
    as_list,
    has_media_items,
    image_frames,
    media_items,
)
from runtime_py.components.timing import Timing
from runtime_py.executors.litert_executor import litertlm_section_ranges

VISION_SECTION, AUDIO_SECTION = "vision_encoder", "audio_encoder_hw"


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
        types = {t for t, _, _ in litertlm_section_ranges(self.litertlm)} & {VISION_SECTION, AUDIO_SECTION}
        self.has_vision, self.has_audio = VISION_SECTION in types, AUDIO_SECTION in types
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

        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        has_media = bool(image_frames(images) or as_list(audio) or has_media_items(prompt))
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
        if timing.prompt_tokens >= self.cache_len:  # the engine fails in C++ with no word of why
            raise InputError(f"prompt of {timing.prompt_tokens} tokens does not fit the KV cache of {self.cache_len}")
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

        frames, clips = image_frames(images), as_list(audio)
        if isinstance(prompt, str):
            content = ([{"type": "image", "image": f} for f in frames] + [{"type": "audio", "audio": c} for c in clips]
                       + [{"type": "text", "text": prompt}])
            messages = [{"role": "user", "content": content}]
        else:
            messages = media_items(prompt, as_list(images), clips)
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
