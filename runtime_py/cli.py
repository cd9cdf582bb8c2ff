"""g3n: the one command line of gemma3n-mobile.

Every user error (bad path, corrupt file, bad flag value, out-of-range id) ends with one `error:` line on stderr and
exit code 2; nothing prints a traceback unless G3N_DEBUG=1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from runtime_py.cli_args import Parser, non_negative_float, positive_int, probability


def _add_model_source(p: argparse.ArgumentParser, presets: bool = False) -> None:
    p.add_argument("--checkpoint", type=Path, help="Hugging Face Gemma 3n checkpoint directory (default: the embedded tiny model)")
    if presets:
        p.add_argument("--preset", choices=["e2b", "e4b", "tiny"], help="count a published configuration without weights")


def _add_matformer_config(p: argparse.ArgumentParser) -> None:
    p.add_argument("--matformer-config", type=Path, metavar="CSV",
                   help="MatFormer Lab's slicing table (columns name, # Layers, FFN Hidden Dims, Layers Skipped)")
    p.add_argument("--slice-name", help="the table's row to slice, e.g. 'Config for E2.49B (block-level)'")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="g3n", description="Gemma 3n checkpoints to phone bundles.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("info", help="model summary and parameter accounting, or a bundle's manifest summary")
    _add_model_source(p, presets=True)
    p.add_argument("--bundle", type=Path, help="summarise a bundle's manifest (and verify its files)")
    p.add_argument("--json", action="store_true", help="print JSON instead of Markdown")

    p = sub.add_parser("sign", help="sign a bundle with OpenSSF model-signing (writes bundle.sig in each target folder)")
    p.add_argument("--bundle", type=Path, required=True, help="a target folder (out/android) or g3n bundle's --out")
    p.add_argument("--key", type=Path, required=True, help="private key, PEM (elliptic curve)")

    p = sub.add_parser("verify", help="check a bundle: its manifest, every file's sha256 and, with --key, its signature")
    p.add_argument("--bundle", type=Path, required=True, help="a target folder (out/android) or g3n bundle's --out")
    p.add_argument("--key", type=Path, help="public key, PEM: the bundle must be signed by its private key")

    p = sub.add_parser("slice", help="MatFormer: write a nested sub-model as a Hugging Face checkpoint")
    p.add_argument("--checkpoint", type=Path, required=True, help="source checkpoint directory")
    p.add_argument("--out", type=Path, required=True, help="new checkpoint directory (must not exist)")
    p.add_argument("--preset", choices=["e2b"], help="the published E2B slice of an E4B checkpoint")
    p.add_argument("--ffn-widths", help="one FFN width for all kept layers, or one per kept layer: W1,W2,...")
    p.add_argument("--skip-layers", help="layers to drop: i,j,...")
    _add_matformer_config(p)

    p = sub.add_parser("random-checkpoint", help="write a checkpoint laid out as the published Gemma 3n (config, bf16 "
                                                 "shards, index, tokenizer, chat template) with random weights")
    p.add_argument("--preset", choices=["e2b", "e4b", "tiny"], required=True,
                   help="e2b, e4b: the published shapes (5.4B / 7.8B parameters, with the full-size encoders); tiny: "
                        "the embedded model's shapes")
    p.add_argument("--out", type=Path, required=True, help="new checkpoint directory (must not exist)")
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("generate", help="generate from a bundle on a backend, or from token ids with the PyTorch model")
    p.add_argument("prompt", nargs="?", help="prompt text (wrapped in the Gemma chat template)")
    p.add_argument("--bundle", type=Path, help="a bundle folder written by g3n bundle (e.g. out/android)")
    p.add_argument("--backend", default="torch", help="torch, litert, litertlm, executorch, coreml (macOS) or "
                   "coreml-mil (an ios bundle's MIL programs run op by op: Core ML's numerics anywhere, not its speed)")
    _add_model_source(p)
    p.add_argument("--image", type=Path, action="append", default=[],
                   help="an image file for the prompt (repeatable; images come first in the user turn, in order)")
    p.add_argument("--video", type=Path, action="append", default=[],
                   help="a folder of video frames (image files, taken in name order; each frame is laid out as an "
                        "image; repeatable)")
    p.add_argument("--audio", type=Path, action="append", default=[],
                   help="a WAV/FLAC file for the prompt (repeatable; clips over 30 s take one span per 30 s window)")
    p.add_argument("--image-size", type=int, help="the vision encoder's input size (default: the bundle's first)")
    p.add_argument("--require-signature", type=Path, metavar="PUBLIC_KEY",
                   help="run the bundle only if its bundle.sig verifies with this public key (PEM)")
    p.add_argument("--token-ids", help="prompt token ids instead of text: 2,105,... (greedy; with --bundle, on its "
                                       "--backend; else the PyTorch model of --checkpoint or the default)")
    p.add_argument("--max-new-tokens", type=positive_int, default=32)
    p.add_argument("--cache-len", type=positive_int, default=256, help="static KV-cache length (without --bundle)")
    p.add_argument("--temperature", type=non_negative_float, default=0.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=probability, default=1.0)
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("bundle", help="write app-ready bundles (android, ios, executorch) with manifests")
    _add_model_source(p)
    p.add_argument("--targets", default="android,ios,executorch", help="comma-separated: android, ios, executorch")
    p.add_argument("--quant", default="none", help="none, int8 or int4 (each target's weight scheme; see README)")
    p.add_argument("--slice", choices=["e2b"], help="MatFormer: bundle the E2B slice of an E4B checkpoint")
    p.add_argument("--ffn-widths", help="MatFormer Mix-n-Match: FFN width(s) of the kept layers")
    p.add_argument("--skip-layers", help="MatFormer Mix-n-Match: layers to drop")
    _add_matformer_config(p)
    p.add_argument("--tokenizer", type=Path, help="tokenizer.model or tokenizer.json (default: the checkpoint's, "
                                                  "else the tiny model's)")
    p.add_argument("--cache-len", type=int, help="static KV-cache length (default: 256 for a text-only model, 1024 "
                                                 "or the model's maximum positions if smaller for a whole model)")
    p.add_argument("--prefill-lengths", default="32")
    p.add_argument("--image-sizes", default="768", help="vision encoder input sizes: 256, 512, 768 (comma-separated; "
                                                       "the first is the default)")
    p.add_argument("--text-only", action="store_true", help="bundle the language model alone (no encoders)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--zip", action="store_true", help="also write <target>.zip beside each folder")
    p.add_argument("--sign", type=Path, metavar="PRIVATE_KEY",
                   help="sign each target folder with this PEM key (OpenSSF model-signing: bundle.sig)")
    p.add_argument("--jobs", type=int, help="targets lowered at once, one process each (default: 2 on a machine "
                                            "with 2+ cores for models under 1B parameters, else 1)")
    p.add_argument("--log", type=Path, help="file for the converters' output (default: <out>.log beside --out)")

    p = sub.add_parser("export", help="lower the model (language model, and a whole model's vision and audio "
                                      "encoders) to one target (LiteRT, ExecuTorch or Core ML)")
    _add_model_source(p)
    p.add_argument("--target", required=True, choices=["litert", "executorch", "coreml"])
    p.add_argument("--quant", default="none", help="quantization scheme of the target (see README)")
    p.add_argument("--encoder-quant", default="none", help="the encoders' scheme: litert none, int8-weight-only, "
                                                           "int8-dynamic; executorch none, int8-weight-only, 8da8w; "
                                                           "coreml none, int8-per-channel")
    p.add_argument("--image-sizes", default="768", help="vision encoder input sizes: 256, 512, 768 (comma-separated; "
                                                       "the first is the default)")
    p.add_argument("--text-only", action="store_true", help="lower the language model alone (no encoders)")
    p.add_argument("--out", type=Path, required=True, help="output directory (must not exist)")
    p.add_argument("--cache-len", type=int, help="static KV-cache length (default: as g3n bundle)")
    p.add_argument("--prefill-lengths", default="32", help="fixed prefill lengths: T1,T2,...")
    p.add_argument("--ple-storage", default="int8", help="PLE table storage: int8, int4, fp16, bf16 or fp32")
    p.add_argument("--full-prefill", action="store_true",
                   help="run KV-shared layers on every prompt position (unoptimised; for comparison)")
    p.add_argument("--log", type=Path, help="file for the converters' output (default: <out>.log beside --out)")
    p.add_argument("--verbose", action="store_true", help="the converters' output on the terminal, not in --log")

    p = sub.add_parser("parity", help="our model against transformers on the same weights (max |delta logit|)")
    p.add_argument("--checkpoint", type=Path, help="checkpoint to compare on (default: a random tiny one)")
    p.add_argument("--prompt-len", type=int, default=24)
    p.add_argument("--steps", type=int, default=20, help="cached decode steps")
    p.add_argument("--multimodal", action="store_true",
                   help="per component: audio features and encoder, vision tower, and logits of a prompt with an "
                        "image and audio (default checkpoint: a random tiny Gemma3nForConditionalGeneration)")

    p = sub.add_parser("compare", help="numerics report: every backend and quantization against the float PyTorch model")
    _add_model_source(p)
    p.add_argument("--bundle", type=Path, action="append",
                   help="a bundle folder to compare (repeatable; instead of building from --checkpoint)")
    p.add_argument("--targets", default="android,executorch,ios",
                   help="without --bundle: bundle targets to build and compare (android, executorch, ios)")
    p.add_argument("--quant", default="none,int8,int4", help="without --bundle: quantization levels to build: none, int8, int4")
    p.add_argument("--cache-len", type=int, default=96, help="without --bundle: the bundles' KV-cache length")
    p.add_argument("--prefill-lengths", default="16", help="without --bundle: the bundles' prefill lengths")
    p.add_argument("--jobs", type=int, default=1, help="without --bundle: bundles built at once, one process each "
                                                       "(each needs the memory of one conversion)")
    p.add_argument("--report", type=Path, required=True,
                   help="report folder (must not exist): report.json, report.md, plot.png (and bundles/, debug/)")
    p.add_argument("--thresholds", type=Path, help="limits per backend/quant, component and metric "
                                                   "(default: ci/thresholds.json)")
    p.add_argument("--prompt", help="prompt text, sent as one chat turn (default: the bundles' golden prompt)")
    p.add_argument("--steps", type=int, default=16, help="decode steps compared after the prefill")
    p.add_argument("--localise", choices=["breach", "always", "never"],
                   help="when to find the first divergent layer with a debug export (default: for failing rows; "
                        "never under the real-size limits, where the float model is dropped before the backends run)")
    p.add_argument("--write-thresholds", type=Path,
                   help="measure only (no limits checked) and write limits derived from this run to this file")
    p = sub.add_parser("bench", help="speed against the field, side by side in one run: every row a ratio against "
                                     "its reference (bench.json, bench.md, bench.png)")
    p.add_argument("--checkpoint", type=Path, help="a Gemma 3n text checkpoint with tokenizer.model (default: --preset)")
    p.add_argument("--preset", default="scaled-e2b", help="the random model to write and measure: scaled-e2b (the "
                                                          "speed issue's 280M E2B-shaped model) or tiny")
    p.add_argument("--report", type=Path, required=True, help="report folder (must not exist)")
    p.add_argument("--work", type=Path, help="checkpoints and exports, kept and reused by later runs (default: "
                                             "a temporary folder)")
    p.add_argument("--only", help="comma-separated rows: litertlm, ttft, kv-shared, roofline, transformers, slice, "
                                  "ple, vision, audio (default: all)")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds after the warm-up round")
    p.add_argument("--threads", type=int, default=2, help="threads of every contender")
    p.add_argument("--quick", action="store_true", help="tiny shapes, one round: seconds per row (the tests run it)")
    from runtime_py.harness.cli import add_parsers as add_harness_parsers

    add_harness_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help, or a bad flag (its one line is printed: cli_args.Parser)
        return e.code
    import signal

    from models.errors import G3nError

    def terminate(signum, frame):
        raise Terminated

    # SIGTERM unwinds like Ctrl-C, so temporary folders are removed and lowering workers stopped on the way out.
    previous = signal.signal(signal.SIGTERM, terminate) if argv is None else None

    try:
        return COMMANDS[args.command](args) or 0
    except G3nError as e:  # one line, whatever a message quotes from the input
        print("error: " + " ".join(str(e).splitlines()), file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader went away (`g3n info | head`): not an error of ours
        sys.stdout = open(os.devnull, "w")
        return 0
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print("error: terminated (SIGTERM); nothing was written", file=sys.stderr)
        return 143
    except Exception as e:  # an internal failure still gets one line; G3N_DEBUG=1 shows where
        if os.environ.get("G3N_DEBUG"):
            raise
        print(f"error: internal failure: {type(e).__name__}: {e} (rerun with G3N_DEBUG=1 for details)", file=sys.stderr)
        return 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


class Terminated(BaseException):
    """SIGTERM, raised where the main thread is (a BaseException, as KeyboardInterrupt: no `except Exception`
    swallows it)."""


def _load(args):
    from models import load_text_decoder
    from models.default import default_model

    if args.checkpoint is None:
        return default_model(), "embedded default (tiny preset, deterministic weights)"
    return load_text_decoder(args.checkpoint, dtype=_float32()), str(args.checkpoint)


def _load_whole(args):
    """The model to lower: a whole Gemma3n (the embedded default, or a Gemma3nForConditionalGeneration checkpoint)
    or a TextDecoder (a Gemma3nForCausalLM checkpoint, or --text-only), in the checkpoint's own dtype (the exporters
    cast a part at a time: a bf16 E2B is 22 GB in float32)."""
    from models import load_pretrained
    from models.default import default_gemma3n
    from models.multimodal import Gemma3n

    if args.checkpoint is None:
        from runtime_py.bundle import checkpoint_config

        model, source = default_gemma3n(), "embedded default (tiny preset, deterministic weights)"
        model.hf_config = checkpoint_config(model)  # what its reference/ (or a sliced copy) is saved with
    else:
        model, source = load_pretrained(args.checkpoint), str(args.checkpoint)
    if args.text_only and isinstance(model, Gemma3n):
        model = model.language_model
    return model, source


def _image_sizes(text: str) -> tuple[int, ...]:
    from models.matformer import parse_int_list

    return tuple(parse_int_list(text, "--image-sizes"))


def _float32():
    import torch

    return torch.float32


def cmd_info(args) -> int:
    from models.accounting import count_checkpoint, count_config
    from models.config import PRESETS, TextConfig, read_hf_config

    if args.bundle:
        return _bundle_info(args)

    if args.checkpoint and args.preset:
        from models.errors import InputError

        raise InputError("give --checkpoint or --preset, not both")
    if args.checkpoint:
        cfg = TextConfig.from_hf_dict(read_hf_config(args.checkpoint))
        counts, source = count_checkpoint(args.checkpoint), str(args.checkpoint)
        slice_info = read_hf_config(args.checkpoint).get("matformer_slice")
    else:
        name = args.preset or "tiny"
        cfg, source, slice_info = PRESETS[name], f"preset {name}", None
        counts = count_config(cfg, multimodal=name != "tiny")
        if name == "tiny":
            source = "embedded default (tiny preset: every Gemma 3n feature at toy size; counts: the text decoder)"
    summary = {
        "source": source,
        "layers": cfg.num_layers,
        "hidden_size": cfg.hidden_size,
        "ffn_widths": sorted(set(cfg.ffn_widths)),
        "kv_shared_layers": cfg.num_kv_shared_layers,
        "sliding_window": cfg.sliding_window,
        "vocab_size": cfg.vocab_size,
        "matformer_slice": slice_info,
        "parameters": counts.as_dict(),
    }
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"# {source}\n")
    print(
        f"{cfg.num_layers} layers ({cfg.layer_types.count('full_attention')} global, "
        f"{cfg.num_kv_shared_layers} KV-shared), hidden {cfg.hidden_size}, FFN widths "
        f"{min(cfg.ffn_widths)}..{max(cfg.ffn_widths)}, vocab {cfg.vocab_size}, sliding window {cfg.sliding_window}"
    )
    if slice_info:
        print(f"MatFormer slice: {json.dumps(slice_info)}")
    print()
    print(counts.markdown())
    return 0


def _bundle_info(args) -> int:
    from contract.bundle import bundle_digest, verify_bundle

    m = verify_bundle(args.bundle)
    digest = bundle_digest(args.bundle)
    if args.json:
        print(json.dumps({k: m[k] for k in ("target", "runtime", "model", "quantization", "export_spec", "tokenizer",
                                            "files")} | {"bundle_digest": digest}, indent=2))
        return 0
    cfg, p = m["model"]["config"], m["model"]["parameters"]
    print(f"# {args.bundle}: {m['target']} bundle ({m['runtime']}), schema {m['schema_version']}, files verified\n")
    print(f"bundle digest (sha256 of manifest.json, which lists every file's sha256): {digest}")
    print(f"model: {m['model']['source']}; {cfg['num_hidden_layers']} layers, hidden {cfg['hidden_size']}, "
          f"vocab {cfg['vocab_size']}, {p['total']:,} parameters; MatFormer slice: {m['model']['matformer_slice']}")
    print(f"quantization: {m['quantization']['level']} ({m['quantization']['scheme']}); cache {m['export_spec']['cache_len']}, "
          f"prefill lengths {m['export_spec']['prefill_lengths']}")
    print(f"tokenizer: {m['tokenizer']['file']} ({m['tokenizer']['vocab_size']} pieces), bos {m['tokenizer']['bos_id']}, "
          f"stop {m['tokenizer']['stop_ids']}")
    print(f"golden: {len(m['golden']['prompt_ids'])} prompt tokens -> {m['golden']['greedy_tokens']}\n")
    print("| file | bytes | sha256 |\n| --- | ---: | --- |")
    for f in m["files"]:
        print(f"| {f['path']} | {f['size']:,} | {f['sha256'][:16]}... |")
    return 0


def _target_folders(path: Path) -> list[Path]:
    """A bundle folder itself, or the target folders inside g3n bundle's --out."""
    from contract.bundle import MANIFEST, TARGET_RUNTIMES
    from models.errors import InputError

    if (path / MANIFEST).is_file():
        return [path]
    folders = [path / t for t in TARGET_RUNTIMES if (path / t / MANIFEST).is_file()]
    if not folders:
        raise InputError(f"--bundle {path}: no {MANIFEST} in it or in its {', '.join(TARGET_RUNTIMES)} folders")
    return folders


def cmd_sign(args) -> int:
    from contract.bundle import verify_bundle
    from contract.signing import check_private_key, sign_bundle

    check_private_key(args.key, "--key")
    folders = _target_folders(args.bundle)
    for folder in folders:  # every file checked against its manifest before it is signed
        verify_bundle(folder)
    for folder in folders:
        print(f"signed {sign_bundle(folder, args.key)}")
    return 0


def cmd_verify(args) -> int:
    from contract.bundle import bundle_digest, verify_bundle, verify_reference
    from contract.signing import is_signed, verify_signature

    for folder in _target_folders(args.bundle):
        manifest = verify_bundle(folder)
        verify_reference(folder, manifest)
        if args.key is not None:
            verify_signature(folder, args.key)
            signature = f"signature verified with {args.key}"
        else:
            signature = "signed (give --key to check the signature)" if is_signed(folder) else "unsigned"
        print(f"{folder}: {manifest['target']} bundle, files and reference verified, {signature}; "
              f"digest {bundle_digest(folder)}")
    return 0


def _slice_plan(args, preset_flag: str) -> tuple[list[int] | None, list[int], str | None] | None:
    """(ffn widths, skipped layers, preset) asked for by one of: the preset flag (--preset / --slice), --ffn-widths
    and/or --skip-layers, or --matformer-config with --slice-name; None when no slice is asked for."""
    from models.errors import InputError
    from models.matformer import parse_int_list, read_matformer_config

    preset = getattr(args, preset_flag.lstrip("-"))
    if (args.matformer_config is None) != (args.slice_name is None):
        raise InputError("give --matformer-config and --slice-name together")
    ways = [preset_flag] * bool(preset) + ["--ffn-widths/--skip-layers"] * bool(args.ffn_widths or args.skip_layers)
    ways += ["--matformer-config"] * (args.matformer_config is not None)
    if len(ways) > 1:
        raise InputError(f"give one of {', '.join(ways)}, not several")
    if args.matformer_config is not None:
        widths, skip = read_matformer_config(args.matformer_config, args.slice_name)
        return widths, skip, None
    if not ways:
        return None
    widths = parse_int_list(args.ffn_widths, "--ffn-widths") if args.ffn_widths else None
    skip = parse_int_list(args.skip_layers, "--skip-layers") if args.skip_layers else []
    return widths, skip, preset


def cmd_slice(args) -> int:
    from models.errors import InputError
    from models.matformer import slice_checkpoint

    plan = _slice_plan(args, "--preset")
    if plan is None:
        raise InputError("say what to slice: --preset e2b, --ffn-widths and/or --skip-layers, or "
                         "--matformer-config with --slice-name")
    widths, skip, preset = plan
    from rich.progress import Progress

    with Progress(transient=True) as progress:
        task = progress.add_task("slicing tensors", total=None)
        cfg = slice_checkpoint(
            args.checkpoint, args.out, widths, skip, preset, name=args.slice_name,
            progress=lambda done, total: progress.update(task, completed=done, total=total),
        )
    print(f"wrote {args.out}: {cfg.num_layers} layers, FFN widths {list(cfg.ffn_widths)}, "
          f"{cfg.num_kv_shared_layers} KV-shared")
    return 0


def cmd_random_checkpoint(args) -> int:
    import shutil

    from rich.progress import Progress

    from models.checkpoint import CONDITIONAL_GENERATION
    from models.config import PRESETS
    from models.errors import InputError
    from models.fileio import check_new_directory
    from models.hf_reference import hf_config, published_config, write_random_streamed
    from models.random_init import widened_tokenizer
    from runtime_py.components.chat_template import JINJA

    check_new_directory(args.out)
    text = PRESETS[args.preset]
    config = hf_config(text, CONDITIONAL_GENERATION) if args.preset == "tiny" else published_config(text)
    need = text.vocab_size * text.hidden_size * 2 + 2 * 10**9 * (args.preset != "tiny")  # rough floor, bf16
    free = shutil.disk_usage(args.out.resolve().parent).free
    if free < need:
        raise InputError(f"--out: {args.out.resolve().parent} has {free / 2**30:.1f} GiB free; the checkpoint needs "
                         f"more than {need / 2**30:.1f} GiB")
    files = {"tokenizer.model": widened_tokenizer(text.vocab_size, config.to_dict()),
             "chat_template.jinja": JINJA.encode()}
    with Progress(transient=True) as progress:
        task = progress.add_task("writing random tensors", total=None)
        count = write_random_streamed(args.out, config, args.seed, files,
                                      lambda done, total: progress.update(task, completed=done, total=total))
    print(f"wrote {args.out}: Gemma3nForConditionalGeneration, {count / 1e9:.2f}B parameters, bf16")
    return 0


def cmd_generate(args) -> int:
    from models.errors import InputError

    if args.token_ids is not None:
        return _generate_token_ids(args)
    if args.bundle is None:
        raise InputError("give --bundle DIR and a prompt (or --token-ids for the PyTorch model)")
    if args.prompt is None:
        raise InputError("empty prompt: give the prompt text after the options")
    try:
        args.prompt.encode("utf-8")
    except UnicodeEncodeError:  # bytes the terminal passed that are not UTF-8 (Python keeps them as surrogates)
        raise InputError("prompt: not valid UTF-8 text") from None
    import resource

    from runtime_py.engine import open_bundle

    images = [str(p) for p in args.image] + [_video_frames(d) for d in args.video]
    audio = [str(p) for p in args.audio]
    media = {"images": images, "audio": audio, "image_size": args.image_size} if images or audio else {}
    session = open_bundle(args.bundle, args.backend, public_key=args.require_signature)
    if media and not getattr(session, "accepts_media", False):  # litertlm on a bundle without encoders
        from runtime_py.session import NO_ENCODERS

        raise InputError(f"{args.bundle}: {NO_ENCODERS}")
    for piece in session.generate(args.prompt, args.max_new_tokens, temperature=args.temperature,
                                  top_k=args.top_k, top_p=args.top_p, seed=args.seed, **media):
        print(piece, end="", flush=True)
    print()
    if session.notice:
        print(session.notice, file=sys.stderr)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"[{args.backend}] {session.timing.line(peak_mb)}", file=sys.stderr)
    return 0


def _video_frames(folder: Path) -> list[str]:
    from models.errors import InputError

    if not folder.is_dir():
        raise InputError(f"--video {folder}: not a folder of frames (give a folder of image files)")
    frames = sorted(str(p) for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    if not frames:
        raise InputError(f"--video {folder}: the folder holds no frames")
    return frames


def _generate_token_ids(args) -> int:
    """Greedy ids from a bundle's backend, or from the PyTorch model, through the same Session as every bundle (no
    stop tokens: exactly --max-new-tokens ids, fewer only when the cache fills)."""
    from models.errors import InputError
    from models.matformer import parse_int_list
    from runtime_py.components.tokenizer import checkpoint_tokenizer
    from runtime_py.engine import session_for_model

    ids = parse_int_list(args.token_ids, "--token-ids")
    if args.bundle is not None:
        from runtime_py.engine import open_bundle

        if args.checkpoint is not None:
            raise InputError("--token-ids: give --bundle or --checkpoint, not both")
        session = open_bundle(args.bundle, args.backend, public_key=args.require_signature)
        source = f"{args.bundle} ({args.backend})"
        if not hasattr(session, "generate_ids"):
            raise InputError(f"--token-ids: the {args.backend} backend takes text only (Google's engine tokenizes "
                             f"by itself); use another backend of the bundle")
    elif args.backend != "torch":
        raise InputError(f"--backend {args.backend}: needs --bundle (without one, --token-ids runs the PyTorch model)")
    else:
        model, source = _load(args)
        session = session_for_model(model, checkpoint_tokenizer(args.checkpoint), cache_len=args.cache_len)
    session.stop_ids = []
    tokens = list(session.generate_ids(ids, max_new_tokens=args.max_new_tokens))
    print(json.dumps({"model": source, "prompt": ids, "greedy_tokens": tokens}))
    return 0


def cmd_bundle(args) -> int:
    import tempfile

    from contract.bundle import MANIFEST
    from models import TextDecoder, load_pretrained, save_pretrained
    from models.matformer import parse_int_list, slice_checkpoint
    from runtime_py.bundle import build_bundles
    from runtime_py.components.tokenizer import checkpoint_tokenizer

    plan = _slice_plan(args, "--slice")
    model, source = _load_whole(args)
    info = {"name": source}
    tokenizer = args.tokenizer or checkpoint_tokenizer(args.checkpoint)
    if plan is not None:
        widths, skip, preset = plan
        with tempfile.TemporaryDirectory() as tmp:
            src = args.checkpoint
            if src is None:
                src = Path(tmp) / "source"
                save_pretrained(model, src)
            slice_checkpoint(src, Path(tmp) / "sliced", widths, skip, preset, name=args.slice_name)
            model = load_pretrained(Path(tmp) / "sliced")
            info["matformer_slice"] = model.hf_config["matformer_slice"]
            if args.text_only and not isinstance(model, TextDecoder):
                model = model.language_model
    targets = [t for t in args.targets.split(",") if t]
    jobs = _bundle_jobs(args.jobs, model)
    log = args.log or args.out.with_name(args.out.name + ".log")
    if log.exists():
        log.unlink()
    started = time.monotonic()

    # The opening line waits for build_bundles' first step: a flag it refuses gets its one error line alone.
    opening = [f"bundling {source} for {', '.join(targets)} ({args.quant}); converter logs: {log}"]

    def progress(message: str) -> None:
        for line in opening + [message]:
            print(f"[{time.monotonic() - started:6.1f} s] {line}", file=sys.stderr, flush=True)
        opening.clear()

    out = build_bundles(
        model, args.out, targets, args.quant, tokenizer, args.cache_len,
        tuple(parse_int_list(args.prefill_lengths, "--prefill-lengths")), info, args.zip,
        progress=progress, image_sizes=_image_sizes(args.image_sizes), jobs=jobs, log=log, sign=args.sign,
    )
    for target in targets:
        manifest = json.loads((out / target / MANIFEST).read_text())
        size = sum(f["size"] for f in manifest["files"])
        encoders = manifest.get("encoders")
        with_encoders = (f"; encoders {', '.join(encoders['components'])} at {encoders['image_sizes']} px "
                         f"({encoders['quantization']['scheme']})" if encoders else "")
        print(f"{out / target}: {len(manifest['files'])} files, {size:,} bytes ({manifest['quantization']['scheme']}"
              f"{with_encoders}; cache {manifest['export_spec']['cache_len']})")
    return 0


def _bundle_jobs(jobs: int | None, model) -> int:
    """--jobs, or by default two lowerings at once where the machine has the cores and the model is small enough for
    two conversions to fit beside each other (under a billion parameters)."""
    from models.errors import InputError

    if jobs is not None:
        if jobs < 1:
            raise InputError(f"--jobs: expected a positive number of processes, got {jobs}")
        return jobs
    parameters = sum(p.numel() for p in model.parameters())
    return min(2, os.cpu_count() or 1) if parameters < 1_000_000_000 else 1


def cmd_export(args) -> int:
    from rich.console import Console

    from exporters import export
    from exporters.spec import EXPORT_RECORD, ExportSpec
    from models.errors import G3nError
    from models.matformer import parse_int_list
    from models.multimodal import Gemma3n
    from runtime_py.bundle import default_cache_len, output_to

    model, source = _load_whole(args)
    whole = isinstance(model, Gemma3n)
    spec = ExportSpec(
        target=args.target,
        cache_len=default_cache_len(model) if args.cache_len is None else args.cache_len,
        prefill_lengths=tuple(parse_int_list(args.prefill_lengths, "--prefill-lengths")),
        quant=args.quant,
        ple_storage=args.ple_storage,
        kv_shared_prefill=not args.full_prefill,
        components=("decoder", "vision", "audio") if whole else ("decoder",),
        image_sizes=_image_sizes(args.image_sizes),
        encoder_quant=args.encoder_quant if whole else "none",
    )
    kwargs = {}
    if args.target == "litert":  # the .litertlm carries the tokenizer
        from runtime_py.components.tokenizer import checkpoint_tokenizer

        kwargs["tokenizer_path"] = checkpoint_tokenizer(args.checkpoint, sentencepiece_only=True)
    log = None if args.verbose else args.log or args.out.with_name(args.out.name + ".log")
    if log is not None and log.exists():
        log.unlink()
    try:
        with output_to(log) as terminal, Console(file=terminal).status(
                f"lowering {source} to {args.target} ({args.quant})" + (f"; converter logs: {log}" if log else "")):
            out = export(model, spec, args.out, **kwargs)
    except G3nError:  # a refused input leaves nothing behind
        if log is not None:
            log.unlink(missing_ok=True)
        raise
    manifest = json.loads((out / EXPORT_RECORD).read_text())
    for name, size in manifest["files"].items():
        print(f"{size:>12,}  {out / name}")
    return 0


def _multimodal_parity(checkpoint: Path, steps: int) -> int:
    from models.checkpoint import CONDITIONAL_GENERATION, layout_of
    from models.config import read_hf_config
    from models.errors import InputError
    from models.parity import compare_multimodal_with_transformers

    if layout_of(read_hf_config(checkpoint)) != CONDITIONAL_GENERATION:
        raise InputError(f"{checkpoint}: --multimodal needs a Gemma3nForConditionalGeneration checkpoint")
    report = compare_multimodal_with_transformers(checkpoint, steps)
    print(json.dumps(report, indent=2))
    print()
    print("| component | reference | max abs error | output scale (max abs) |")
    print("| --- | --- | ---: | ---: |")
    rows = [("audio features (log-mel)", "Gemma3nAudioFeatureExtractor", "audio_features"),
            ("audio encoder", "transformers' Gemma3nAudioEncoder", "audio_encoder"),
            ("vision tower (768 px)", "timm's mobilenetv5_300m_enc in transformers", "vision_tower"),
            (f"logits, prefill ({report['prompt_tokens']} tokens: text, an image, an audio clip)",
             "Gemma3nForConditionalGeneration", "prefill_logits")]
    for name, reference, key in rows:
        print(f"| {name} | {reference} | {report[key]['max_abs_error']:.3g} | {report[key]['scale']:.3g} |")
    print(f"| logits, {steps} cached decode steps (greedy tokens equal: {report['greedy_tokens_equal']}) | "
          f"Gemma3nForConditionalGeneration | {report['decode_logits']['max_abs_error']:.3g} | |")
    return 0


def cmd_parity(args) -> int:
    import tempfile

    from models.parity import compare_with_transformers

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = args.checkpoint
        if checkpoint is None:
            from models.checkpoint import CAUSAL_LM, CONDITIONAL_GENERATION
            from models.hf_reference import write_random_checkpoint

            checkpoint = Path(tmp) / "tiny"
            write_random_checkpoint(checkpoint, layout=CONDITIONAL_GENERATION if args.multimodal else CAUSAL_LM)
        if args.multimodal:
            return _multimodal_parity(checkpoint, args.steps)
        report = compare_with_transformers(checkpoint, args.prompt_len, args.steps)
    print(json.dumps(report, indent=2))
    print()
    print("| check | max abs logit error | greedy tokens equal |")
    print("| --- | ---: | --- |")
    print(f"| prefill ({args.prompt_len} tokens) | {report['prefill_max_abs_error']:.3g} | |")
    print(f"| decode ({args.steps} cached steps) | {report['decode_max_abs_error']:.3g} | "
          f"{report['greedy_tokens_equal']} |")
    return 0


def cmd_compare(args) -> int:
    from rich.console import Console

    from models.errors import InputError
    from models.fileio import atomic_directory
    from models.matformer import parse_int_list
    from runtime_py import compare
    from runtime_py.bundle import GOLDEN_PROMPT, QUANT_LEVELS, TARGETS
    from runtime_py.components.tokenizer import checkpoint_tokenizer

    if args.bundle and args.checkpoint:
        raise InputError("give --bundle DIR ... or --checkpoint DIR, not both")
    if args.steps < 1:
        raise InputError(f"--steps: expected a positive number of decode steps, got {args.steps}")
    if args.jobs < 1:
        raise InputError(f"--jobs: expected a positive number of processes, got {args.jobs}")
    prompt = GOLDEN_PROMPT if args.prompt is None else args.prompt
    if not prompt.strip():
        raise InputError("--prompt: empty prompt")
    if args.write_thresholds is not None:
        if args.write_thresholds.exists():
            raise InputError(f"--write-thresholds: {args.write_thresholds} already exists")
        thresholds = {"path": "(none: measuring for --write-thresholds)", "comment": "", "cells": {}}
    elif args.thresholds:
        thresholds = compare.load_thresholds(args.thresholds)
    else:  # a comparison of real-size bundles is held to the limits measured at real size
        from contract.bundle import read_manifest

        thresholds = compare.load_thresholds(compare.default_thresholds([read_manifest(b) for b in args.bundle or []]))
    # A real-size model's reference and a backend do not both fit in memory (E2B: 15-19 GB and up to 14 GB), and a
    # debug export needs the reference: under the real-size limits nothing is localised unless asked for.
    real_size = Path(thresholds["path"]).resolve() == compare.REAL_SCALE_THRESHOLDS.resolve()
    localise = args.localise or ("never" if real_size else "breach")
    targets = [t for t in args.targets.split(",") if t]
    levels = [q for q in args.quant.split(",") if q]
    if not args.bundle:
        bad = [t for t in targets if t not in TARGETS] or [q for q in levels if q not in QUANT_LEVELS]
        if bad or not targets or not levels:
            raise InputError(f"--targets/--quant: unknown value {bad[0] if bad else '(none)'} "
                             f"(targets: {', '.join(TARGETS)}; levels: {', '.join(QUANT_LEVELS)})")
        prefill_lengths = tuple(parse_int_list(args.prefill_lengths, "--prefill-lengths"))
    console = Console(stderr=True)
    with atomic_directory(args.report) as tmp, console.status("comparing") as status:
        def progress(message):
            status.update(f"comparing: {message}")

        job = compare.Comparison(bundles=list(args.bundle or []), thresholds=thresholds, prompt=prompt,
                                 steps=args.steps, localise=localise, debug_dir=tmp / "debug", progress=progress,
                                 enforce=args.write_thresholds is None)
        if not args.bundle:
            job.source = str(args.checkpoint) if args.checkpoint else _load(args)[1]
            tokenizer = checkpoint_tokenizer(args.checkpoint, sentencepiece_only=True)
            builds, job.skipped = compare.plan_builds(targets, levels)
            if job.enforce:  # before minutes of conversion
                compare.check_cells_present([f"{backend}/{level}" for level, target in builds
                                             for backend in compare.TARGET_BACKENDS[target]], thresholds)
            job.bundles = compare.build_for_comparison(args.checkpoint, tmp / "bundles", builds, tokenizer,
                                                       args.cache_len, prefill_lengths, job.source, args.jobs, progress)
        report = compare.run_comparison(job)
        report = compare.renamed_paths(report, str(tmp), str(args.report))
        compare.write_report(report, tmp)
    print(compare.markdown(report), end="")
    if args.write_thresholds is not None:
        limits = compare.thresholds_from_report(report, compare.CALIBRATION_COMMENT)
        args.write_thresholds.write_text(json.dumps(limits, indent=2) + "\n")
        print(f"wrote {args.write_thresholds}", file=sys.stderr)
    if not report["passed"]:
        for breach in report["breaches"]:
            print(f"threshold exceeded: {breach}", file=sys.stderr)
        print(f"(limits: {thresholds['path']}; report: {args.report})", file=sys.stderr)
        return 1
    return 0


def cmd_bench(args) -> int:
    import tempfile

    from rich.console import Console

    from models.errors import InputError
    from models.fileio import atomic_directory, check_new_directory
    from runtime_py import bench
    from runtime_py.bench.report import write
    from runtime_py.bench.subjects import PRESETS

    if args.preset not in PRESETS:
        raise InputError(f"--preset: unknown preset {args.preset!r} ({', '.join(PRESETS)})")
    if args.checkpoint is not None and not (args.checkpoint / "config.json").is_file():
        raise InputError(f"--checkpoint: {args.checkpoint / 'config.json'} not found")
    check_new_directory(args.report)
    only = tuple(r for r in (args.only or ",".join(bench.ROWS)).split(",") if r)
    console = Console(stderr=True)
    with tempfile.TemporaryDirectory(prefix="g3n-bench-") as scratch, atomic_directory(args.report) as tmp, \
            console.status("bench") as status:
        def progress(message):
            console.log(message)
            status.update(f"bench: {message}")

        options = bench.Options(report=tmp, work=args.work or Path(scratch), preset=args.preset,
                                checkpoint=args.checkpoint, only=only, repeats=1 if args.quick else args.repeats,
                                threads=args.threads, quick=args.quick, progress=progress)
        md = write(bench.run(options), tmp)
    print(md, end="")
    return 0


def cmd_harness(args) -> int:
    from runtime_py.harness.cli import run

    return run(args)


COMMANDS = {
    "info": cmd_info,
    "sign": cmd_sign,
    "verify": cmd_verify,
    "slice": cmd_slice,
    "random-checkpoint": cmd_random_checkpoint,
    "generate": cmd_generate,
    "export": cmd_export,
    "bundle": cmd_bundle,
    "parity": cmd_parity,
    "harness": cmd_harness,
    "compare": cmd_compare,
    "bench": cmd_bench,
}

if __name__ == "__main__":
    sys.exit(main())
