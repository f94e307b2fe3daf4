"""The console scripts (``[project.scripts]``), importing neither torch nor Megatron.

Each answers ``--help`` here, from its wing's parser, before the tool's module (torch, Megatron) is imported, and
first filters the third-party warnings we know to be harmless (:func:`~.runtime.noise.quiet_known_warnings`;
``--verbose`` keeps them). A top-level module: it may import every wing.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Callable, Sequence

from .inference.cli import convert_parser, eval_parser, generate_parser
from .runtime.noise import quiet_known_warnings
from .tasks.cli import mqar_parser
from .training.cli import preprocess_parser, train_parser


def _entry(target: str, parser: Callable[[], argparse.ArgumentParser]) -> Callable[..., int]:
    """``target``: ``"module"`` (its ``main``) or ``"module:function"``, under ``megatron_based``."""
    module, _, function = target.partition(":")
    function = function or "main"

    def main(argv: Sequence[str] | None = None) -> int:
        argv = list(sys.argv[1:] if argv is None else argv)
        quiet_known_warnings("--verbose" in argv)
        if "-h" in argv or "--help" in argv:
            parser().print_help()
            return 0
        return getattr(importlib.import_module(f"megatron_based.{module}"), function)(argv)

    main.__doc__ = f"megatron_based.{module}.{function}, with --help answered before importing it."
    return main


train = _entry("training.loop", train_parser)
preprocess = _entry("training.data", preprocess_parser)
generate = _entry("inference.generation", generate_parser)
convert = _entry("inference.cli:convert_main", convert_parser)
evaluate = _entry("inference.evaluate", eval_parser)
mqar = _entry("tasks.mqar", mqar_parser)
