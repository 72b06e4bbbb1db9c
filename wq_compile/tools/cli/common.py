"""Argument types and exit handling shared by the three commands."""

from __future__ import annotations

import argparse
import os
import sys

from ...kernels.catalog import KERNEL_KINDS


def parse_bits(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated widths such as 2,4,8, got {text!r}") from None

def positive_int(text: str) -> int:
    """argparse type: an int >= 1 (argparse names the flag in its error)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value

def parse_kinds(text: str) -> tuple[str, ...]:
    kinds = tuple(x.strip() for x in text.split(",") if x.strip())
    if not kinds:
        raise argparse.ArgumentTypeError(f"expected at least one kernel kind among {','.join(KERNEL_KINDS)}, "
                                         f"got {text!r}")
    bad = [k for k in kinds if k not in KERNEL_KINDS]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown kernel kinds {bad}; expected some of {','.join(KERNEL_KINDS)}")
    return kinds

def fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)

#: Exit status of a run stopped by Ctrl-C (128 + SIGINT), as shells report it.
EXIT_INTERRUPTED = 130

def exit_on_sigint(signum: int, frame: object) -> None:
    """SIGINT during tuning: stop now with a message and status 130.

    A KeyboardInterrupt raised inside MetaSchedule's C++ callbacks and builder threads ends in a segfault (exit
    139); every measured record is already appended to the log (one line per candidate, a torn last line is
    repaired on the next run), so leaving at once loses nothing finished and the rerun resumes from the log.
    """
    print("\nwq-tune: interrupted (Ctrl-C); finished records are kept in the tuning logs, run the same command "
          "again to resume", file=sys.stderr, flush=True)
    os._exit(EXIT_INTERRUPTED)
