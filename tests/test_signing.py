"""Signed bundles (OpenSSF model-signing, contract.signing): `g3n sign`, `g3n verify --key`, `--require-signature`.
A signed bundle verifies and runs; an unsigned one, one signed by another key, or one altered after signing (even
with its manifest rewritten to match, which the manifest's own check cannot see) is refused in one line."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from conftest import assert_one_error_line, run_cli

from contract.bundle import MANIFEST, REFERENCE_DIR, SIGNATURE_FILE
from contract.signing import mismatches


def _key_pair(folder: Path, name: str) -> tuple[Path, Path]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    private, public = folder / f"{name}.pem", folder / f"{name}.pub.pem"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                     serialization.PublicFormat.SubjectPublicKeyInfo))
    return private, public


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    folder = tmp_path_factory.mktemp("keys")
    return _key_pair(folder, "ours"), _key_pair(folder, "theirs")


@pytest.fixture
def bundle(default_bundles, tmp_path):
    """A copy of the default android bundle with its reference, unsigned."""
    for name in ("android", REFERENCE_DIR):
        shutil.copytree(default_bundles / name, tmp_path / name)
    return tmp_path / "android"


def _signed(capsys, bundle: Path, private: Path) -> Path:
    code, out, err = run_cli(capsys, "sign", "--bundle", bundle, "--key", private)
    assert code == 0, err
    assert (bundle / SIGNATURE_FILE).is_file() and f"signed {bundle / SIGNATURE_FILE}" in out
    return bundle


def test_a_signed_bundle_verifies_and_runs(capsys, bundle, keys):
    (private, public), _ = keys
    _signed(capsys, bundle, private)
    code, out, err = run_cli(capsys, "verify", "--bundle", bundle.parent, "--key", public)
    assert code == 0, err
    assert f"signature verified with {public}" in out
    code, out, err = run_cli(capsys, "generate", "--bundle", bundle, "--backend", "litertlm", "--require-signature",
                             public, "--max-new-tokens", "3", "Hello")
    assert code == 0, err
    assert out.strip()


def test_verify_without_key_says_whether_signed(capsys, bundle, keys):
    (private, _), _ = keys
    code, out, _ = run_cli(capsys, "verify", "--bundle", bundle)
    assert code == 0 and out.rstrip().split("; ")[0].endswith("unsigned")
    _signed(capsys, bundle, private)
    code, out, _ = run_cli(capsys, "verify", "--bundle", bundle)
    assert code == 0 and "signed (give --key to check the signature)" in out


def _rewrite_file_and_manifest(bundle: Path) -> str:
    """Changes the golden vectors and rewrites their manifest entry to match: the manifest's own check passes."""
    manifest = json.loads((bundle / MANIFEST).read_text())
    entry = next(f for f in manifest["files"] if f["path"].endswith("golden.safetensors"))
    path = bundle / entry["path"]
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    entry["sha256"] = hashlib.sha256(data).hexdigest()
    (bundle / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return entry["path"]


def test_an_altered_signed_bundle_is_refused(capsys, bundle, keys):
    (private, public), _ = keys
    _signed(capsys, bundle, private)
    changed = _rewrite_file_and_manifest(bundle)
    code, _, err = run_cli(capsys, "verify", "--bundle", bundle)  # the manifest alone cannot tell
    assert code == 0, err
    code, _, err = run_cli(capsys, "verify", "--bundle", bundle, "--key", public)
    # model_signing names the first mismatch it meets, in no fixed order: the file or the manifest rewritten with it
    assert_one_error_line(code, err, SIGNATURE_FILE, "Hash mismatch for '")
    assert f"'{changed}'" in err or "'manifest.json'" in err, err
    code, _, err = run_cli(capsys, "generate", "--bundle", bundle, "--backend", "litertlm", "--require-signature",
                           public, "Hello")
    assert_one_error_line(code, err, "does not verify", "Hash mismatch for '")
    assert f"'{changed}'" in err or "'manifest.json'" in err, err


def test_a_file_added_after_signing_is_refused(capsys, bundle, keys):
    (private, public), _ = keys
    _signed(capsys, bundle, private)
    manifest = json.loads((bundle / MANIFEST).read_text())
    (bundle / "extra.bin").write_bytes(b"x")
    manifest["files"].append({"path": "extra.bin", "size": 1, "sha256": hashlib.sha256(b"x").hexdigest()})
    (bundle / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    code, _, err = run_cli(capsys, "verify", "--bundle", bundle, "--key", public)
    assert_one_error_line(code, err, "extra.bin")


def test_unsigned_or_signed_by_another_key_is_refused(capsys, bundle, keys):
    (private, public), (_, other) = keys
    for argv in (["verify", "--bundle", bundle, "--key", public],
                 ["generate", "--bundle", bundle, "--backend", "litertlm", "--require-signature", public, "Hi"]):
        code, _, err = run_cli(capsys, *argv)
        assert_one_error_line(code, err, "unsigned bundle", str(bundle))
    _signed(capsys, bundle, private)
    code, _, err = run_cli(capsys, "verify", "--bundle", bundle, "--key", other)
    assert_one_error_line(code, err, SIGNATURE_FILE, str(other), "Key mismatch")


def test_bad_keys_are_refused_before_any_work(capsys, bundle, tmp_path):
    not_pem = tmp_path / "key.txt"
    not_pem.write_text("hello")
    for argv, fragments in (
        (["sign", "--bundle", bundle, "--key", tmp_path / "missing.pem"], ["--key", "missing.pem", "no such key"]),
        (["sign", "--bundle", bundle, "--key", not_pem], ["--key", "not a PEM key"]),
        (["verify", "--bundle", bundle, "--key", not_pem], ["--key", "not a PEM key"]),
        (["bundle", "--text-only", "--targets", "android", "--out", tmp_path / "new", "--sign", not_pem],
         ["--sign", "not a PEM key"]),
        (["sign", "--bundle", tmp_path, "--key", not_pem], ["--key", "not a PEM key"]),
    ):
        before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
        code, _, err = run_cli(capsys, *argv)
        assert_one_error_line(code, err, *fragments)
        assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    code, _, err = run_cli(capsys, "verify", "--bundle", tmp_path / "nothing-here")
    assert_one_error_line(code, err, "--bundle", "nothing-here", MANIFEST)


def test_a_mismatch_is_named_whatever_bytes_its_digests_hold():
    """model-signing reports a changed file inside a list's repr: when the digest's bytes hold both kinds of quote,
    every quote of that line comes backslash-escaped (seen in CI), and the file must still be named."""
    digest = repr(b"\x16'\"\xcd")
    for digests in (digest, repr(b"\x16\xcd")):
        diffs = [f"Hash mismatch for 'manifest.json': Expected 'Digest(digest_value={digests})', Actual '...'"]
        assert mismatches(f"Verification failed with error: {ValueError(diffs)}") == [
            "Hash mismatch for 'manifest.json'"]
