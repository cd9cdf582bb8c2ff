"""Shared fixtures (tiny checkpoints that transformers itself writes from random init, every parameter randomised;
the embedded default model; the bundles every runtime test reads, each built once per session) and the CLI helpers
every test of a user error uses."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import pytest

from models.checkpoint import CAUSAL_LM, CONDITIONAL_GENERATION
from models.config import E4B, TINY
from models.default import default_model
from models.hf_reference import write_random_checkpoint
from runtime_py.bundle import build_bundles
from runtime_py.cli import main

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
    return shared_build(tmp_path_factory, "tiny-causal", lambda p: write_random_checkpoint(p, TINY, CAUSAL_LM, seed=0))


@pytest.fixture(scope="session")
def tiny_multimodal_checkpoint(tmp_path_factory):
    return shared_build(tmp_path_factory, "tiny-conditional",
                        lambda p: write_random_checkpoint(p, TINY, CONDITIONAL_GENERATION, seed=1))


@pytest.fixture(scope="session")
def e4b_shaped_checkpoint(tmp_path_factory):
    return shared_build(tmp_path_factory, "e4b-shaped",
                        lambda p: write_random_checkpoint(p, E4B_SHAPED, CAUSAL_LM, seed=2))


# Bundle fixtures lower their targets two at a time, each in a process of its own (runtime_py.bundle.lower_targets).
JOBS = 2


def _shared_root(tmp_path_factory) -> Path:
    """The run's temporary folder: the controller's, which is each pytest-xdist worker's parent."""
    root = tmp_path_factory.getbasetemp()
    return root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root


def shared_build(tmp_path_factory, name: str, build) -> Path:
    """`build(path)` run once for the whole test run, whichever pytest-xdist worker asks first; the others wait for
    it and reuse the result (the pytest-xdist recipe for session fixtures: a lock file in the run's shared temp
    folder). Without xdist it is a plain session-wide build."""
    from filelock import FileLock

    path = _shared_root(tmp_path_factory) / "shared" / name
    path.parent.mkdir(exist_ok=True)
    with FileLock(str(path) + ".lock"):
        if not path.exists():
            build(path)
    return path


# The converters' output of the shared builds goes to <name>.log beside each (it would otherwise reach the terminal
# when the controller builds them).
def _default_bundles(path: Path, jobs: int = JOBS) -> Path:
    return build_bundles(default_model(), path, ["android", "executorch", "ios"], cache_len=96, prefill_lengths=(16,),
                         make_zip=True, jobs=jobs, log=path.with_name(path.name + ".log"))


def _multimodal_bundles(path: Path, jobs: int = JOBS) -> Path:
    from models.default import default_gemma3n

    return build_bundles(default_gemma3n(), path, ["android", "executorch", "ios"], cache_len=512,
                         prefill_lengths=(64,), image_sizes=(256,), jobs=jobs, log=path.with_name(path.name + ".log"))


SHARED_BUNDLES = {"default-bundles": _default_bundles, "multimodal-bundles": _multimodal_bundles}


_PREBUILDS = pytest.StashKey[list]()
_MEMO = pytest.StashKey[str]()


def pytest_configure(config):
    """One conversion memo for the run (exporters.memo), set before the workers and the bundle builds' processes
    start so that all of them inherit it: the same graph (the default model's encoders, its decoder at one spec) is
    converted once, whichever test or bundle needs it first. Tests of the conversion itself (test_reproducible, the
    bench's timed exports) turn it off for their processes."""
    import tempfile

    from exporters import memo

    if not hasattr(config, "workerinput") and memo.ENV not in os.environ:
        config.stash[_MEMO] = os.environ[memo.ENV] = tempfile.mkdtemp(prefix="g3n-conversion-memo-")


def pytest_unconfigure(config):
    import shutil

    from exporters import memo

    folder = config.stash.get(_MEMO, None)
    if folder:
        os.environ.pop(memo.ENV, None)
        shutil.rmtree(folder, ignore_errors=True)


def pytest_sessionstart(session):
    """A whole-suite run under pytest-xdist starts the two shared bundle sets in the controller, side by side, in
    the background: the workers begin with the files that need neither (SLOW_FIRST), and a test that needs one
    waits on its lock only if it is still being built."""
    config = session.config
    whole_suite = not config.option.file_or_dir and not config.option.keyword and not config.option.markexpr
    if (hasattr(config, "workerinput") or not whole_suite or config.option.collectonly
            or not getattr(config.option, "numprocesses", None)):
        return
    from concurrent.futures import ThreadPoolExecutor

    # The run's temporary folder made here, once: two threads making it at once would each number a folder of their
    # own, and one bundle set would be built where the workers never look (and built again by a worker).
    config._tmp_path_factory.getbasetemp()

    def build_alone(build):  # one lowering process each, beside the two workers
        return lambda path: build(path, jobs=1)

    pool = ThreadPoolExecutor(len(SHARED_BUNDLES))
    config.stash[_PREBUILDS] = [pool.submit(shared_build, config._tmp_path_factory, name, build_alone(build))
                                for name, build in SHARED_BUNDLES.items()]
    pool.shutdown(wait=False)


def pytest_sessionfinish(session):
    # Waits for the background builds, so that none outlives the run; a failed one needs no report here: the test
    # that needed it built it again itself, and failed in its own report.
    for future in session.config.stash.get(_PREBUILDS, []):
        future.exception()


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
    return shared_build(tmp_path_factory, "default-bundles", _default_bundles)


@pytest.fixture(scope="session")
def multimodal_bundles(tmp_path_factory):
    """Float bundles of the embedded default whole model (text decoder, vision and audio encoders) for android,
    executorch and ios, at 256 px with a 512-position cache (an image and an audio window fit), built once (minutes)."""
    return shared_build(tmp_path_factory, "multimodal-bundles", _multimodal_bundles)


# The files whose conversions take minutes start first, so that no worker is left with one of them at the end; the
# first ones need no shared bundle, so the workers convert while the controller builds those (pytest_sessionstart).
SLOW_FIRST = ("test_export_litert_encoders.py", "test_export_executorch.py", "test_export_coreml_encoders.py",
              "test_export_coreml.py", "test_vision.py", "test_export_litert.py", "test_compare.py", "test_bundle.py",
              "test_export_executorch_encoders.py", "test_multimodal_runtime.py", "test_harness.py")
# Quick files that need both shared bundle sets: last, when both are built, so that no worker idles on their locks.
SHARED_LAST = ("test_signing.py", "test_fuzz.py", "test_bad_inputs.py")


def pytest_addoption(parser):
    parser.addoption("--long", action="store_true", help="run the tests marked long (make long; minutes each)")


def pytest_collection_modifyitems(config, items):
    if not config.getoption("--long"):
        long = [item for item in items if item.get_closest_marker("long")]
        if long:
            config.hook.pytest_deselected(items=long)
            items[:] = [item for item in items if not item.get_closest_marker("long")]
    rank = {name: i for i, name in enumerate(SLOW_FIRST)} | {name: len(SLOW_FIRST) + 1 + i
                                                              for i, name in enumerate(SHARED_LAST)}
    items.sort(key=lambda item: rank.get(Path(str(item.fspath)).name, len(SLOW_FIRST)))
