"""Media in prompts: the image and audio preprocessors and the prompt layout (LiteRT-LM's image/audio preprocessor and
prompt-template components).

Layout, as transformers' Gemma3nProcessor lays out what Gemma 3n's chat template renders: every image placeholder of
the rendered turn becomes "\\n\\n" <start_of_image> <image_soft_token> x 256 <end_of_image> "\\n\\n", and every
audio placeholder "\\n\\n" <start_of_audio> <audio_soft_token> x 188 <end_of_audio> "\\n\\n", with one such span
per 30 s window of the clip (consecutive spans between one pair of "\\n\\n", as
models.multimodal.expand_media_placeholders writes them; transformers truncates audio at 30 s instead).
The text around the spans is tokenized piece by piece, as transformers' tokenizer splits text at special tokens, and
the span ids are inserted directly: the tokenizer needs no media pieces.

Inputs: an image is a file path, a PIL.Image or a uint8 array (H, W[, C]); a video is a list of such frames, each
laid out as an image. Audio is a WAV/FLAC path or an array (16 kHz unless a file says otherwise), split into windows
of at most 30 s (models.audio).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

import numpy as np

from models.errors import InputError
from models.multimodal import MediaTokens
from runtime_py.components.chat_template import (
    AUDIO_PLACEHOLDER,
    IMAGE_PLACEHOLDER,
    render,
)

SPAN_MARGIN = "\n\n"  # the text transformers' processor puts on both sides of a media span


@dataclass
class MediaPrompt:
    """A prompt's ids with its media spans, and the encoders' inputs in span order."""

    ids: list[int]
    pixel_values: list[np.ndarray] = field(default_factory=list)  # one [1, 3, S, S] per image (video frame)
    audio_windows: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)  # (features, padding_mask)
    audio_clips: list[int] = field(default_factory=list)  # windows per clip

    def summary(self) -> str:
        parts = []
        if self.pixel_values:
            parts.append(f"{len(self.pixel_values)} image{'s' if len(self.pixel_values) > 1 else ''}")
        if self.audio_windows:
            parts.append(f"{len(self.audio_windows)} audio window{'s' if len(self.audio_windows) > 1 else ''}")
        return " and ".join(parts)


def image_frames(images) -> list:
    """images: one image, or a list whose items are images or videos (lists of frames) -> the flat list of frames."""
    if images is None:
        return []
    if not isinstance(images, (list, tuple)):
        return [images]
    frames = []
    for item in images:
        if isinstance(item, (list, tuple)):
            if not item:
                raise InputError("video: an empty list of frames")
            frames.extend(item)
        else:
            frames.append(item)
    return frames


def as_list(media) -> list:
    """None, one item, or a list of items -> a list (audio clips; images with videos kept whole)."""
    if media is None:
        return []
    return list(media) if isinstance(media, (list, tuple)) else [media]


def preprocess_images(frames: list, size: int) -> list[np.ndarray]:
    """Each frame -> pixel_values [1, 3, size, size] float32 in [0, 1] (models.vision.preprocess_images)."""
    from models.vision import preprocess_images as preprocess

    out = []
    for i, frame in enumerate(frames):
        try:
            out.append(preprocess(frame, size).numpy())
        except InputError as e:
            if isinstance(frame, (str, os.PathLike)):  # the message names the file
                raise
            raise InputError(f"image {i + 1}: {str(e).removeprefix('image: ')}") from None
    return out


def preprocess_audio(clips: list) -> tuple[list[tuple[np.ndarray, np.ndarray]], list[int]]:
    """Each clip (path or array) -> its 30 s windows as the exported encoder's inputs; and the window count per clip."""
    from models.audio import audio_windows, load_audio
    from models.encoders import audio_window_inputs

    windows, counts = [], []
    for clip in clips:
        parts = audio_windows(load_audio(clip))
        windows += [audio_window_inputs(w) for w in parts]
        counts.append(len(parts))
    return windows, counts


def media_prompt_ids(text: str, tokenizer, bos_id: int, tokens: MediaTokens, windows_per_clip: list[int],
                     images: int) -> list[int]:
    """Rendered chat text with IMAGE_PLACEHOLDER / AUDIO_PLACEHOLDER -> ids with BOS and the media spans."""
    pieces = re.split(f"({re.escape(IMAGE_PLACEHOLDER)}|{re.escape(AUDIO_PLACEHOLDER)})", text)
    found_images, found_audio = pieces.count(IMAGE_PLACEHOLDER), pieces.count(AUDIO_PLACEHOLDER)
    if found_images != images or found_audio != len(windows_per_clip):
        raise InputError(f"the prompt has {found_images} image and {found_audio} audio placeholders "
                         f"({IMAGE_PLACEHOLDER}, {AUDIO_PLACEHOLDER}) for {images} images and "
                         f"{len(windows_per_clip)} audio clips")
    texts, spans, clip = pieces[0::2], [], 0
    for placeholder in pieces[1::2]:
        if placeholder == IMAGE_PLACEHOLDER:
            spans.append([tokens.boi] + [tokens.image] * tokens.image_soft_tokens + [tokens.eoi])
        else:
            spans.append(([tokens.boa] + [tokens.audio] * tokens.audio_soft_tokens + [tokens.eoa])
                         * windows_per_clip[clip])
            clip += 1
    ids = [bos_id]
    for i, span in enumerate(spans):
        ids += tokenizer.encode(texts[i] + SPAN_MARGIN) + span
        texts[i + 1] = SPAN_MARGIN + texts[i + 1]
    return ids + tokenizer.encode(texts[-1])


def media_items(messages: list, images: list, audio: list) -> list:
    """A conversation whose image/audio items all carry their media: items without it ({"type": "image"}) take the
    next of `images` / `audio`; a video (a list of frames) becomes one image item per frame."""
    given = {"image": list(images), "audio": list(audio)}
    out = []
    for m in messages:
        if isinstance(m, dict) and isinstance(m.get("content"), list):
            content = []
            for item in m["content"]:
                kind = item.get("type") if isinstance(item, dict) else None
                if kind in given:
                    if kind not in item and not given[kind]:
                        raise InputError(f"the conversation has more {kind} items than {kind}s given")
                    value = item[kind] if kind in item else given[kind].pop(0)
                    frames = image_frames([value]) if kind == "image" else [value]
                    content += [{**item, kind: frame} for frame in frames]
                else:
                    content.append(item)
            m = {**m, "content": content}
        out.append(m)
    for kind, left in given.items():
        if left:
            raise InputError(f"{len(left)} {kind}{'s' if len(left) > 1 else ''} given but the conversation has no "
                             f"{kind} item left for {'them' if len(left) > 1 else 'it'}")
    return out


def build_media_prompt(prompt, tokenizer, bos_id: int, tokens: MediaTokens, images=None, audio=None,
                       image_size: int = 768) -> MediaPrompt:
    """A string prompt becomes one user turn: the images (in order), then the audio clips, then the text, as in the
    published examples. A conversation places its own {"type": "image"} / {"type": "audio"} items, which carry their
    media ({"type": "image", "image": path}) or take the next of `images` / `audio`."""
    frames, clips = image_frames(images), as_list(audio)
    if isinstance(prompt, str):
        if not prompt.strip() and not (frames or clips):
            raise InputError("empty prompt")
        content = ([{"type": "image", "image": f} for f in frames] + [{"type": "audio", "audio": c} for c in clips]
                   + [{"type": "text", "text": prompt}])
        prompt = [{"role": "user", "content": content}]
    else:
        prompt = media_items(prompt, as_list(images), clips)  # a video stays whole until its item is found
    items = [item for m in prompt if isinstance(m, dict) and isinstance(m.get("content"), list)
             for item in m["content"] if isinstance(item, dict)]
    frames = [item["image"] for item in items if item.get("type") == "image"]
    clips = [item["audio"] for item in items if item.get("type") == "audio"]
    text = render(prompt)  # before any media is read: a malformed conversation is reported first
    pixel_values = preprocess_images(frames, image_size)
    windows, counts = preprocess_audio(clips)
    ids = media_prompt_ids(text, tokenizer, bos_id, tokens, counts, len(frames))
    return MediaPrompt(ids, pixel_values, windows, counts)


class MediaTokenRows:
    """The embedders' hard-token rows (media_tokens.safetensors, models.encoders.media_token_embeddings): in a
    prompt with media, every id of the vision and audio vocabularies embeds as its row, in the prompt and when
    generated, as Gemma3n.embed_prompt embeds it."""

    def __init__(self, tensors: dict):
        self.tables = [(int(np.asarray(tensors[f"{name}_first_id"]).reshape(-1)[0]),
                        np.asarray(tensors[f"{name}_rows"], np.float32)) for name in ("vision", "audio")]

    @classmethod
    def from_file(cls, path) -> "MediaTokenRows":
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        try:
            return cls(load_file(str(path)))
        except (SafetensorError, OSError, KeyError) as e:
            raise InputError(f"{path}: not a readable media token table ({e})") from None

    @classmethod
    def from_model(cls, model) -> "MediaTokenRows":
        from models.encoders import media_token_embeddings

        return cls({k: v.numpy() for k, v in media_token_embeddings(model).items()})

    def apply(self, ids: np.ndarray, embeds: np.ndarray) -> np.ndarray:
        """ids [T], embeds [1, T, H] -> embeds with the media vocabularies' rows substituted."""
        embeds = embeds.copy()
        for first, rows in self.tables:
            owned = (ids >= first) & (ids < first + len(rows))
            embeds[0, owned] = rows[ids[owned] - first]
        return embeds


def has_media_items(prompt) -> bool:
    return isinstance(prompt, list) and any(
        isinstance(m, dict) and isinstance(m.get("content"), list)
        and any(isinstance(item, dict) and item.get("type") in ("image", "audio") for item in m["content"])
        for m in prompt)
