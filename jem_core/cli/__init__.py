"""`jem` command line: one sub-command module per feature, each with register(subparsers).

Errors the user can fix (JEMError) print one line and exit with status 2, never a traceback.
"""
from __future__ import annotations

import argparse
import sys

from .. import JEMError, __version__
from . import demo_cmd, label_cmd, map_cmd, science_cmd, train_cmd
from .common import silence_gdal_printing

COMMAND_MODULES = [train_cmd, map_cmd, science_cmd, label_cmd, demo_cmd]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jem", description="Joint Energy-based Models for Earth observation.")
    parser.add_argument("--version", action="version", version=f"jem-eo {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMAND_MODULES:
        module.register(subparsers)
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
