"""The audio path against transformers on the same (randomised) weights: log-mel features, the conformer encoder,
token counts, export, the published architecture's size, and what load_audio does with odd input.

Tolerances: the features are the same numpy computation in the same dtypes, so they must agree to fp32 rounding
(1e-4 of their scale leaves room for a different BLAS blocking only). The encoder is the same fp32 arithmetic in a
different operation order (blocks gathered by index, one matmul for attention values), so 1e-4 of the output's
scale; a wrong mask, shift or norm gives errors of order 1.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import soundfile
import torch

from models.audio import (
    SAMPLE_RATE,
    AudioConfig,
    AudioEncoder,
    audio_windows,
    encode_audio,
    load_audio,
    log_mel_features,
    num_audio_tokens,
    num_frames,
)
from models.encoders import audio_window_inputs
from models.errors import InputError
from models.hf_reference import TEST_AUDIO
from models.random_init import randomise_

transformers = pytest.importorskip("transformers")
WINDOW = 30 * SAMPLE_RATE


def tone_and_noise(seconds: float, freq: float = 440.0, seed: int = 0, rate: int = SAMPLE_RATE) -> np.ndarray:
    n = int(round(seconds * rate))
    t = np.arange(n) / rate
    noise = np.random.default_rng(seed).standard_normal(n)
    return (0.3 * np.sin(2 * np.pi * freq * t) + 0.05 * noise).astype(np.float32)


@pytest.fixture(scope="module")
def encoders():
    """transformers' encoder on the tiny test config with every parameter random, and ours with its state dict."""
    hf = transformers.Gemma3nAudioEncoder(transformers.Gemma3nAudioConfig(**TEST_AUDIO)).eval()
    randomise_(hf, seed=3)
    ours = AudioEncoder(AudioConfig.from_hf_dict(TEST_AUDIO)).eval()
    ours.load_state_dict(hf.state_dict(), strict=True)
    return hf, ours


def relative_error(ref: torch.Tensor, got: torch.Tensor) -> tuple[float, float]:
    scale = ref.abs().max().item()
    err = (ref - got).abs().max().item()
    print(f"max abs error {err:.3g}, output scale {scale:.3g}")
    return err, scale


# --- configuration ------------------------------------------------------------------------------------------------


def test_config_defaults_are_transformers_defaults():
    hf = transformers.Gemma3nAudioConfig()
    for f in dataclasses.fields(AudioConfig):
        value = getattr(hf, f.name)
        if isinstance(value, (list, tuple)):
            value = tuple(tuple(v) if isinstance(v, (list, tuple)) else v for v in value)
        assert getattr(AudioConfig(), f.name) == value, f.name


def test_config_from_hf_dict_reads_lists_and_ignores_unknown_keys():
    d = transformers.Gemma3nAudioConfig(**TEST_AUDIO).to_dict()  # carries model_type, dtype and other extras
    cfg = AudioConfig.from_hf_dict(d)
    assert cfg.hidden_size == 32 and cfg.sscp_conv_channel_size == (8, 4)
    assert cfg.sscp_conv_kernel_size == ((3, 3), (3, 3)) and cfg.conf_attention_context_left == 5


# --- features -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pad_to", [None, WINDOW])
def test_log_mel_features_match_transformers(pad_to):
    wave = tone_and_noise(3.0 + 77 / SAMPLE_RATE)  # not a multiple of 128 samples: the clip gets padded
    extractor = transformers.Gemma3nAudioFeatureExtractor()
    kw = {} if pad_to is None else dict(padding="max_length", max_length=pad_to)
    ref = extractor(wave, return_tensors="np", **kw)
    features, valid = log_mel_features(wave, pad_to=pad_to)
    ref_features, ref_valid = ref["input_features"][0], ref["input_features_mask"][0]
    assert features.shape == ref_features.shape and features.dtype == np.float32
    err, scale = relative_error(torch.from_numpy(ref_features), torch.from_numpy(features))
    assert err <= 1e-4 * scale
    np.testing.assert_array_equal(valid, ref_valid)
    if pad_to is not None:
        assert not valid.all()  # frames starting in the padding are marked


# --- encoder ------------------------------------------------------------------------------------------------------


def test_state_dict_keys_are_transformers_keys(encoders):
    hf, ours = encoders
    assert list(ours.state_dict()) == list(hf.state_dict())


@torch.no_grad()
def test_each_clip_of_a_padded_batch_gives_what_transformers_gives_for_it_alone(encoders):
    """A batch pads the shorter clip with frames of its zero tail. transformers marks those that start inside the clip
    valid and lets its conv stem read the padding's log-mel floor, so its batch gives that clip other last tokens
    than the clip alone. With each clip's own frames marked valid (num_frames), ours gives every clip its tokens
    alone: the encoder zeroes padded frames before each conv block, as the unpadded clip's zero padding reads."""
    hf, ours = encoders
    clips = [tone_and_noise(2.0, seed=1), tone_and_noise(1.0, freq=900.0, seed=2)]
    extractor = transformers.Gemma3nAudioFeatureExtractor()
    batch = extractor(clips, return_tensors="pt")
    features = batch["input_features"]
    own_frames = torch.stack([torch.arange(features.shape[1]) >= num_frames(len(clip)) for clip in clips])
    got, got_mask = ours(features, own_frames)
    hf_batch = hf(features, ~batch["input_features_mask"]).last_hidden_state
    assert got_mask[1].any() and not got_mask[0].any()  # the shorter clip's tail is padding, and masked
    for i, clip in enumerate(clips):
        alone = extractor([clip], return_tensors="pt")
        ref = hf(alone["input_features"], ~alone["input_features_mask"]).last_hidden_state[0]
        n = ref.shape[0]
        err, scale = relative_error(ref, got[i, :n])
        assert err <= 1e-4 * scale and not got[i, n:].any()  # past the clip: padded tokens, zero
        if i == 1:  # transformers' own batch: the padding changed the shorter clip's last token
            assert (hf_batch[i, n - 1] - ref[n - 1]).abs().max() > 1e-3 * scale


@pytest.mark.parametrize("seconds, rate", [(0.5, SAMPLE_RATE), (1.0, SAMPLE_RATE), (2.0, SAMPLE_RATE),
                                           (4.3, 22050), (9.99, SAMPLE_RATE), (12.8, 44100)])
@torch.no_grad()
def test_a_clip_padded_into_a_30s_window_gives_its_unpadded_tokens(encoders, seconds, rate, tmp_path):
    """What the exported encoders take (one 30 s window, the clip's frames then padding) against transformers on
    the clip alone (its own frames only), at several lengths and file sample rates: every valid token equal."""
    hf, ours = encoders
    path = tmp_path / "clip.wav"
    soundfile.write(path, tone_and_noise(seconds, rate=rate), rate, subtype="PCM_16")
    clip = load_audio(path)
    alone = transformers.Gemma3nAudioFeatureExtractor()([clip], return_tensors="pt")
    ref = hf(alone["input_features"], ~alone["input_features_mask"]).last_hidden_state[0]
    features, padding = audio_window_inputs(clip)
    got, mask = ours(torch.from_numpy(features), torch.from_numpy(padding) > 0.5)
    n = ref.shape[0]
    assert int((~mask[0]).sum()) == n and not got[0, n:].any()
    err, scale = relative_error(ref, got[0, :n])
    assert err <= 1e-4 * scale


@torch.no_grad()
def test_one_30s_window_gives_188_tokens_and_matches_transformers(encoders):
    hf, ours = encoders
    features, valid = log_mel_features(tone_and_noise(30.0))
    assert features.shape == (2997, 128) and valid.all()
    x, padding = torch.from_numpy(features)[None], torch.from_numpy(~valid)[None]
    got, mask = ours(x, padding)
    assert got.shape == (1, 188, 32) and num_audio_tokens(2997) == 188 and not mask.any()
    err, scale = relative_error(hf(x, padding).last_hidden_state, got)
    assert err <= 1e-4 * scale


def test_a_31s_clip_is_a_30s_and_a_1s_window(encoders):
    _, ours = encoders
    wave = tone_and_noise(31.0)
    windows = audio_windows(wave)
    assert [len(w) for w in windows] == [WINDOW, SAMPLE_RATE]
    np.testing.assert_array_equal(np.concatenate(windows), wave)
    tokens = encode_audio(ours, wave)
    assert [t.shape for t in tokens] == [(188, 32), (7, 32)]


@torch.no_grad()
def test_torch_export_at_one_30s_window(encoders):
    _, ours = encoders
    features, valid = log_mel_features(tone_and_noise(20.0), pad_to=WINDOW)  # 10 s of padding at the end
    x, padding = torch.from_numpy(features)[None], torch.from_numpy(~valid)[None]
    program = torch.export.export(ours, (x, padding))
    got, got_mask = program.module()(x, padding)
    want, want_mask = ours(x, padding)
    assert torch.equal(got_mask, want_mask) and want_mask.any()
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * want.abs().max().item())


def test_published_architecture_has_transformers_parameter_count():
    with torch.device("meta"):
        ours = AudioEncoder(AudioConfig())
        hf = transformers.Gemma3nAudioEncoder(transformers.Gemma3nAudioConfig())
    count = sum(p.numel() for p in ours.parameters())
    assert count == sum(p.numel() for p in hf.parameters())
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in hf.state_dict().items()}
    print(f"published audio encoder: {count:,} parameters")


# --- input handling -----------------------------------------------------------------------------------------------


def test_zero_length_audio_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="empty"):
        load_audio(np.zeros(0, dtype=np.float32))
    path = tmp_path / "empty.wav"
    soundfile.write(path, np.zeros(0, dtype=np.float32), SAMPLE_RATE)
    with pytest.raises(InputError, match="empty"):
        load_audio(path)


def test_corrupt_and_missing_files_are_one_line_input_errors(tmp_path):
    bad = tmp_path / "corrupt.wav"
    bad.write_bytes(b"RIFF\x00\x00\x00\x00WAVEfmt garbage" * 10)
    for path in (bad, tmp_path / "missing.flac"):
        with pytest.raises(InputError) as e:
            load_audio(path)
        message = str(e.value)
        assert str(path) in message and "\n" not in message


def test_a_header_that_lies_about_its_length_sizes_no_allocation(tmp_path):
    """A WAV whose RIFF and data sizes claim 2 GB around one second of samples: decoded block by block, it gives
    the samples that are there, never an allocation sized by the header."""
    import struct

    path = tmp_path / "liar.wav"
    wave = (tone_and_noise(1.0) * 32767).astype(np.int16)
    soundfile.write(path, wave, SAMPLE_RATE, subtype="PCM_16")
    data = bytearray(path.read_bytes())
    data[4:8] = struct.pack("<I", 0x7FFFFFF0)
    at = data.index(b"data")
    data[at + 4 : at + 8] = struct.pack("<I", 0x7FFFFF00)
    path.write_bytes(bytes(data))
    audio = load_audio(path)
    assert audio.shape[0] <= SAMPLE_RATE and np.allclose(audio[:1000], wave[:1000] / 32768.0, atol=1e-6)


def test_a_clip_longer_than_a_prompt_takes_is_refused(tmp_path, monkeypatch):
    import models.audio

    monkeypatch.setattr(models.audio, "MAX_AUDIO_SECONDS", 2.0)
    path = tmp_path / "long.wav"
    soundfile.write(path, tone_and_noise(3.0), SAMPLE_RATE)
    with pytest.raises(InputError, match="long.wav: longer than 2 s"):
        load_audio(path)


def test_non_finite_samples_are_an_input_error():
    wave = tone_and_noise(0.5)
    wave[100] = np.nan
    with pytest.raises(InputError, match="NaN"):
        load_audio(wave)


def test_stereo_wav_is_the_mean_of_its_channels(tmp_path):
    left, right = tone_and_noise(1.0, seed=4), tone_and_noise(1.0, freq=1000.0, seed=5)
    stereo = (np.stack([left, right], axis=1) * 32767).astype(np.int16)
    path = tmp_path / "stereo.wav"
    soundfile.write(path, stereo, SAMPLE_RATE, subtype="PCM_16")
    expected = stereo.astype(np.float32).mean(axis=1) / 32768.0
    np.testing.assert_allclose(load_audio(path), expected, rtol=0, atol=1e-7)
    np.testing.assert_allclose(load_audio(stereo), expected, rtol=0, atol=1e-7)  # the same as an int16 array


def test_8bit_wav_and_uint8_array_load_scaled(tmp_path):
    wave = tone_and_noise(0.5)
    path = tmp_path / "u8.wav"
    soundfile.write(path, wave, SAMPLE_RATE, subtype="PCM_U8")
    assert soundfile.info(str(path)).subtype == "PCM_U8"
    loaded = load_audio(path)
    assert loaded.dtype == np.float32 and loaded.shape == wave.shape
    np.testing.assert_allclose(loaded, wave, rtol=0, atol=1 / 128)
    as_uint8 = np.clip(np.round(wave * 128 + 128), 0, 255).astype(np.uint8)
    np.testing.assert_allclose(load_audio(as_uint8), wave, rtol=0, atol=1 / 128)


def test_flac_loads_like_the_samples_written(tmp_path):
    wave = tone_and_noise(0.5)
    path = tmp_path / "clip.flac"
    soundfile.write(path, wave, SAMPLE_RATE, subtype="PCM_16")
    np.testing.assert_allclose(load_audio(path), wave, rtol=0, atol=1 / 32768)


def dominant_frequency(wave: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(wave * np.hanning(len(wave))))
    return float(np.argmax(spectrum) * rate / len(wave))


def test_44k1_wav_is_resampled_to_16k_keeping_pitch(tmp_path):
    rate = 44_100
    t = np.arange(2 * rate) / rate
    tone = (0.5 * np.sin(2 * np.pi * 1000.0 * t)).astype(np.float32)
    path = tmp_path / "tone44k.wav"
    soundfile.write(path, tone, rate, subtype="FLOAT")
    loaded = load_audio(path)
    assert loaded.shape == (2 * SAMPLE_RATE,)
    assert abs(dominant_frequency(loaded, SAMPLE_RATE) - 1000.0) <= 1.0
    assert abs(np.abs(loaded[1000:-1000]).max() - 0.5) < 0.01  # the passband keeps the amplitude
    np.testing.assert_allclose(load_audio(tone, sample_rate=rate), loaded, rtol=0, atol=1e-6)


def test_array_shape_and_dtype_checks():
    with pytest.raises(InputError, match="channels"):
        load_audio(np.zeros((2, 16000), dtype=np.float32))  # [channels, samples] by mistake
    with pytest.raises(InputError, match="dtype"):
        load_audio(np.zeros(100, dtype=np.int64))
    np.testing.assert_allclose(load_audio(np.array([-32768, 0, 16384], dtype=np.int16)), [-1.0, 0.0, 0.5])


def test_a_clip_shorter_than_one_frame_still_gives_one_token(encoders):
    _, ours = encoders
    features, valid = log_mel_features(tone_and_noise(0.01))  # 160 samples < one 513-sample frame
    assert features.shape == (1, 128) and valid.all()
    assert [t.shape for t in encode_audio(ours, tone_and_noise(0.01))] == [(1, 32)]


def test_a_header_with_an_absurd_sample_rate_is_refused_before_resampling(tmp_path):
    """Found by tests/test_fuzz.py: a WAV header saying 2,000,000,000 Hz made resample_poly design a filter of tens of
    billions of taps (out of memory). Rates outside 1 kHz..384 kHz are refused, from a file or with an array."""
    import struct

    path = tmp_path / "rate.wav"
    soundfile.write(path, tone_and_noise(0.1), SAMPLE_RATE, subtype="PCM_16")
    data = bytearray(path.read_bytes())
    at = data.index(b"fmt ") + 12  # the fmt chunk: format, channels, then the sample rate
    data[at: at + 4] = struct.pack("<I", 2_000_000_000)
    path.write_bytes(bytes(data))
    with pytest.raises(InputError, match=r"rate.wav: the header gives 2000000000 Hz"):
        load_audio(path)
    for rate in (0, 999, 10**9, True):
        with pytest.raises(InputError, match="sample rate .* is not an integer in 1000..384000"):
            load_audio(np.zeros(100, np.float32), sample_rate=rate)
