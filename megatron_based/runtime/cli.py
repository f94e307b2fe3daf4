"""What every command-line parser shares: the help format (each option's default) and ``--verbose``. Imports neither
torch nor Megatron; each wing's ``cli`` module builds its tools' parsers on :func:`base_parser`."""
from __future__ import annotations

import argparse


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
