"""The LiteRT encoders (the vision_encoder, vision_adapter, audio_encoder_hw, audio_adapter and end_of_audio sections
of model.litertlm) against the float PyTorch encoders, and Google's LiteRT-LM engine running them.

One export of the embedded default whole model (vision at 256 px, audio, the decoder with a 320-position cache so that
an image prompt fits; a few minutes of conversion on 2 cores) serves every test but the heavy one; the int8 variant
re-quantizes its encoder files and repacks them. The torch references are our encoders (models.encoders), which
equal Gemma3n.image_embeddings / audio_embeddings, themselves tested against timm and transformers.

`python tests/test_export_litert_encoders.py` prints the errors, sizes and conversion times at 256 and 768 px for
every LiteRT encoder scheme (minutes).
"""

from __future__ import annotations

import io
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import torch

from contract.bundle import LITERTLM_FILE
from exporters import litert
from exporters.spec import ENCODER_QUANT_SCHEMES, EXPORT_RECORD, ExportSpec
from models.default import default_gemma3n
from models.encoders import (
    AudioEncoder,
    audio_window_inputs,
    golden_audio,
    golden_image,
    golden_media,
    media_token_embeddings,
)
from models.errors import InputError
from models.generate import prefill_and_decode_embeddings
from runtime_py.executors.litert_executor import (
    LiteRtEncoders,
    LiteRtExecutor,
    litertlm_section_list,
)
from runtime_py.executors.torch_executor import TorchEncoders
from runtime_py.litertlm_session import LitertLmSession

TOKENIZER = Path("models/assets/tokenizer.model")
CACHE_LEN, PREFILL_LEN, SIZE = 320, 16, 256
ENCODER_FILES = [(litert.VISION_ENCODER_FILE, "VISION_ENCODER"), (litert.VISION_ADAPTER_FILE, "VISION_ADAPTER"),
                 (litert.AUDIO_ENCODER_FILE, "AUDIO_ENCODER_HW"), (litert.AUDIO_ADAPTER_FILE, "AUDIO_ADAPTER"),
                 (litert.END_OF_AUDIO_FILE, "END_OF_AUDIO")]
PROMPT = "what is this"


def whole_spec(**changes) -> ExportSpec:
    fields = dict(cache_len=CACHE_LEN, prefill_lengths=(PREFILL_LEN,), ple_storage="fp32",
                  components=("decoder", "vision", "audio"), image_sizes=(SIZE,))
    return ExportSpec("litert", **{**fields, **changes})


@pytest.fixture(scope="module")
def model(default_gemma3n):
    return default_gemma3n


@pytest.fixture(scope="module")
def exported(model, tmp_path_factory):
    spec = whole_spec()
    return spec, litert.export_litert(model, spec, tmp_path_factory.mktemp("litert-mm") / "export", TOKENIZER)


@pytest.fixture(scope="module")
def golden(model):
    return {k: v.numpy() for k, v in golden_media(model, (SIZE,)).items()}


def errors(got: np.ndarray, want: np.ndarray) -> tuple[float, float]:
    """(max abs error, cosine) over the whole tensor."""
    a, b = np.asarray(got, np.float64).ravel(), np.asarray(want, np.float64).ravel()
    return float(np.abs(a - b).max()), float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def repack(exported_dir: Path, work: Path, encoder_files: list[tuple[str, str]], model, spec: ExportSpec) -> Path:
    """A model.litertlm from the export's decoder files and the given encoder files (already in `work`)."""
    for name in (litert.DECODER_FILE, litert.EMBEDDER_FILE, litert.PER_LAYER_EMBEDDER_FILE):
        shutil.copy(exported_dir / name, work / name)
    metadata = litert.llm_metadata(model.language_model, spec, TOKENIZER, model)
    return litert.pack_litertlm(work, metadata, TOKENIZER, work / litert.LITERTLM_FILE, encoder_files)


def signature_io(data: bytes) -> dict[str, tuple[dict, dict]]:
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=data)
    out = {}
    for name in interpreter.get_signature_list():
        runner = interpreter.get_signature_runner(name)
        out[name] = tuple({k: (list(v["shape"]), v["dtype"].__name__) for k, v in details.items()}
                          for details in (runner.get_input_details(), runner.get_output_details()))
    return out


def litertlm_metadata(path: Path):
    from litert_lm_builder import litertlm_header_schema_py_generated as schema
    from litert_lm_builder import litertlm_peek
    from litert_lm_builder.runtime.proto import llm_metadata_pb2

    header, data = litertlm_peek.read_litertlm_header(str(path), io.StringIO()), path.read_bytes()
    for i in range(header.SectionMetadata().ObjectsLength()):
        obj = header.SectionMetadata().Objects(i)
        if obj.DataType() == schema.AnySectionDataType.LlmMetadataProto:
            return llm_metadata_pb2.LlmMetadata.FromString(data[obj.BeginOffset():obj.EndOffset()])
    raise AssertionError("no LlmMetadata section")


# --- the file ----------------------------------------------------------------------------------------------------


def test_the_litertlm_holds_the_encoders_in_litert_lm_layouts(exported, model):
    """What LiteRT-LM's executors, and so the AI Edge Gallery's side-loading (mobile_demo/README.md), require of a
    Gemma 3n file with image and audio: the section types in order, one signature per audio section with inputs
    src_inputs/mask and outputs features/mask, and LlmMetadata's gemma3n start/end tokens and image size."""
    spec, path = exported
    assert sorted(p.name for p in path.parent.iterdir()) == sorted(
        [litert.DECODER_FILE, litert.EMBEDDER_FILE, litert.PER_LAYER_EMBEDDER_FILE, path.name, EXPORT_RECORD]
        + [f for f, _ in ENCODER_FILES])
    sections = litertlm_section_list(path)
    assert [t for t, _ in sections] == ["prefill_decode", "embedder", "per_layer_embedder", "vision_encoder",
                                        "vision_adapter", "audio_encoder_hw", "audio_adapter", "end_of_audio"]
    io_of = {t: signature_io(data) for t, data in sections}
    h, d = model.config.text.hidden_size, model.config.audio.hidden_size
    assert io_of["vision_encoder"] == {"vision_256": ({"images": ([1, 256, 256, 3], "float32")},
                                                      {"features": ([1, 256, 2048], "float32")})}
    assert io_of["vision_adapter"] == {"vision_adapter": ({"soft_tokens": ([1, 256, 2048], "float32")},
                                                          {"mm_embedding": ([1, 257, h], "float32")})}
    assert io_of["audio_encoder_hw"] == {"audio_encoder": (
        {"src_inputs": ([1, 3008, 128], "float32"), "mask": ([1, 3008], "bool")},
        {"features": ([1, 188, d], "float32"), "mask": ([1, 188], "bool")})}
    assert io_of["audio_adapter"] == {"audio_adapter": (
        {"features": ([1, 188, d], "float32"), "mask": ([1, 188], "bool")},
        {"audio_embeddings": ([1, 188, h], "float32")})}
    assert io_of["end_of_audio"] == {"end_of_audio": ({}, {"embeddings": ([1, 1, h], "float32")})}
    gemma3n = litertlm_metadata(path).llm_model_type.gemma3n
    sp, tokens = spm.SentencePieceProcessor(model_file=str(TOKENIZER)), model.config.tokens
    assert (gemma3n.start_of_image_token.token_str, gemma3n.end_of_image_token.token_str,
            gemma3n.start_of_audio_token.token_str, gemma3n.end_of_audio_token.token_str) == tuple(
        sp.id_to_piece(t) for t in (tokens.boi, tokens.eoi, tokens.boa, tokens.eoa))
    assert (gemma3n.image_tensor_height, gemma3n.image_tensor_width) == (SIZE, SIZE)


def test_hard_token_rows_in_the_sections_are_the_embedders(exported, model):
    """The adapter's last row and the end_of_audio model give the embedders' <end_of_image> / <end_of_audio> rows;
    the text embedder gives a media id its embedder's row (as Gemma3n.embed_prompt), a text id the text table's."""
    from ai_edge_litert.interpreter import Interpreter

    _, path = exported
    sections = dict(litertlm_section_list(path))
    rows, tokens = media_token_embeddings(model), model.config.tokens
    vision_row = lambda i: rows["vision_rows"][i - int(rows["vision_first_id"])].numpy()  # noqa: E731
    audio_row = lambda i: rows["audio_rows"][i - int(rows["audio_first_id"])].numpy()  # noqa: E731

    def run(model_type: str, **inputs) -> np.ndarray:
        interpreter = Interpreter(model_content=sections[model_type])
        runner = interpreter.get_signature_runner(next(iter(interpreter.get_signature_list())))
        return next(iter(runner(**inputs).values()))

    mm = run("vision_adapter", soft_tokens=np.random.default_rng(0).standard_normal((1, 256, 2048), np.float32))
    np.testing.assert_allclose(mm[0, -1], vision_row(tokens.eoi), atol=1e-5)
    np.testing.assert_allclose(run("end_of_audio")[0, 0], audio_row(tokens.eoa), atol=1e-5)
    with torch.no_grad():
        for token, want in ((tokens.eoi, vision_row(tokens.eoi)), (tokens.eoa, audio_row(tokens.eoa)),
                            (7, model.language_model.embed(torch.tensor([[7]]))[0, 0].numpy())):
            got = run("embedder", token_ids=np.array([[token]], np.int32))[0, 0]
            np.testing.assert_allclose(got, want, atol=1e-5, err_msg=f"id {token}")


def conv_weight_types(path: Path) -> dict[str, set[str]]:
    """Of every CONV_2D / DEPTHWISE_CONV_2D op: the type its weight is stored in (through a DEQUANTIZE op for
    weight-only int8)."""
    from ai_edge_quantizer.utils import tfl_flatbuffer_utils as tfl

    convs, dequantize = {3: "CONV_2D", 4: "DEPTHWISE_CONV_2D"}, 6  # TFLite BuiltinOperator codes
    model = tfl.read_model(str(path))
    code = lambda op: max(model.operatorCodes[op.opcodeIndex].builtinCode,  # noqa: E731
                          model.operatorCodes[op.opcodeIndex].deprecatedBuiltinCode)
    out: dict[str, set[str]] = {}
    for subgraph in model.subgraphs:
        producer = {o: op for op in subgraph.operators for o in op.outputs}
        for op in subgraph.operators:
            if code(op) not in convs:
                continue
            weight = op.inputs[1]
            if weight in producer and code(producer[weight]) == dequantize:
                weight = producer[weight].inputs[0]
            out.setdefault(convs[code(op)], set()).add(tfl.TENSOR_CODE_TO_TYPE[subgraph.tensors[weight].type])
    return out


# --- our runtime's view: LiteRtEncoders ---------------------------------------------------------------------------


def test_float_encoders_match_the_torch_encoders(exported, model, golden):
    spec, path = exported
    ours, torch_ref = LiteRtEncoders(path.parent / LITERTLM_FILE, spec.components), TorchEncoders(model, (SIZE,))
    assert (ours.image_sizes, ours.has_vision, ours.has_audio) == ((SIZE,), True, True)
    pixels = golden[f"pixel_values_{SIZE}"]
    image_error, image_cos = errors(ours.image(pixels), torch_ref.image(pixels))
    audio_args = golden["audio_features"], golden["audio_padding_mask"]
    audio_error, audio_cos = errors(ours.audio(*audio_args), torch_ref.audio(*audio_args))
    # The same float32 arithmetic in XNNPACK's op order: measured 1.1e-5 on image embeddings of size ~3 (through
    # ~80 conv/attention blocks) and 1.4e-6 on audio embeddings of size ~4; limits with a 10x margin. A wrong layout
    # (channels first, the 2997 -> 3008 padding, a mask's polarity) errs by O(1).
    assert image_error <= 1e-4 and image_cos > 1 - 1e-9, (image_error, image_cos)
    assert audio_error <= 2e-5 and audio_cos > 1 - 1e-9, (audio_error, audio_cos)
    # The 3008-frame encoder on a full 30 s window (no padding frame): the causal conformer ignores the 11 zero frames.
    full = np.random.default_rng(1).standard_normal((1, 2997, 128)).astype(np.float32)
    no_padding = np.zeros((1, 2997), np.float32)
    assert errors(ours.audio(full, no_padding), torch_ref.audio(full, no_padding))[0] <= 2e-5


@torch.no_grad()
def test_int8_weight_only_encoders_keep_the_embeddings(exported, model, golden, tmp_path):
    """int8 weights, per channel, on every conv (MobileNet-V5 and the conformer's stem) and matmul."""
    spec, path = exported
    recipe = ExportSpec("litert", encoder_quant="int8-weight-only").encoder_recipe
    files = []
    for name, model_type in ENCODER_FILES:
        shutil.copy(path.parent / name, tmp_path / name)
        if model_type != "END_OF_AUDIO":
            litert.quantize(tmp_path / name, recipe)
        files.append((name, model_type))
    repack(path.parent, tmp_path, files, model, spec)

    for name in (litert.VISION_ENCODER_FILE, litert.AUDIO_ENCODER_FILE):
        types = conv_weight_types(tmp_path / name)
        assert types and all(t == {"INT8"} for t in types.values()), (name, types)
    assert set(conv_weight_types(tmp_path / litert.VISION_ENCODER_FILE)) == {"CONV_2D", "DEPTHWISE_CONV_2D"}

    ours, torch_ref = LiteRtEncoders(tmp_path / LITERTLM_FILE, spec.components), TorchEncoders(model, (SIZE,))
    pixels = golden[f"pixel_values_{SIZE}"]
    audio_args = golden["audio_features"], golden["audio_padding_mask"]
    image_error, image_cos = errors(ours.image(pixels), torch_ref.image(pixels))
    audio_error, audio_cos = errors(ours.audio(*audio_args), torch_ref.audio(*audio_args))
    # Measured: image cosine 0.99925 (max error 0.13 on values up to ~3.4), audio cosine 0.99998 (max error 0.05);
    # the issue asks >= 0.99 at 768 px (the heavy test; measured 0.99879 there).
    assert image_cos >= 0.99 and audio_cos >= 0.99, (image_cos, audio_cos)
    assert 0 < image_error and 0 < audio_error  # the weights really changed


def test_bad_inputs_name_what_the_bundle_has(exported, model, golden, tmp_path):
    spec, path = exported
    ours = LiteRtEncoders(path.parent / LITERTLM_FILE, spec.components)
    with pytest.raises(InputError, match="no vision encoder for 512 px .*has 256"):
        ours.image(np.zeros((1, 3, 512, 512), np.float32))
    with pytest.raises(InputError, match=r"expected \[1, 3, S, S\]"):
        ours.image(np.zeros((1, 256, 256, 3), np.float32))
    with pytest.raises(InputError, match=r"expected \[1, 2997, 128\] and \[1, 2997\]"):
        ours.audio(golden["audio_features"][:, :100], golden["audio_padding_mask"][:, :100])
    # A file without encoder sections whose manifest claims them.
    text_only = repack(path.parent, tmp_path, [], model, whole_spec(components=("decoder",)))
    with pytest.raises(InputError, match="lists the vision encoder but the file has no vision"):
        LiteRtEncoders(text_only.parent / LITERTLM_FILE, spec.components)
    bare = LiteRtEncoders(text_only.parent / LITERTLM_FILE, ("decoder",))
    assert (bare.has_vision, bare.has_audio, bare.image_sizes) == (False, False, ())
    with pytest.raises(InputError, match="no audio encoder"):
        bare.audio(golden["audio_features"], golden["audio_padding_mask"])


@torch.no_grad()
def test_the_decoder_sections_still_run(exported, model):
    spec, path = exported
    lm = model.language_model
    sp = spm.SentencePieceProcessor(model_file=str(TOKENIZER))
    ids = ([lm.config.bos_token_id] + sp.encode("The train leaves the station at seven. " * 3))[:PREFILL_LEN]
    embeds, rows = model.embed_prompt(torch.tensor([ids]))
    prefill, step_logits, tokens = prefill_and_decode_embeddings(lm, embeds, rows, 3, CACHE_LEN,
                                                                 embed=whole_model_lookup(model))
    executor = LiteRtExecutor(path, CACHE_LEN, (PREFILL_LEN,))
    embed = lambda ids: (executor.embed(np.array(ids)), executor.per_layer_rows(np.array(ids))[None])  # noqa: E731
    got = [executor.prefill(*embed(ids), 0)]
    got += [executor.decode(*embed([token]), len(ids) + i) for i, token in enumerate(tokens[:3])]
    want = [prefill[0, -1]] + [s[0] for s in step_logits]
    # Float32 in XNNPACK's order, as tests/test_export_litert.py: ~1e-6 on logits of size ~4.
    assert max(float(np.abs(g - w.numpy()).max()) for g, w in zip(got, want)) <= 1e-4


def whole_model_lookup(model):
    """ids [1, T] -> (embeddings, per-layer rows) as the whole model embeds text ids: the ids of the embedders'
    vocabularies (the tiny tokenizer's pieces 320..383 among them) take their embedders' rows."""
    lookup = litert.TableLookup(model.language_model, (model.embed_vision, model.embed_audio))
    return lambda ids: (lookup(ids)["embeddings"], model.language_model.per_layer_embedding(ids))


# --- Google's engine -------------------------------------------------------------------------------------------


def engine(path: Path, **backends):
    import litert_lm

    litert_lm.set_min_log_severity(litert_lm.LogSeverity.ERROR)
    cpu = {k: litert_lm.Backend.CPU(thread_count=2) for k in backends}
    cache = path.parent.with_name(path.parent.name + "-engine-cache")  # the engine's XNNPACK cache: not in the export
    cache.mkdir(exist_ok=True)
    return litert_lm.Engine(str(path), backend=litert_lm.Backend.CPU(thread_count=2), cache_dir=str(cache),
                            activation_data_type=litert_lm.ActivationDataType.FLOAT32, **cpu)


def send(eng, content: list[dict], max_tokens: int) -> tuple[str, int]:
    """The engine's greedy reply to one user turn, and the tokens its conversation holds afterwards."""
    import litert_lm

    conversation = eng.create_conversation(sampler_config=litert_lm.SamplerConfig(top_k=1),
                                           max_output_tokens=max_tokens)
    reply = conversation.send_message({"role": "user", "content": content})
    return reply["content"][0]["text"], conversation.token_count


@torch.no_grad()
def test_engine_still_generates_text_as_before(exported, model):
    """As tests/test_export_litert.py, on the whole model, whose text ids of the embedders' vocabularies embed as
    Gemma3n.embed_prompt embeds them."""
    import litert_lm

    _, path = exported
    lm, sp = model.language_model, spm.SentencePieceProcessor(model_file=str(TOKENIZER))
    text = "The train leaves the station at seven"
    embeds, rows = model.embed_prompt(torch.tensor([[lm.config.bos_token_id] + sp.encode(text)]))
    _, _, tokens = prefill_and_decode_embeddings(lm, embeds, rows, 15, CACHE_LEN, embed=whole_model_lookup(model))
    assert not {1, 5} & set(tokens)  # neither <eos> nor <end_of_turn>: the engine runs all 16 steps
    session = engine(path, vision_backend=1, audio_backend=1).create_session(
        apply_prompt_template=False, sampler_config=litert_lm.SamplerConfig(top_k=1), max_output_tokens=16)
    session.run_prefill([text])
    assert session.run_decode().texts[0] == sp.decode(tokens)


@torch.no_grad()
def test_engine_image_prompt_gives_the_torch_models_tokens(exported, model, tmp_path):
    """Google's engine, given an image file in a conversation, writes '\\n\\n' + <start_of_image> after the text before
    the image, the adapter's 257 rows (256 + <end_of_image>), '\\n\\n', then the rest (its Gemma 3n data processor);
    placeholders read PLE row 0, as media ids do in transformers. The same sequence through the torch model gives
    the same greedy tokens, for two images whose tokens differ (so the image really reaches the decoder). A square
    256 px PNG keeps the engine's resize (stb, Catmull-Rom) out of it: it divides the bytes by 255, as we do."""
    from PIL import Image

    _, path = exported
    lm, tokens, sp = model.language_model, model.config.tokens, spm.SentencePieceProcessor(model_file=str(TOKENIZER))
    eng = engine(path, vision_backend=1)
    rendered = eng.create_conversation().render_message_to_string(
        {"role": "user", "content": [{"type": "image", "path": "x.png"}, {"type": "text", "text": PROMPT}]})
    before, after = rendered.split("<image_soft_token>")
    ids = ([lm.config.bos_token_id] + sp.encode(before + "\n\n" + sp.id_to_piece(tokens.boi))
           + [tokens.image] * tokens.image_soft_tokens + [tokens.eoi] + sp.encode("\n\n") + sp.encode(after))
    decode_embed = whole_model_lookup(model)

    image = np.asarray(Image.fromarray(golden_image()).resize((SIZE, SIZE), Image.BILINEAR))
    replies = {}
    for name, pixels in (("golden", image), ("mirrored", image[:, ::-1])):
        Image.fromarray(np.ascontiguousarray(pixels)).save(tmp_path / f"{name}.png")
        soft = model.image_embeddings(torch.from_numpy(pixels.copy()).permute(2, 0, 1)[None].float() / 255)
        embeds, rows = model.embed_prompt(torch.tensor([ids]), soft)
        _, _, want = prefill_and_decode_embeddings(lm, embeds, rows, 5, CACHE_LEN, embed=decode_embed)
        assert not {1, 5} & set(want)
        got, held = send(eng, [{"type": "image", "path": str(tmp_path / f"{name}.png")},
                               {"type": "text", "text": PROMPT}], 6)
        assert (got, held) == (sp.decode(want), len(ids) + 6), name
        replies[name] = got
    assert replies["golden"] != replies["mirrored"]
    # The litertlm backend's session: the same conversation, the image given as an array.
    session = LitertLmSession(path, CACHE_LEN)
    assert "".join(session.generate(PROMPT, 6, images=[image])) == replies["golden"]
    with pytest.raises(InputError, match="resizes images to the bundle's 256 px"):
        list(session.generate(PROMPT, 6, images=[image], image_size=768))


@torch.no_grad()
def test_engine_takes_an_audio_clip_as_its_valid_tokens(exported, model, tmp_path):
    """The engine computes its own log-mel spectrogram (USM settings: input x 32768, mel 125-7500 Hz, floor 1e-6,
    normalised; not transformers' Gemma3nAudioFeatureExtractor), so its audio tokens differ from ours and its reply is
    not ours. What it takes from our sections is checked: as many audio tokens as our encoder marks valid (its mask
    output), then the end_of_audio row, between '\\n\\n' + <start_of_audio> and '\\n\\n'."""
    import soundfile as sf

    _, path = exported
    tokens, sp = model.config.tokens, spm.SentencePieceProcessor(model_file=str(TOKENIZER))
    eng = engine(path, audio_backend=1)
    _, text_only = send(eng, [{"type": "text", "text": PROMPT}], 1)
    encoder = AudioEncoder(model).eval()
    for seconds in (2.5, 10.0):
        clip = golden_audio(seconds)
        sf.write(tmp_path / "clip.wav", clip, 16_000)
        _, held = send(eng, [{"type": "audio", "path": str(tmp_path / "clip.wav")},
                             {"type": "text", "text": PROMPT}], 1)
        features, padding = (torch.from_numpy(a) for a in audio_window_inputs(clip))
        audio_tokens = int((encoder(features, padding)[1] < 0.5).sum())  # 16 for 2.5 s, 63 for 10 s
        wrapping = len(sp.encode("\n\n" + sp.id_to_piece(tokens.boa))) + 1 + len(sp.encode("\n\n"))
        assert held - text_only == audio_tokens + wrapping, seconds


# --- two sizes, 768 px (heavy) --------------------------------------------------------------------------------------


@pytest.mark.heavy
@torch.no_grad()
def test_two_image_sizes_and_int8_at_768(exported, model, tmp_path):
    """image_sizes (768, 256): the 768 section last (what the engine runs; it keeps the last section of a type and
    aborts on a multi-signature vision encoder), 256 in an earlier one; our runtime takes both. int8 weights keep
    cosine >= 0.99 at 768, as the issue asks. Several minutes of conversion."""
    spec, path = exported
    two = whole_spec(components=("decoder", "vision"), image_sizes=(768, 256))
    files = litert.convert_encoders(model, two, tmp_path)
    assert [t for _, t in files] == ["VISION_ENCODER", "VISION_ENCODER", "VISION_ADAPTER"]
    repack(path.parent, tmp_path, files, model, two)
    types = [t for t, _ in litertlm_section_list(tmp_path / litert.LITERTLM_FILE)]
    assert types[-3:] == ["vision_encoder", "vision_encoder", "vision_adapter"]
    assert litertlm_metadata(tmp_path / litert.LITERTLM_FILE).llm_model_type.gemma3n.image_tensor_height == 768

    media = {k: v.numpy() for k, v in golden_media(model, (768, 256)).items()}
    ours = LiteRtEncoders(tmp_path / LITERTLM_FILE, two.components)
    assert ours.image_sizes == (768, 256)
    for size in (768, 256):
        error, cos = errors(ours.image(media[f"pixel_values_{size}"]), media[f"image_embeddings_{size}"])
        assert error <= 1e-4 and cos > 1 - 1e-9, (size, error, cos)

    image = _png(tmp_path, golden_image())  # 600 x 400: the engine resizes it to the metadata's 768
    _, held = send(engine(tmp_path / litert.LITERTLM_FILE, vision_backend=1),
                   [{"type": "image", "path": str(image)}, {"type": "text", "text": PROMPT}], 2)
    assert held > 257  # it ran the last vision_encoder section (768 px, the metadata's size) and took 257 rows

    for name, _ in files:
        litert.quantize(tmp_path / name, ENCODER_QUANT_SCHEMES["litert"]["int8-weight-only"])
    repack(path.parent, tmp_path, files, model, two)
    int8 = LiteRtEncoders(tmp_path / LITERTLM_FILE, two.components)
    _, cos = errors(int8.image(media["pixel_values_768"]), media["image_embeddings_768"])
    assert cos >= 0.99, cos


def _png(folder: Path, image: np.ndarray) -> Path:
    from PIL import Image

    Image.fromarray(image).save(folder / "image.png")
    return folder / "image.png"


# --- measurements for the report --------------------------------------------------------------------------------------


def measure(out: Path, sizes: tuple[int, ...] = (768, 256)) -> None:
    """Prints max abs error and cosine against the float torch encoders on golden_media(), per size and scheme, with
    the encoder files' sizes and the conversion and quantization times."""
    model = default_gemma3n()
    media = {k: v.numpy() for k, v in golden_media(model, sizes).items()}
    spec = whole_spec(image_sizes=sizes)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    litert.export_litert(model, spec, out / "float", TOKENIZER)
    print(f"float export (decoder + vision {sizes} + audio): {time.perf_counter() - t0:.0f} s")
    files = [(f, t) for f, t in [(litert.VISION_ENCODER_SIZES_FILE, "VISION_ENCODER")] + ENCODER_FILES
             if (out / "float" / f).exists()]
    for scheme, recipe in ENCODER_QUANT_SCHEMES["litert"].items():
        folder = out / "float"
        if recipe:
            folder = out / scheme
            folder.mkdir(exist_ok=True)
            t0 = time.perf_counter()
            for name, model_type in files:
                shutil.copy(out / "float" / name, folder / name)
                if model_type != "END_OF_AUDIO":
                    litert.quantize(folder / name, recipe)
            print(f"{scheme}: quantized in {time.perf_counter() - t0:.1f} s")
            repack(out / "float", folder, files, model, spec)
        encoders = LiteRtEncoders(folder / LITERTLM_FILE, spec.components)
        for size in sizes:
            error, cos = errors(encoders.image(media[f"pixel_values_{size}"]), media[f"image_embeddings_{size}"])
            print(f"{scheme:17s} vision {size:3d}px  max abs {error:.3g}  cosine {cos:.6f}")
        error, cos = errors(encoders.audio(media["audio_features"], media["audio_padding_mask"]),
                            media["audio_embeddings"])
        print(f"{scheme:17s} audio        max abs {error:.3g}  cosine {cos:.6f}")
        print("   files: " + ", ".join(f"{n} {(folder / n).stat().st_size / 1e6:.2f} MB" for n, _ in files))


if __name__ == "__main__":
    import sys
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        measure(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tmp))
