"""The bundle contract: every name a bundle's writer (runtime_py.bundle, exporters/) and its readers (runtime_py's
executors, session, engine, compare, harness) must agree on, the manifest and its check.

A bundle is one folder per target (android, ios, executorch) beside reference/ (the float checkpoint). manifest.json
lists every file with its size and sha256 and is held to a strict schema (manifest.schema.json); `verify_bundle`
trusts nothing in it: a key out of the schema, a path leaving the folder, a symbolic link, a file changed, truncated,
removed or not listed, a cache larger than the model or the machine allows: each is refused naming the file or key.
`bundle_digest` (the manifest's sha256) names a whole bundle; `BundleManifest` is the typed reading.
"""

from __future__ import annotations

import functools
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from models.audio import AUDIO_WINDOW_FRAMES, AUDIO_WINDOW_SAMPLES
from models.errors import InputError
from models.fileio import read_json_object

SCHEMA_VERSION = 2  # 2: the executorch .pte follows ExecuTorch's LLM runner contract (token_embedding, text_decoder)
MANIFEST = "manifest.json"
SIGNATURE_FILE = "bundle.sig"  # beside manifest.json (contract.signing): the one file the manifest cannot list

# --- targets and backends --------------------------------------------------------------------------------------

TARGET_RUNTIMES = {"android": "litert", "ios": "coreml", "executorch": "executorch"}  # bundle target -> exporter
# The backends of runtime_py that run each target's bundle (torch runs any bundle's ../reference).
# coreml-mil runs an ios bundle's MIL programs op by op (runtime_py.executors.mil): Core ML's numerics off macOS.
TARGET_BACKENDS = {"android": ("litert", "litertlm"), "executorch": ("executorch",), "ios": ("coreml", "coreml-mil")}
# executorch-runner: ExecuTorch's stock LLM runner, which gives text only (no logits for g3n compare and the harness).
BACKENDS = ("torch", "litert", "litertlm", "executorch", "executorch-runner", "coreml", "coreml-mil")
BACKEND_TARGETS = ({"torch": None, "executorch-runner": "executorch"}
                   | {b: t for t, backends in TARGET_BACKENDS.items() for b in backends})

# --- files -----------------------------------------------------------------------------------------------------

REFERENCE_DIR = "reference"  # beside the target folders: ../reference from each
GOLDEN_FILE = "golden.safetensors"
GOLDEN_MEDIA_FILE = "golden_media.safetensors"
MEDIA_TOKENS_FILE = "media_tokens.safetensors"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
LITERTLM_FILE = "model.litertlm"  # android
PTE_FILE = "model.pte"  # executorch
PLE_PTD_TAG = "per_layer_embeddings"  # executorch: the .ptd holding the PLE table, without its suffix
PTD_FILE = f"{PLE_PTD_TAG}.ptd"
COREML_PACKAGE = "model.mlpackage"  # ios: the decoder
VISION_PACKAGE, AUDIO_PACKAGE = "vision_encoder.mlpackage", "audio_encoder.mlpackage"
COREML_WEIGHTS_DIR = "Data/com.apple.CoreML/weights"  # inside each .mlpackage: weight.bin of all its functions
PLE_ASSET_FILE = "per_layer_embeddings.safetensors"  # ios: read by the app (format: contract.ple)
EMBEDDINGS_FILE = "embeddings.safetensors"  # ios: the token-embedding table, scaled by sqrt(hidden)

# --- graphs: ExecuTorch methods, LiteRT signatures and sections, Core ML functions ------------------------------

DECODE = "decode"
# ExecuTorch's LLM runner contract (extension/llm/runner/constants.h): its method names, which our .pte follows.
TOKEN_EMBEDDING, TEXT_DECODER = "token_embedding", "text_decoder"
VISION_ENCODER, AUDIO_ENCODER = "vision_encoder", "audio_encoder"
# Our constant methods beside the runner's: how text_decoder's input splits ([1, T, H + L*P]).
HIDDEN_SIZE, PER_LAYER_SHAPE = "get_hidden_size", "get_per_layer_shape"
# LiteRT-LM's section (model) types in a .litertlm.
PREFILL_DECODE_SECTION, EMBEDDER_SECTION, PER_LAYER_EMBEDDER_SECTION = "prefill_decode", "embedder", "per_layer_embedder"
ENCODER_SECTIONS = ("vision_encoder", "vision_adapter", "audio_encoder_hw", "audio_adapter", "end_of_audio")


PREFILL_PREFIX = "prefill_"


def prefill_name(tokens: int) -> str:
    """The prefill graph of a fixed chunk length: ExecuTorch method, LiteRT signature, Core ML function."""
    return f"{PREFILL_PREFIX}{tokens}"


def vision_encoder_name(size: int) -> str:
    """ExecuTorch's method and Core ML's function of the vision encoder at one input size."""
    return f"{VISION_ENCODER}_{size}"


def vision_signature(size: int) -> str:
    """LiteRT's vision_encoder signature at one input size."""
    return f"vision_{size}"


# --- audio window ------------------------------------------------------------------------------------------------

# One 30 s window at 16 kHz (480000 samples, 2997 log-mel frames): the one shape the exported audio encoders take.
# A fact of the model (models.audio), part of the contract.
AUDIO_WINDOW_SAMPLES, AUDIO_WINDOW_FRAMES = AUDIO_WINDOW_SAMPLES, AUDIO_WINDOW_FRAMES
# LiteRT-LM's audio executor needs the encoder's frame count to be a multiple of its token count (188 x 16).
LITERT_AUDIO_FRAMES = 3008


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_entries(root: Path, exclude: tuple[str, ...] = (MANIFEST,)) -> list[dict]:
    """Every file below `root` (folders such as .mlpackage included file by file), sorted, with size and sha256."""
    entries = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if rel in exclude:
            continue
        entries.append({"path": rel, "size": path.stat().st_size, "sha256": sha256_of(path)})
    return entries


SCHEMA_FILE = Path(__file__).with_name("manifest.schema.json")


def read_manifest(bundle: Path) -> dict:
    """manifest.json, held to the strict schema (contract/manifest.schema.json): a missing or unknown key, a wrong
    type (a boolean is not a number) or a value out of range is one InputError naming the key."""
    path = Path(bundle) / MANIFEST
    manifest = read_json_object(Path(bundle), MANIFEST, "bundle", "not a gemma3n-mobile bundle")
    version = manifest.get("schema_version")
    if isinstance(version, bool) or version != SCHEMA_VERSION:
        raise InputError(f"{path}: schema_version {version!r} is not supported (this runtime reads {SCHEMA_VERSION})")
    _check_schema(manifest, path)
    _check_consistency(manifest, path)
    return manifest


def _check_schema(manifest: dict, path: Path) -> None:
    from jsonschema.exceptions import best_match

    error = best_match(_manifest_validator().iter_errors(manifest))
    if error is not None:
        # A key may hold any character (a newline too): shown escaped, so the error stays one line.
        key = ".".join(str(p) if str(p).isprintable() else repr(p) for p in error.absolute_path) or "(top level)"
        message = error.message if len(error.message) <= 160 else error.message[:157] + "..."
        raise InputError(f"{path}: {key}: {message}")


@functools.lru_cache(maxsize=1)
def _manifest_validator():
    """The schema's validator, built once per process (compare and the harness verify many bundles)."""
    import json

    from jsonschema import Draft202012Validator, validators

    # JSON Schema counts 512.0 as an integer; the runtime allocates from these values, so an integer is an int here.
    types = Draft202012Validator.TYPE_CHECKER.redefine(
        "integer", lambda _, value: isinstance(value, int) and not isinstance(value, bool))
    return validators.extend(Draft202012Validator, type_checker=types)(json.loads(SCHEMA_FILE.read_text()))


def _check_consistency(m: dict, path: Path) -> None:
    """What the schema cannot say: the values agree with each other and with the model's own config, and what the
    runtime allocates from them fits this machine's memory."""
    cfg, spec, tok = m["model"]["config"], m["export_spec"], m["tokenizer"]

    def refuse(key: str, why: str):
        raise InputError(f"{path}: {key}: {why}")

    if m["runtime"] != TARGET_RUNTIMES[m["target"]] or spec["target"] != m["runtime"]:
        refuse("runtime", f"{m['runtime']!r} (export_spec.target {spec['target']!r}) does not run target "
                          f"{m['target']!r}")
    layers = cfg["num_hidden_layers"]
    for key in ("intermediate_size", "layer_types", "activation_sparsity_pattern"):
        if len(cfg[key]) != layers:
            refuse(f"model.config.{key}", f"{len(cfg[key])} entries for {layers} layers")
    if cfg["num_attention_heads"] % cfg["num_key_value_heads"]:
        refuse("model.config.num_key_value_heads", "does not divide num_attention_heads")
    if not 0 <= cfg["num_kv_shared_layers"] < layers:
        refuse("model.config.num_kv_shared_layers", f"{cfg['num_kv_shared_layers']} of {layers} layers")
    if spec["cache_len"] > cfg["max_position_embeddings"]:
        refuse("export_spec.cache_len", f"{spec['cache_len']} exceeds the model's max_position_embeddings "
                                        f"{cfg['max_position_embeddings']}")
    if max(spec["prefill_lengths"]) > spec["cache_len"]:
        refuse("export_spec.prefill_lengths", f"{spec['prefill_lengths']} do not fit a cache of {spec['cache_len']}")
    vocab = cfg["vocab_size"]
    if tok["vocab_size"] > vocab:
        refuse("tokenizer.vocab_size", f"{tok['vocab_size']} exceeds the model's vocab_size {vocab}")
    # (Not the golden prompt's ids: a whole model's prompt may hold media ids beyond the text vocabulary.)
    for key, ids in (("tokenizer.bos_id", [tok["bos_id"]]), ("tokenizer.stop_ids", tok["stop_ids"]),
                     ("golden.greedy_tokens", m["golden"]["greedy_tokens"])):
        if max(ids) >= vocab:
            refuse(key, f"id {max(ids)} is outside the vocabulary of {vocab}")
    if "encoders" in m and m["encoders"]["image_sizes"] != spec["image_sizes"] and "vision" in spec["components"]:
        refuse("encoders.image_sizes", "differs from export_spec.image_sizes")
    if set(spec["components"]) - {"decoder"} and "encoders" not in m:
        refuse("encoders", f"missing for components {spec['components']}")
    # The KV cache the runtimes allocate (float32 at most): bounded by the machine, before any allocation.
    owners = layers - cfg["num_kv_shared_layers"]
    cache_bytes = 2 * owners * cfg["num_key_value_heads"] * spec["cache_len"] * cfg["head_dim"] * 4
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if cache_bytes > memory // 2:
        refuse("export_spec.cache_len", f"a KV cache of {spec['cache_len']} positions takes "
                                        f"{cache_bytes / 2**30:.1f} GiB, more than half of this machine's "
                                        f"{memory / 2**30:.1f} GiB")


def bundle_digest(bundle: Path) -> str:
    """sha256 of manifest.json: the manifest lists every file of the bundle with its sha256 (verify_bundle refuses a
    file it does not list), so this one digest names the whole bundle."""
    return sha256_of(Path(bundle) / MANIFEST)


def _listed_path(folder: Path, entry: dict, where: Path) -> Path:
    """A manifest entry's path: relative, inside `folder`, no '..' and no symlink on the way."""
    rel = entry["path"]
    parts = rel.split("/")
    if rel.startswith("/") or "\\" in rel or any(part in ("", ".", "..") for part in parts):
        raise InputError(f"{where}: files: {rel!r} is not a plain relative path inside the bundle")
    path = folder
    for part in parts:
        path = path / part
        if path.is_symlink():
            raise InputError(f"{path}: a symbolic link (a bundle holds plain files only)")
    return path


def verify_files(folder: Path, entries: list[dict], where: Path, complete: bool) -> None:
    """Every entry's file is there with its size and sha256; with complete=True, every file below `folder` (but
    the manifest and its signature) is listed, and nothing in it is a symbolic link."""
    folder = Path(folder)
    listed = set()
    for entry in entries:
        path = _listed_path(folder, entry, where)
        if entry["path"] in listed:
            raise InputError(f"{where}: files: {entry['path']!r} is listed twice")
        listed.add(entry["path"])
        if not path.is_file():
            raise InputError(f"{path}: listed in the manifest but missing")
        size = path.stat().st_size
        if size != entry["size"]:
            raise InputError(f"{path}: {size} bytes, the manifest says {entry['size']} (truncated or replaced)")
        if sha256_of(path) != entry["sha256"]:
            raise InputError(f"{path}: sha256 differs from the manifest (the file was modified)")
    if not complete:
        return
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = Path(root) / name
            if path.is_symlink():
                raise InputError(f"{path}: a symbolic link (a bundle holds plain files only)")
            rel = path.relative_to(folder).as_posix()
            if name in files and rel not in (MANIFEST, SIGNATURE_FILE) and rel not in listed:
                raise InputError(f"{path}: not listed in the manifest")


def verify_bundle(bundle: Path) -> dict:
    """Reads the manifest (read_manifest) and checks the folder against it (verify_files): returns the manifest."""
    bundle = Path(bundle)
    manifest = read_manifest(bundle)
    verify_files(bundle, manifest["files"], bundle / MANIFEST, complete=True)
    return manifest


def verify_reference(bundle: Path, manifest: dict) -> Path:
    """The bundle's float reference checkpoint (../reference) checked against the manifest's list; its folder."""
    reference = Path(bundle).parent / REFERENCE_DIR
    verify_files(reference, manifest["reference"]["files"], Path(bundle) / MANIFEST, complete=False)
    return reference


# --- the typed reading ---------------------------------------------------------------------------------------------


def _field(raw: dict, key: str, kind: type, where: Path, default=...):
    """raw's value at a dotted key, of `kind` (bools are not numbers); a missing or mistyped value is an InputError
    naming the file and the key."""
    value = raw
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            if default is not ...:
                return default
            raise InputError(f"{where}: missing key {key!r}")
        value = value[part]
    if isinstance(value, bool) and kind is not bool or not isinstance(value, kind):
        raise InputError(f"{where}: {key} is {value!r}, expected {kind.__name__}")
    return value


def _ints(raw: dict, key: str, where: Path, default=...) -> tuple[int, ...]:
    values = _field(raw, key, list, where, default)
    if any(isinstance(v, bool) or not isinstance(v, int) for v in values):
        raise InputError(f"{where}: {key} is {values!r}, expected a list of integers")
    return tuple(values)


@dataclass(frozen=True)
class BundleManifest:
    """What the runtime reads of a verified bundle's manifest, typed; `raw` keeps the whole JSON object."""

    folder: Path
    raw: dict
    target: str
    cache_len: int
    prefill_lengths: tuple[int, ...]
    components: tuple[str, ...]
    tokenizer_file: str
    bos_id: int
    stop_ids: tuple[int, ...]
    vocab_size: int
    ple_vocab_size: int | None
    encoders: dict  # the manifest's `encoders` entry; empty for a text-only bundle
    image_sizes: tuple[int, ...]  # the vision encoder's input sizes, the default first; () without one

    @classmethod
    def of(cls, folder: Path, raw: dict) -> "BundleManifest":
        where = Path(folder) / MANIFEST
        target = _field(raw, "target", str, where)
        if target not in TARGET_RUNTIMES:
            raise InputError(f"{where}: target {target!r} is not one of {', '.join(TARGET_RUNTIMES)}")
        manifest = cls(
            folder=Path(folder), raw=raw, target=target,
            cache_len=_field(raw, "export_spec.cache_len", int, where),
            prefill_lengths=_ints(raw, "export_spec.prefill_lengths", where),
            components=tuple(_field(raw, "export_spec.components", list, where, ["decoder"])),
            tokenizer_file=_field(raw, "tokenizer.file", str, where),
            bos_id=_field(raw, "tokenizer.bos_id", int, where),
            stop_ids=_ints(raw, "tokenizer.stop_ids", where),
            vocab_size=_field(raw, "model.config.vocab_size", int, where),
            ple_vocab_size=_field(raw, "model.config.vocab_size_per_layer_input", int, where, None),
            encoders=_field(raw, "encoders", dict, where, {}),
            image_sizes=(),
        )
        if "vision" in manifest.components:
            object.__setattr__(manifest, "image_sizes", _ints(raw, "export_spec.image_sizes", where))
        return manifest

    def file(self, name: str) -> Path:
        return self.folder / name

    @property
    def ptd(self) -> Path:
        """The .ptd that the manifest lists beside model.pte (executorch bundles)."""
        listed = [f["path"] for f in self.raw.get("files", []) if f["path"].endswith(".ptd")]
        if not listed:
            raise InputError(f"{self.folder / MANIFEST}: lists no .ptd file beside {PTE_FILE}")
        return self.folder / listed[0]

    @property
    def has_encoders(self) -> bool:
        return bool(set(self.components) & {"vision", "audio"})


def read_bundle(folder: str | Path) -> BundleManifest:
    """verify_bundle, then the typed reading."""
    return BundleManifest.of(Path(folder), verify_bundle(Path(folder)))
