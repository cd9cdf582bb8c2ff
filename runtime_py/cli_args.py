"""The command line's argument parser: a bad flag or value is one `error:` line and exit 2, as every other user
error (argparse's own error prints the whole usage first), and the value types that refuse what a run cannot use."""

from __future__ import annotations

import argparse
import math


class Parser(argparse.ArgumentParser):
    """argparse.ArgumentParser whose errors are one line; subcommands' parsers are of this class too
    (add_subparsers makes its parsers of the parent's class)."""

    def error(self, message: str):
        self.exit(2, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not at least 1")
    return value


def non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number >= 0")
    return value


def probability(text: str) -> float:
    value = non_negative_float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not in (0, 1]")
    return value
