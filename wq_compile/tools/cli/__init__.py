"""Command-line entry points, one module per command (argument parsing only; the work lives in tuning, runtime and
the tools' benchmarks and evaluation). ``wq-tune``, ``wq-bench`` and ``wq-eval`` map to the ``main_*`` names here;
``python -m wq_compile.tools.cli`` is ``wq-tune``."""

from __future__ import annotations

from .wq_bench import bench_parser, main_bench
from .wq_eval import eval_parser, main_eval
from .wq_tune import format_table, main_tune, tune_parser

__all__ = ["bench_parser", "eval_parser", "format_table", "main_bench", "main_eval", "main_tune", "tune_parser"]
