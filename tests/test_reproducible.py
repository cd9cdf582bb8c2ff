"""Reproducible across processes: `g3n bundle` of the embedded default whole model (text decoder, vision and audio
encoders; every target, as `make run` builds it) in two separate processes with different PYTHONHASHSEED gives the
same bytes in every file. Marked `long` (two builds of minutes each): `make long` runs it, in .ci/run."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from exporters import memo

pytestmark = pytest.mark.long


def _build(out: Path, seed: int) -> dict[str, str]:
    g3n = Path(sys.executable).with_name("g3n")
    env = {k: v for k, v in os.environ.items() if k != memo.ENV} | {"PYTHONHASHSEED": str(seed)}  # convert, not copy
    done = subprocess.run([str(g3n), "bundle", "--out", str(out)], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    return {p.relative_to(out).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out.rglob("*")) if p.is_file()}


def test_two_processes_build_the_same_bytes(tmp_path):
    first, second = _build(tmp_path / "first", 1), _build(tmp_path / "second", 2)
    assert first.keys() == second.keys()
    assert any(name.endswith("model.pte") for name in first) and any(name.endswith(".litertlm") for name in first)
    assert [name for name in first if first[name] != second[name]] == []
