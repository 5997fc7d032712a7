"""Shared pieces of the command line: the one-line-error parser and ``KEY=VALUE`` options."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence

from vimodels.errors import VimodelsError

EXIT_USAGE = 2


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line and exit status 2 (no usage dump)."""

    def error(self, message: str) -> None:  # noqa: D102
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
