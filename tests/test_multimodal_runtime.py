"""Multimodal prompts through the runtime: the prompt layout of transformers' Gemma3nProcessor, the torch session
against the eager whole model (Gemma3n.embed_prompt, then greedy decoding), every float backend of a multimodal
bundle against the torch backend, and bad media through the whole CLI path."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from models.audio import SAMPLE_RATE
from models.default import default_model
from models.encoders import audio_window_inputs, golden_audio, golden_image
from models.errors import InputError
from models.generate import prefill_and_decode_embeddings
from models.vision import preprocess_images
from runtime_py.cli import main
from runtime_py.components.chat_template import JINJA, render
from runtime_py.components.media import build_media_prompt
from runtime_py.components.tokenizer import Tokenizer
from runtime_py.engine import DEFAULT_TOKENIZER, open_bundle, session_for_model

PROMPT = "Describe this."
ASSETS = Path(__file__).resolve().parents[1] / "models" / "assets"
SAMPLE_IMAGE, SAMPLE_AUDIO = ASSETS / "sample.png", ASSETS / "sample.wav"  # golden_image(), golden_audio() as files
CACHE_LEN, PREFILL, SIZE = 512, (64,), 256  # one image (262 tokens) and one audio window (194) need ~460 positions


@pytest.fixture(scope="module")
def model(default_gemma3n):
    return default_gemma3n


@pytest.fixture(scope="module")
def session(model):
    return session_for_model(model, cache_len=CACHE_LEN, prefill_lengths=PREFILL, image_sizes=(SIZE,))


def _expected_ids(text_pieces, spans):
    """BOS, then text pieces tokenized on their own (transformers splits text at special tokens) around the spans."""
    tokenizer = Tokenizer(DEFAULT_TOKENIZER)
    ids = [2]
    for text, span in zip(text_pieces, spans + [[]]):
        ids += tokenizer.encode(text) + span
    return ids


def test_prompt_layout_is_the_processors(model):
    """The chat template renders <image_soft_token> / <audio_soft_token> for the media items; the processor replaces
    each with "\\n\\n" <start_of_image> <image_soft_token> x 256 <end_of_image> "\\n\\n" (audio alike)."""
    t = model.config.tokens
    image = [t.boi] + [t.image] * 256 + [t.eoi]
    audio = [t.boa] + [t.audio] * 188 + [t.eoa]
    media = build_media_prompt(PROMPT, Tokenizer(DEFAULT_TOKENIZER), 2, t, [golden_image()], [golden_audio()], SIZE)
    assert media.ids == _expected_ids(["<start_of_turn>user\n\n\n", "\n\n\n\n",
                                       "\n\n" + PROMPT + "<end_of_turn>\n<start_of_turn>model\n"], [image, audio])
    assert [p.shape for p in media.pixel_values] == [(1, 3, SIZE, SIZE)] and media.audio_clips == [1]


def test_video_frames_and_long_audio_take_one_span_each(model):
    """A video is its frames, each laid out as an image; a 31 s clip is two windows, two consecutive audio spans."""
    t = model.config.tokens
    frames = [golden_image(), golden_image()[::-1].copy()]
    clip = np.tile(golden_audio(), 13)[: 31 * SAMPLE_RATE]
    media = build_media_prompt(PROMPT, Tokenizer(DEFAULT_TOKENIZER), 2, t, [frames], [clip], SIZE)
    ids = np.array(media.ids)
    assert (ids == t.boi).sum() == 2 and (ids == t.image).sum() == 512 and len(media.pixel_values) == 2
    assert (ids == t.boa).sum() == 2 and (ids == t.audio).sum() == 376 and media.audio_clips == [2]
    first_eoa = int(np.flatnonzero(ids == t.eoa)[0])
    assert ids[first_eoa + 1] == t.boa  # the windows of one clip follow each other directly


def test_conversation_items_place_their_media(model):
    """Items carry their media or take the next given one; a video item is one image span per frame."""
    t, tokenizer = model.config.tokens, Tokenizer(DEFAULT_TOKENIZER)
    image, video = golden_image(), [golden_image()[::-1].copy()] * 2
    messages = [{"role": "user", "content": [{"type": "text", "text": "Compare"}, {"type": "image", "image": image},
                                             {"type": "image"}, {"type": "audio"}]}]
    media = build_media_prompt(messages, tokenizer, 2, t, images=[video], audio=golden_audio(), image_size=SIZE)
    ids = np.array(media.ids)
    assert (ids == t.boi).sum() == 3 and (ids == t.boa).sum() == 1
    assert np.flatnonzero(ids == t.boi)[0] > len(tokenizer.encode("<start_of_turn>user\nCompare"))
    np.testing.assert_array_equal(media.pixel_values[0], preprocess_images(image, SIZE).numpy())
    np.testing.assert_array_equal(media.pixel_values[2], preprocess_images(video[1], SIZE).numpy())
    with pytest.raises(InputError, match="1 image given but the conversation has no image item left"):
        build_media_prompt(messages, tokenizer, 2, t, images=[image, image], audio=golden_audio(), image_size=SIZE)


def test_jinja_template_renders_media_items_as_render_does():
    import jinja2

    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "image"}, {"type": "audio"}, {"type": "text", "text": " Hi "}]}]
    jinja = jinja2.Environment().from_string(JINJA).render(messages=messages, bos_token="", add_generation_prompt=True)
    assert jinja == render(messages) == ("<start_of_turn>user\nBe brief.\n\n<image_soft_token><audio_soft_token>Hi"
                                         "<end_of_turn>\n<start_of_turn>model\n")


def test_torch_session_gives_the_eager_models_greedy_tokens(model, session):
    """The reference: the eager whole model embeds the prompt (image and audio embeddings spliced by embed_prompt),
    then greedy decoding over the static cache; a generated media id embeds as the embedders embed it (transformers
    does the same: a lone soft-token id is a hard token of its embedder). The same ops but for the hard-token rows,
    which the session reads from a table computed for the whole media vocabulary at once (1e-6 apart)."""
    t = model.config.tokens
    session.stop_ids = []
    got = list(session.generate_ids(PROMPT, max_new_tokens=8, images=[golden_image()], audio=[golden_audio()]))

    ids = torch.tensor([session.media_prompt(PROMPT, [golden_image()], [golden_audio()]).ids])
    features, padding = audio_window_inputs(golden_audio())

    def embed_generated(token):
        if int(token) == t.image:
            return model.embed_prompt(token, model.embed_vision.embed_ids(token))
        if int(token) == t.audio:
            return model.embed_prompt(token, None, model.embed_audio.embed_ids(token))
        return model.embed_prompt(token)

    with torch.no_grad():
        images = model.image_embeddings(preprocess_images(golden_image(), SIZE))
        audio = model.audio_embeddings(torch.from_numpy(features), torch.from_numpy(padding > 0.5))
        embeds, rows = model.embed_prompt(ids, images, audio)
        _, _, expected = prefill_and_decode_embeddings(model.language_model, embeds, rows, 7, CACHE_LEN,
                                                       embed=embed_generated)
    assert got == expected
    assert session.timing.prompt_tokens == ids.shape[1] and session.timing.media_s > 0


def test_media_ids_embed_as_the_embedders_do(model, session):
    """In a prompt with media, media ids (in the prompt or generated) take the embedders' rows; the PLE rows of ids
    beyond the PLE table are row 0. The rows come from one batched projection of the whole media vocabulary: float
    rounding apart."""
    t = model.config.tokens
    ids = [t.boi, t.eoi, t.image, t.eoa, t.audio, 17]
    embeds, rows = session.embed_ids(ids)
    with torch.no_grad():
        expected, expected_rows = model.embed_prompt(torch.tensor([ids]), model.embed_vision.embed_ids(
            torch.tensor([[t.image]])), model.embed_audio.embed_ids(torch.tensor([[t.audio]])))
    np.testing.assert_allclose(embeds, expected.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(rows, expected_rows.numpy())


def test_text_prompts_embed_as_the_whole_model(model, session):
    """Without media a whole model's session still embeds media-vocabulary ids with the embedders, as transformers'
    whole model, the bundles' golden vectors and Google's engine on the .litertlm do. The tiny tokenizer's pieces
    overlap the tiny model's media ids, so the text decoder alone gives other tokens."""
    session.stop_ids = []
    ids = session.prompt_ids(PROMPT)
    assert any(i >= model.config.tokens.boi for i in ids)  # media ids (318..383) among the text pieces
    got = list(session.generate_ids(PROMPT, 8))
    with torch.no_grad():
        embeds, rows = model.embed_prompt(torch.tensor([ids]))
        _, _, expected = prefill_and_decode_embeddings(model.language_model, embeds, rows, 7, CACHE_LEN,
                                                       embed=model.embed_prompt)
    assert got == expected
    text_only = session_for_model(model.language_model, cache_len=CACHE_LEN, prefill_lengths=PREFILL)
    text_only.stop_ids = []
    assert list(text_only.generate_ids(PROMPT, 8)) != got


def test_bad_media_is_one_input_error(session):
    with pytest.raises(InputError, match="does not fit the KV cache of 512"):
        list(session.generate_ids(PROMPT, images=[golden_image()] * 2, audio=[golden_audio()]))
    with pytest.raises(InputError, match="image 1: array of dtype float32"):
        list(session.generate_ids(PROMPT, images=[golden_image().astype(np.float32)]))
    with pytest.raises(InputError, match="--image-size 768: the vision encoder takes 256 px"):
        list(session.generate_ids(PROMPT, images=[golden_image()], image_size=768))
    with pytest.raises(InputError, match="audio array: the audio contains NaN"):
        list(session.generate_ids(PROMPT, audio=[np.full(100, np.nan, np.float32)]))
    with pytest.raises(InputError, match="no image or audio encoders"):
        list(session_for_model(default_model()).generate_ids(PROMPT, images=[golden_image()]))


# --- bundles: every float backend against the torch backend, bad media through the CLI --------------------------


def _greedy(bundle, backend, n=8):
    session = open_bundle(bundle, backend)
    session.stop_ids = []
    return list(session.generate_ids(PROMPT, max_new_tokens=n, images=[SAMPLE_IMAGE], audio=[SAMPLE_AUDIO]))


@pytest.mark.heavy
@pytest.mark.parametrize("target, backend", [("android", "litert"), ("executorch", "executorch")])
def test_every_float_backend_gives_the_torch_tokens(multimodal_bundles, target, backend):
    reference = _greedy(multimodal_bundles / target, "torch")
    assert len(reference) == 8
    assert _greedy(multimodal_bundles / target, backend) == reference


@pytest.mark.heavy
def test_bundle_manifest_lists_the_encoders(multimodal_bundles, model):
    from safetensors.torch import load_file

    from models.encoders import golden_media

    for target in ("android", "executorch"):
        folder = multimodal_bundles / target
        manifest = json.loads((folder / "manifest.json").read_text())
        encoders = manifest["encoders"]
        assert encoders["components"] == ["vision", "audio"] and encoders["image_sizes"] == [SIZE]
        assert encoders["media_tokens"]["image"] == model.config.tokens.image
        assert manifest["export_spec"]["cache_len"] == CACHE_LEN
        assert not list(folder.glob("*.tflite"))
        stored, expected = load_file(folder / "golden_media.safetensors"), golden_media(model, (SIZE,))
        assert stored.keys() == expected.keys() and all(torch.equal(stored[k], expected[k]) for k in stored)


def _cli_error(capsys, *argv, runtime_logs=False):
    """The CLI's exit code 2 and its one error line. runtime_logs: the ExecuTorch runtime writes its own log lines
    to stderr when it loads (cpuinfo, torch warnings); the error line is then the last and the only `error:` one."""
    code = main([str(a) for a in argv])
    _, err = capsys.readouterr()
    lines = err.strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert code == 2 and len(errors) == 1 and lines[-1] == errors[0] and (runtime_logs or len(lines) == 1), err
    return errors[0]


@pytest.mark.heavy
@pytest.mark.parametrize("target, backend", [("executorch", "torch"), ("executorch", "executorch"),
                                             ("android", "litertlm")])
def test_bad_media_through_the_cli(multimodal_bundles, target, backend, tmp_path, capsys):
    bundle = multimodal_bundles / target
    run = ("generate", "--bundle", bundle, "--backend", backend)
    logs = backend != "torch"
    line = _cli_error(capsys, *run, "--image", tmp_path / "missing.png", PROMPT, runtime_logs=logs)
    assert "missing.png: image file not found" in line
    corrupt = tmp_path / "corrupt.wav"
    corrupt.write_bytes(b"RIFF\x10\x00\x00\x00WAVEjunkjunk")
    line = _cli_error(capsys, *run, "--audio", corrupt, PROMPT, runtime_logs=logs)
    assert "corrupt.wav: cannot read as WAV/FLAC audio" in line
    line = _cli_error(capsys, *run, "--image", SAMPLE_IMAGE, "--image-size", 768, PROMPT, runtime_logs=logs)
    assert "--image-size 768: " in line and "256 px" in line


@pytest.mark.parametrize("target, backend", [("executorch", "executorch"), ("android", "litertlm")])
def test_text_only_bundle_refuses_media(default_bundles, target, backend, capsys):
    line = _cli_error(capsys, "generate", "--bundle", default_bundles / target, "--backend", backend,
                      "--image", SAMPLE_IMAGE, PROMPT, runtime_logs=backend == "executorch")
    assert "no image or audio encoders" in line


@pytest.mark.heavy
@pytest.mark.parametrize("target, backend", [("android", "litert"), ("executorch", "executorch"),
                                             ("ios", "coreml-mil")])
def test_every_backend_encodes_a_clip_of_any_length_as_the_clip_alone(multimodal_bundles, model, target, backend):
    """The exported encoders take one 30 s window; a shorter clip padded into it must give the embeddings the float
    model gives for the clip alone (its own frames only; tests/test_audio.py holds that model to transformers)."""
    from models.audio import log_mel_features
    from models.encoders import AudioEmbedder

    encoders = open_bundle(multimodal_bundles / target, backend).encoders
    embedder = AudioEmbedder(model).eval()
    for seconds in (0.5, 2.0, 4.3, 9.99):
        clip = golden_audio()[: int(seconds * SAMPLE_RATE)] if seconds <= 2.5 else \
            np.resize(golden_audio(), int(seconds * SAMPLE_RATE))
        features, valid = log_mel_features(clip)
        with torch.no_grad():
            expected = embedder(torch.from_numpy(features)[None], torch.from_numpy(~valid)[None].float())[0].numpy()
        got = encoders.audio(*audio_window_inputs(clip))[0]
        # float32 backends to float32 rounding; coreml-mil computes in fp16 (0.0054 on the golden clip)
        limit = 0.02 if backend == "coreml-mil" else 1e-4 * np.abs(expected).max()
        assert np.abs(got - expected).max() <= limit, (backend, seconds, np.abs(got - expected).max(-1))
