"""`jem` command line: one sub-command module per feature, each with register(subparsers).

Errors the user can fix (JEMError) print one line and exit with status 2, never a traceback.
"""
from __future__ import annotations

import argparse
import copy
import sys

from .. import JEMError, __version__
from . import demo_cmd, label_cmd, map_cmd, science_cmd, train_cmd
from .common import silence_gdal_printing

COMMAND_MODULES = [train_cmd, map_cmd, science_cmd, label_cmd, demo_cmd]


def shows_default(action: argparse.Action) -> bool:
    """An option whose --help must name its default: it has one (not None) and takes a value."""
    return bool(action.option_strings) and action.nargs != 0 and action.default not in (None, argparse.SUPPRESS)


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """--help appends "(default: X)" to every option with a default, unless its text already names one."""

    def _format_action(self, action: argparse.Action) -> str:
        if shows_default(action) and not action.help:  # argparse prints no help line at all for these
            action = copy.copy(action)
            action.help = "(default: %(default)s)"
        return super()._format_action(action)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if shows_default(action) and "default" not in text:
            text += " (default: %(default)s)"
        return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jem", description="Joint Energy-based Models for Earth observation.")
    parser.add_argument("--version", action="version", version=f"jem-eo {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMAND_MODULES:
        module.register(subparsers)
    for subparser in subparsers.choices.values():  # every command, whoever registered it
        subparser.formatter_class = DefaultsHelpFormatter
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    silence_gdal_printing()
    try:
        return int(args.run(args) or 0)
    except JEMError as error:
        print(f"jem {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"jem {args.command}: interrupted; no output was written.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
