"""Bundles built to compare (g3n compare without --bundle): one per quantization level and target, several at once."""

from __future__ import annotations

from pathlib import Path

# The vision encoder's sizes in the bundles g3n compare builds: the default size, at which the int8 encoders' bar
# (cosine >= 0.99) is set. Each further size is another lowering per bundle, and `make compare` has ~10 minutes.
COMPARE_IMAGE_SIZES = (768,)
# Longest lowering first, so that parallel builds end together: ExecuTorch's quantized lowerings take the longest.
_BUILD_COST = {("executorch", "int8"): 0, ("executorch", "int4"): 1, ("executorch", "none"): 2}


def build_for_comparison(checkpoint: Path | None, out: Path, builds: list[tuple[str, str]], tokenizer: Path | None,
                         cache_len: int, prefill_lengths: tuple[int, ...], source: str, jobs: int = 1,
                         progress=lambda message: None, image_sizes: tuple[int, ...] = COMPARE_IMAGE_SIZES) -> list[Path]:
    """One bundle per (quant level, target) under out/<level>-<target>/, each with its float reference beside it;
    returns the target folders in the order of `builds`. jobs > 1 builds in that many processes at once: conversion
    is mostly single-threaded Python, so on 2 cores two builds take about the time of one. image_sizes: the vision
    encoder's sizes in bundles of a whole model."""
    import os
    import shutil

    from exporters import memo

    # The levels of one target share their float conversions (LiteRT quantizes the converted graph): converted once
    # (exporters.memo), in a folder removed with the builds done.
    memo_folder, own_memo = os.environ.get(memo.ENV), memo.ENV not in os.environ
    if own_memo:
        memo_folder = os.environ[memo.ENV] = str(out / ".conversion-memo")
    try:
        return _build_all(checkpoint, out, builds, tokenizer, cache_len, prefill_lengths, source, jobs, progress,
                          image_sizes)
    finally:
        if own_memo:
            del os.environ[memo.ENV]
            shutil.rmtree(memo_folder, ignore_errors=True)


def _build_all(checkpoint, out, builds, tokenizer, cache_len, prefill_lengths, source, jobs, progress, image_sizes):
    order = sorted(builds, key=lambda b: _BUILD_COST.get((b[1], b[0]), 3))
    encoders = encoder_builds(builds)
    args = [(checkpoint, out / f"{level}-{target}", target, level, tokenizer, cache_len, prefill_lengths, source,
             tuple(image_sizes), encoders[(level, target)]) for level, target in order]
    if jobs <= 1:
        for a in args:
            progress(f"building the {a[3]} {a[2]} bundle")
            _build_one(*a)
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        progress(f"building {len(args)} bundles, {jobs} at a time")
        # spawn, not fork: a forked child of a process whose torch thread pools already ran can deadlock.
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            for future in [pool.submit(_build_one, *a) for a in args]:
                future.result()
    return [out / f"{level}-{target}" / target for level, target in builds]


def encoder_builds(builds: list[tuple[str, str]]) -> dict[tuple[str, str], bool]:
    """Per (quant level, target): whether its bundle carries the encoders. A level whose encoders take the scheme of
    an earlier level of the same target (int4's are int8's: runtime_py.bundle.ENCODER_QUANT_LEVELS) is built without
    them: the same lowering would be compared twice, at minutes of conversion each."""
    from runtime_py.bundle import ENCODER_QUANT_LEVELS, TARGETS

    seen, out = set(), {}
    for level, target in builds:
        key = (target, ENCODER_QUANT_LEVELS[level][TARGETS[target]])
        out[(level, target)] = key not in seen
        seen.add(key)
    return out


def _build_one(checkpoint, out, target, level, tokenizer, cache_len, prefill_lengths, source, image_sizes,
               encoders: bool = True) -> None:
    from models.checkpoint import load_pretrained
    from models.default import default_gemma3n
    from runtime_py.bundle import build_bundles

    # The whole model where there is one (the default; a Gemma3nForConditionalGeneration checkpoint): its bundles
    # carry the encoders, and the report compares them too.
    model = default_gemma3n() if checkpoint is None else load_pretrained(checkpoint)  # its dtype: build_bundles casts
    if not encoders:
        model = getattr(model, "language_model", model)
    # The converters' output goes beside the bundle: <level>-<target>.log in the report's bundles/ folder.
    build_bundles(model, out, [target], level, tokenizer, cache_len, prefill_lengths, {"name": source},
                  image_sizes=tuple(image_sizes), log=out.with_name(out.name + ".log"))
