"""The ``vimodels`` command.

User mistakes (unknown names, bad values, unwritable folders) print one line
and exit with status 2; genuine bugs keep their traceback. Subcommands live
in small modules that each add a parser with ``register(subparsers)``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from vimodels.errors import VimodelsError

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, no usage dump
        self.exit(EXIT_USAGE, f"vimodels: error: {message}\n")


def parse_options(pairs: Sequence[str] | None, what: str) -> dict:
    """Parse ``KEY=VALUE`` pairs; values are read as JSON when possible (``0.05``, ``true``)."""
    out = {}
    for pair in pairs or ():
        if "=" not in pair:
            raise VimodelsError(f"{what} option {pair!r} must look like KEY=VALUE")
        key, value = pair.split("=", 1)
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser with every subcommand registered."""
    from vimodels.commands import basic

    parser = _Parser(prog="vimodels", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for module in _command_modules():
        module.register(sub)
    del basic
    return parser


def _command_modules() -> list:
    from diagnostics import commands as diag_commands
    from vimodels.commands import basic, sweep, vae

    return [basic, diag_commands, vae, sweep]


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
