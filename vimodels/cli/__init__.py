"""The ``vimodels`` command: argument parsing and dispatch; no logic of its own."""

from vimodels.cli.main import main

__all__ = ["main"]
