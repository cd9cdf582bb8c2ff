"""Reproducible across processes: `g3n bundle` of the embedded default whole model (text decoder, vision and audio
encoders; every target) in two separate processes with different PYTHONHASHSEED gives the same bytes in every file.
Marked `long` (minutes of conversion): `make long` runs it, in .ci/run.

The first build keeps the run's conversion memo (exporters.memo), the second converts every graph itself. The
bundles take `g3n compare`'s spec (cache 96, prefill 16, 768 px), so that in .ci/run, where `make compare` runs first
and lowers each target of these bundles in a fresh process of its own, the first build copies those conversions and
the test compares two processes' conversions at the cost of one. Run alone, both builds convert."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from exporters import memo

pytestmark = pytest.mark.long

# As `g3n compare` builds its bundles (its --cache-len and --prefill-lengths defaults, COMPARE_IMAGE_SIZES).
COMPARE_SPEC = ("--cache-len", "96", "--prefill-lengths", "16", "--image-sizes", "768")


def _build(out: Path, seed: int, memoized: bool) -> dict[str, str]:
    g3n = Path(sys.executable).with_name("g3n")
    env = {k: v for k, v in os.environ.items() if memoized or k != memo.ENV} | {"PYTHONHASHSEED": str(seed)}
    done = subprocess.run([str(g3n), "bundle", "--out", str(out), *COMPARE_SPEC], env=env, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    return {p.relative_to(out).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out.rglob("*")) if p.is_file()}


def test_two_processes_build_the_same_bytes(tmp_path):
    first, second = _build(tmp_path / "first", 1, memoized=True), _build(tmp_path / "second", 2, memoized=False)
    assert first.keys() == second.keys()
    assert any(name.endswith("model.pte") for name in first) and any(name.endswith(".litertlm") for name in first)
    assert [name for name in first if first[name] != second[name]] == []
