"""Bundle manifests: what a bundle holds, and the check that it still holds exactly that.

manifest.json lists every file with its size and sha256; `verify_bundle` refuses a bundle whose files were changed,
truncated or removed, naming the file, and a manifest of an unknown schema version.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from models.errors import InputError
from models.fileio import read_json_object

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"


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


def read_manifest(bundle: Path) -> dict:
    path = Path(bundle) / MANIFEST
    manifest = read_json_object(Path(bundle), MANIFEST, "bundle", "not a gemma3n-mobile bundle")
    version = manifest.get("schema_version") if isinstance(manifest, dict) else None
    if version != SCHEMA_VERSION:
        raise InputError(f"{path}: schema_version {version!r} is not supported (this runtime reads {SCHEMA_VERSION})")
    return manifest


def verify_bundle(bundle: Path) -> dict:
    """Reads the manifest and checks every listed file's size and sha256; returns the manifest."""
    bundle = Path(bundle)
    manifest = read_manifest(bundle)
    for entry in manifest.get("files", []):
        path = bundle / entry["path"]
        if not path.is_file():
            raise InputError(f"{path}: listed in the manifest but missing")
        size = path.stat().st_size
        if size != entry["size"]:
            raise InputError(f"{path}: {size} bytes, the manifest says {entry['size']} (truncated or replaced)")
        if sha256_of(path) != entry["sha256"]:
            raise InputError(f"{path}: sha256 differs from the manifest (the file was modified)")
    return manifest
