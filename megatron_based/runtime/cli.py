"""What every command-line parser shares: the help format (each option's default), ``--verbose``, and the checks of
options naming files and sizes (:func:`bad_option`). Imports neither torch nor Megatron; each wing's ``cli`` module
builds its tools' parsers on :func:`base_parser`."""
from __future__ import annotations

import argparse
import os
import sys


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, except where there is none (None, an off switch, an empty list) and for the
    ``--no-X`` switches (store_false: their default True would read as the switch being on)."""

    def _get_help_string(self, action):
        if (action.default is None or action.default is False or action.default == []
                or isinstance(action, argparse._StoreFalseAction)):
            return action.help
        return super()._get_help_string(action)


def base_parser(prog: str, description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=description, formatter_class=_HelpFormatter)
    p.add_argument("--verbose", action="store_true",
                   help="show the third-party warnings hidden by default (TransformerEngine / Apex fallbacks, "
                        "Megatron deprecations)")
    return p


def fail(parser: argparse.ArgumentParser, message) -> int:
    """A tool's one-line error: ``prog: error: message`` on stderr (argparse's error line without its usage block);
    returns the exit code, 2."""
    print(f"{parser.prog}: error: {message}", file=sys.stderr)
    return 2


def bad_option(args: argparse.Namespace, *, files=(), paths=(), outputs=(), positive=(),
               tensor_parallel: bool = False) -> str | None:
    """The first bad option of parsed ``args`` as a one-line message naming it, or None; for the tools to check
    before they start a process group or build anything. ``files``: options (by ``dest``) naming files that must
    exist; ``paths``: files or directories; ``outputs``: files to write at the end, whose directory must exist now
    (a result is not lost after the work); ``positive``: numbers that must be >= 1; ``tensor_parallel``:
    ``--tensor-model-parallel-size`` must divide the processes launched (``WORLD_SIZE``). Options left unset (None)
    pass."""
    def flag(dest: str) -> str:
        return "--" + dest.replace("_", "-")

    for dest in positive:
        value = getattr(args, dest)
        if value is not None and value < 1:
            return f"{flag(dest)} must be >= 1, got {value}"
    for dest in (*files, *paths):
        value = getattr(args, dest)
        if value is None:
            continue
        if not os.path.exists(value):
            return f"{flag(dest)} {value} does not exist"
        if dest in files and not os.path.isfile(value):
            return f"{flag(dest)} {value} is not a file"
    for dest in outputs:
        value = getattr(args, dest)
        folder = os.path.dirname(os.path.abspath(value)) if value is not None else None
        if folder is not None and not os.path.isdir(folder):
            return f"{flag(dest)} {value}: its folder {folder} does not exist; create it first"
    if tensor_parallel:
        tp, world = args.tensor_model_parallel_size, int(os.environ.get("WORLD_SIZE", "1"))
        if world % tp:
            return (f"--tensor-model-parallel-size {tp} needs a multiple of {tp} processes, this launch has {world}: "
                    f"run it under torchrun --nproc-per-node {tp}")
    return None
