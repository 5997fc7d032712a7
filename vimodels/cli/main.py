"""The ``vimodels`` command.

User mistakes (unknown names, bad values, unwritable folders) print one line
and exit with status 2; genuine bugs keep their traceback. Subcommands live
in small modules that each add a parser with ``register(subparsers)``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from vimodels.cli import basic, calibrate, compare, sweep, vae
from vimodels.cli.options import EXIT_USAGE, Parser
from vimodels.errors import VimodelsError

COMMAND_MODULES = (basic, compare, vae, sweep, calibrate)


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser with every subcommand registered."""
    parser = Parser(prog="vimodels", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for module in COMMAND_MODULES:
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``vimodels`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except VimodelsError as exc:
        print(f"vimodels: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("vimodels: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
