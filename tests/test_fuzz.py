"""Fuzzing the readers of untrusted bytes (hypothesis): the manifest reader, the PLE asset's header reader and the
media decoders (WAV/FLAC, PNG/JPEG). Whatever the input, each either reads it or raises one InputError line; never
another exception, a hang or an allocation sized by a lying header.

Bounded in CI (FUZZ_EXAMPLES cases per reader, about a minute in all). A longer run, e.g. before a release:
    G3N_FUZZ_EXAMPLES=20000 .venv/bin/python -m pytest -n 0 tests/test_fuzz.py
"""

from __future__ import annotations

import io
import json
import os
import struct

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from contract.bundle import MANIFEST, read_manifest
from contract.ple import PleTable
from exporters.ple import write_ple_table
from models.audio import load_audio
from models.errors import InputError
from models.vision import preprocess_images

FUZZ_EXAMPLES = int(os.environ.get("G3N_FUZZ_EXAMPLES", "150"))
# No example database: the run writes nothing into the repository (and each run explores afresh).
FUZZ = settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def _one_line(error: InputError) -> None:
    assert str(error) and "\n" not in str(error), repr(str(error))


# --- the manifest ---------------------------------------------------------------------------------------------------

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


def _key_paths(value, prefix=()):
    """Every (dict key or list index) path in a JSON value."""
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list):
        items = enumerate(value)
    else:
        return
    for key, child in items:
        yield prefix + (key,)
        yield from _key_paths(child, prefix + (key,))


@pytest.fixture(scope="module")
def manifest(default_bundles):
    return json.loads((default_bundles / "executorch" / MANIFEST).read_text())


@FUZZ
@given(data=st.data())
def test_manifest_reader(manifest, tmp_path, data):
    """Any value at any key, a key deleted or added, several at once: read or one InputError line."""
    edited = json.loads(json.dumps(manifest))
    paths = list(_key_paths(manifest))
    for _ in range(data.draw(st.integers(1, 3))):
        *parents, last = data.draw(st.sampled_from(paths))
        node = edited
        try:
            for part in parents:
                node = node[part]
            action = data.draw(st.sampled_from(["replace", "delete", "add"]))
            if action == "replace":
                node[last] = data.draw(JSON)
            elif action == "delete":
                del node[last]
            elif isinstance(node, dict):
                node[data.draw(st.text(min_size=1, max_size=8))] = data.draw(JSON)
        except (KeyError, IndexError, TypeError):  # an earlier edit changed the path
            pass
    (tmp_path / MANIFEST).write_text(json.dumps(edited))
    try:
        read_manifest(tmp_path)
    except InputError as e:
        _one_line(e)


def test_a_key_with_a_newline_is_named_on_one_line(manifest, tmp_path):
    """Found by a 20000-example run: a key "\n" added where the schema allows any key (and checks the value) went
    into the key path as is, and the message had two lines."""
    edited = json.loads(json.dumps(manifest))
    edited["model"]["parameters"]["\n"] = None
    (tmp_path / MANIFEST).write_text(json.dumps(edited))
    with pytest.raises(InputError, match=r"model\.parameters\.'\\n': None is not of type") as e:
        read_manifest(tmp_path)
    _one_line(e.value)


@FUZZ
@given(raw=st.binary(max_size=256))
def test_manifest_reader_on_bytes(tmp_path, raw):
    (tmp_path / MANIFEST).write_bytes(raw)
    with pytest.raises(InputError) as e:
        read_manifest(tmp_path)
    _one_line(e.value)


# --- the PLE asset ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ple_bytes(tmp_path_factory):
    table = torch.randn(12, 2 * 4, generator=torch.Generator().manual_seed(0))
    path = write_ple_table(table, tmp_path_factory.mktemp("ple") / "ple.safetensors", "int8", 16, 2, 2.0)
    return path.read_bytes()


def _read_ple(path) -> None:
    try:
        table = PleTable(path)
        rows = table.rows(np.arange(min(4, table.text_vocab_size)))
        assert rows.shape[1:] == (table.num_layers, table.dim)
    except InputError as e:
        _one_line(e)


@FUZZ
@given(data=st.data())
def test_ple_header_reader_on_edited_headers(ple_bytes, tmp_path, data):
    """The JSON header rewritten (any value at any key, its metadata included), the data kept."""
    (n,) = struct.unpack("<Q", ple_bytes[:8])
    header = json.loads(ple_bytes[8: 8 + n])
    header["__metadata__"] = {k: json.loads(v) for k, v in header["__metadata__"].items()}
    *parents, last = data.draw(st.sampled_from(list(_key_paths(header))))
    node = header
    for part in parents:
        node = node[part]
    node[last] = data.draw(JSON)
    meta = header.get("__metadata__")
    if isinstance(meta, dict):  # safetensors keeps metadata values as strings: mostly so, sometimes not
        header["__metadata__"] = {k: json.dumps(v) if data.draw(st.booleans()) else v for k, v in meta.items()}
    encoded = json.dumps(header).encode()
    path = tmp_path / "ple.safetensors"
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + ple_bytes[8 + n:])
    _read_ple(path)


@FUZZ
@given(data=st.data())
def test_ple_header_reader_on_flipped_and_cut_bytes(ple_bytes, tmp_path, data):
    raw = bytearray(ple_bytes)
    for _ in range(data.draw(st.integers(0, 4))):
        at = data.draw(st.integers(0, min(len(raw) - 1, 400)))  # the length prefix and the JSON header
        raw[at] = data.draw(st.integers(0, 255))
    raw = raw[: data.draw(st.integers(0, len(raw)))]
    path = tmp_path / "ple.safetensors"
    path.write_bytes(bytes(raw))
    _read_ple(path)


# --- media ----------------------------------------------------------------------------------------------------------


def _wav(sample_rate: int, subtype: str, samples: int) -> bytes:
    import soundfile

    buffer = io.BytesIO()
    wave = np.sin(np.arange(samples) / 5.0).astype(np.float32) * 0.5
    soundfile.write(buffer, wave, sample_rate, format="WAV", subtype=subtype)
    return buffer.getvalue()


def _image(kind: str) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.arange(12 * 9 * 3, dtype=np.uint8).reshape(12, 9, 3)).save(buffer, format=kind)
    return buffer.getvalue()


def _mutated(data, raw: bytes, head: int) -> bytes:
    raw = bytearray(raw)
    for _ in range(data.draw(st.integers(1, 6))):
        at = data.draw(st.integers(0, min(len(raw) - 1, head)))
        raw[at] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        raw = raw[: data.draw(st.integers(0, len(raw)))]
    return bytes(raw)


@FUZZ
@given(data=st.data(), rate=st.sampled_from([8000, 16000, 44100]), subtype=st.sampled_from(["PCM_16", "FLOAT"]))
def test_audio_decoder(tmp_path, data, rate, subtype):
    path = tmp_path / "clip.wav"
    path.write_bytes(_mutated(data, _wav(rate, subtype, 800), head=64))
    try:
        audio = load_audio(path)
        assert audio.dtype == np.float32 and audio.ndim == 1 and np.isfinite(audio).all()
    except InputError as e:
        _one_line(e)


@FUZZ
@given(data=st.data(), kind=st.sampled_from(["PNG", "JPEG"]))
def test_image_decoder(tmp_path, data, kind):
    raw = _image(kind)
    path = tmp_path / f"image.{kind.lower()}"
    path.write_bytes(_mutated(data, raw, head=len(raw)))
    try:
        pixels = preprocess_images(path, size=256)
        assert tuple(pixels.shape[-2:]) == (256, 256)
    except InputError as e:
        _one_line(e)
