"""Megatron-style entry point: ``python pretrain_gpt.py ARGS`` is ``megalign train ARGS``.

Works from a source checkout without installation; see ``megalign train --help`` for the flags.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from megalign.cli import run_command  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_command("train", sys.argv[1:]))
