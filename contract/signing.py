"""Signed bundles: OpenSSF model-signing (https://github.com/sigstore/model-transparency) over a target folder.

`sign_bundle` writes <target>/bundle.sig, a Sigstore bundle whose in-toto statement lists every file of the folder
with its digest (manifest.json included, and through it the reference checkpoint's sha256s); `verify_signature`
checks it against a public key and refuses a folder with a file changed, added or removed since signing.

model-signing runs as its own command (`model_signing`, from a virtual environment of its own: `make install`
puts one in .venv-sign): its dependencies (sigstore-models needs typing-extensions >= 4.14.1) cannot be installed
beside litert-converter's (xdsl 0.28 pins typing-extensions < 4.13). Keys are PEM elliptic-curve keys
(`openssl ecparam -name prime256v1 -genkey -noout -out key.pem; openssl ec -in key.pem -pubout -out pub.pem`).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from contract.bundle import SIGNATURE_FILE
from models.errors import InputError

TOOL_ENV = "G3N_MODEL_SIGNING"  # the `model_signing` command, where it is not beside this Python's


def signing_tool() -> str:
    """The model_signing command: $G3N_MODEL_SIGNING, else beside this interpreter (make install links it into
    .venv/bin), else on PATH."""
    candidates = [os.environ.get(TOOL_ENV), str(Path(sys.executable).with_name("model_signing")),
                  shutil.which("model_signing")]
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK) and Path(candidate).is_file():
            return candidate
    raise InputError(f"signing needs OpenSSF model-signing's `model_signing` command: `make install` puts it in "
                     f".venv-sign, or set {TOOL_ENV} to its path")


def _key(path: Path, flag: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{flag}: {path}: no such key file")
    if b"-----BEGIN " not in path.read_bytes()[:4096]:
        raise InputError(f"{flag}: {path}: not a PEM key")
    return path.resolve()


def check_private_key(path: Path, flag: str) -> Path:
    """The private key's path, refused early (before minutes of lowering) if it is not a PEM file."""
    return _key(path, flag)


def _run(argv: list[str]) -> tuple[bool, str]:
    done = subprocess.run(argv, capture_output=True, text=True, env=dict(os.environ, MODEL_SIGNING_LOG_LEVEL="ERROR"))
    lines = [line.strip() for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    return done.returncode == 0 and not any("failed" in line.lower() for line in lines), (lines or ["no output"])[-1]


def sign_bundle(folder: Path, private_key: Path) -> Path:
    """Signs every file of a target folder with a private key (check_private_key first); writes folder/bundle.sig
    (replacing an older one only once the new one is made). Returns the signature's path."""
    folder, key = Path(folder), Path(private_key).resolve()
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=f".{folder.name}.sign-") as tmp:
        signature = Path(tmp) / SIGNATURE_FILE
        ok, last = _run([signing_tool(), "sign", "key", str(folder), "--private_key", str(key),
                         "--signature", str(signature), "--ignore-paths", str(folder / SIGNATURE_FILE)])
        if not ok or not signature.is_file():
            raise InputError(f"{folder}: signing with {private_key} failed: {last}")
        os.replace(signature, folder / SIGNATURE_FILE)
    return folder / SIGNATURE_FILE


def is_signed(folder: Path) -> bool:
    return (Path(folder) / SIGNATURE_FILE).is_file()


def verify_signature(folder: Path, public_key: Path, flag: str = "--key") -> None:
    """The folder's bundle.sig verifies with `public_key` and lists exactly the folder's files; else one InputError
    (unsigned, signed by another key, a file changed, added or removed)."""
    folder, key = Path(folder), _key(public_key, flag)
    if not is_signed(folder):
        raise InputError(f"{folder}: unsigned bundle (no {SIGNATURE_FILE}); sign it with `g3n sign`")
    ok, last = _run([signing_tool(), "verify", "key", str(folder), "--public_key", str(key),
                     "--signature", str(folder / SIGNATURE_FILE)])
    if not ok:
        what = mismatches(last)
        raise InputError(f"{folder / SIGNATURE_FILE}: does not verify with {public_key}: "
                         f"{'; '.join(what) if what else last[:300]}")


def mismatches(message: str) -> list[str]:
    """The files named by model-signing's verification message, whose digests come as Python bytes: what a reader
    needs. The message is a list's repr, so a line whose digest bytes hold both kinds of quote has its quotes
    backslash-escaped."""
    unescaped = re.sub(r"\\+'", "'", message)
    return re.findall(r"(Hash mismatch for '[^']*'|Extra files found in model '[^']*': [^\]\"]*"
                      r"|Missing files[^\]\"]*)", unescaped)
