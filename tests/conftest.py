"""Shared fixtures (tiny checkpoints that transformers itself writes from random init, every parameter randomised;
the embedded default model; the bundles every runtime test reads, each built once per session) and the CLI helpers
every test of a user error uses."""

from __future__ import annotations

from dataclasses import replace

import pytest

from runtime_py.bundle import build_bundles
from runtime_py.cli import main
from models.checkpoint import CAUSAL_LM, CONDITIONAL_GENERATION
from models.default import default_model
from models.config import E4B, TINY
from models.hf_reference import write_random_checkpoint

# E4B's layer structure (35 layers, 15 KV-shared, the 4:1 sliding/global pattern, sparsity on the first 10) at toy
# width, with FFN width a little above E2B's 8192 so that the e2b slice really cuts neurons.
E4B_SHAPED = replace(
    TINY,
    hidden_size=16,
    num_heads=2,
    num_kv_heads=1,
    head_dim=8,
    hidden_size_per_layer_input=4,
    laurel_rank=4,
    num_layers=E4B.num_layers,
    ffn_widths=(8192 + 64,) * E4B.num_layers,
    layer_types=E4B.layer_types,
    num_kv_shared_layers=E4B.num_kv_shared_layers,
    activation_sparsity=E4B.activation_sparsity,
)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny-causal"
    write_random_checkpoint(path, TINY, CAUSAL_LM, seed=0)
    return path


@pytest.fixture(scope="session")
def tiny_multimodal_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny-conditional"
    write_random_checkpoint(path, TINY, CONDITIONAL_GENERATION, seed=1)
    return path


@pytest.fixture(scope="session")
def e4b_shaped_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "e4b-shaped"
    write_random_checkpoint(path, E4B_SHAPED, CAUSAL_LM, seed=2)
    return path


# Bundle fixtures lower their targets two at a time, each in a process of its own (runtime_py.bundle.lower_targets).
JOBS = 2


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    """g3n in this process: (exit code, stdout, stderr)."""
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_error_line(code: int, err: str, *fragments: str) -> None:
    """A user error: exit 2 and exactly one `error:` line on stderr, naming each fragment, and no traceback."""
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (code, err)
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, err)


@pytest.fixture(scope="session")
def default_gemma3n():
    """The embedded default whole model (text decoder, vision and audio towers). Shared: tests must not change it
    (the exporters work on copies)."""
    from models.default import default_gemma3n as build

    return build()


@pytest.fixture(scope="session")
def default_bundles(tmp_path_factory):
    """Bundles of the embedded default model for every target, built once for the session (minutes): tests that
    change a bundle work on a copy."""
    return build_bundles(default_model(), tmp_path_factory.mktemp("b") / "out", ["android", "executorch", "ios"],
                         cache_len=96, prefill_lengths=(16,), make_zip=True, jobs=JOBS)


@pytest.fixture(scope="session")
def multimodal_bundles(tmp_path_factory, default_gemma3n):
    """Float bundles of the embedded default whole model (text decoder, vision and audio encoders) for android and
    executorch, at 256 px with a 512-position cache (an image and an audio window fit), built once (minutes)."""
    return build_bundles(default_gemma3n, tmp_path_factory.mktemp("mm") / "out", ["android", "executorch"],
                         cache_len=512, prefill_lengths=(64,), image_sizes=(256,), jobs=JOBS)
