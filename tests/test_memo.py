"""exporters.memo: a conversion runs once per distinct input (weights, plain attributes, sample inputs, signature
names), a repeat is the same bytes as converting again, and with the memo off every call converts."""

from __future__ import annotations

import torch
from torch import nn

from exporters import litert
from exporters.memo import ENV, memoized


class Scaled(nn.Module):
    def __init__(self, scale: float):
        super().__init__()
        self.linear, self.scale = nn.Linear(8, 4), scale

    def forward(self, x):
        return {"y": self.linear(x) * self.scale}


def _signatures(module: nn.Module, name: str = "main", rows: int = 1):
    return [(name, module.eval(), {"x": torch.zeros(rows, 8)})]


def test_a_repeat_is_copied_and_any_change_converts_again(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV, str(tmp_path / "memo"))
    runs = []

    def convert(signatures):
        def write(path):
            runs.append(path.name)
            path.write_bytes(f"conversion {len(runs)}".encode())

        return write

    torch.manual_seed(0)
    module = Scaled(2.0)
    for i, (sigs, hit) in enumerate([
        (_signatures(module), False),
        (_signatures(module), True),  # the same module again
        (_signatures(Scaled(2.0)), False),  # other weights
        (_signatures(module, "other"), False),  # another signature name
        (_signatures(module, rows=2), False),  # another sample shape
    ]):
        before = len(runs)
        path = memoized(sigs, "v1", tmp_path / f"out{i}.bin", convert(sigs))
        assert (len(runs) == before) == hit, i
        assert path.read_bytes() == (b"conversion 1" if hit else f"conversion {len(runs)}".encode())
    module.scale = 3.0  # a plain attribute the forward reads
    memoized(_signatures(module), "v1", tmp_path / "scale.bin", convert(None))
    memoized(_signatures(module), "v2", tmp_path / "version.bin", convert(None))
    assert runs[-2:] == ["scale.bin", "version.bin"]

    monkeypatch.delenv(ENV)
    memoized(_signatures(module), "v2", tmp_path / "off.bin", convert(None))
    assert runs[-1] == "off.bin"


def test_a_memoized_litert_conversion_equals_a_fresh_one(tmp_path, monkeypatch):
    module = Scaled(0.5)
    monkeypatch.delenv(ENV, raising=False)  # the test session's memo
    fresh = litert.convert(_signatures(module), tmp_path / "fresh.tflite").read_bytes()
    monkeypatch.setenv(ENV, str(tmp_path / "memo"))
    first = litert.convert(_signatures(module), tmp_path / "first.tflite").read_bytes()
    copied = litert.convert(_signatures(module), tmp_path / "copied.tflite").read_bytes()
    assert fresh == first == copied
    assert len(list((tmp_path / "memo").glob("*.lock"))) == 1


def test_a_memoized_coreml_conversion_compresses_and_packs_as_a_fresh_one(tmp_path, monkeypatch):
    """A memo hit is a package loaded back from disk (no MIL program in memory): compressed and packed, it gives the
    bytes of a fresh conversion, and the first conversion into the memo does too."""
    from exporters import coreml
    from exporters.spec import ExportSpec

    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 64)).eval()
    spec = ExportSpec("coreml", quant="int8-per-channel")
    sample = (torch.zeros(1, 64),)

    def package(name: str) -> dict[str, bytes]:
        functions = {"decode": coreml.convert_module(module, sample, "y")}
        out = coreml.write_package(coreml.compress(functions, spec), tmp_path / name)
        return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}

    monkeypatch.delenv(ENV, raising=False)
    fresh = package("fresh")
    monkeypatch.setenv(ENV, str(tmp_path / "memo"))
    first, copied = package("first"), package("copied")
    assert fresh == first == copied
    assert len(list((tmp_path / "memo").glob("*.lock"))) == 1
    ops = coreml.op_counts(tmp_path / "copied" / coreml.PACKAGE_NAME)["decode"]
    assert sum(n for op, n in ops.items() if op.startswith("constexpr_")) == 2, ops  # both weights int8
