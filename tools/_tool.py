"""Shared bootstrap for the Megatron-style scripts in tools/: run a `megalign` subcommand.

Lets `python tools/preprocess_data.py ...` work from a source checkout without installation.
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))

from megalign.cli import run_command  # noqa: E402


def run(command: str) -> None:
    """Run `megalign <command>` with this process's arguments and exit with its status."""
    sys.exit(run_command(command, sys.argv[1:]))
