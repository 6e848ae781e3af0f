"""`python -m megalign.demo ARGS`: the same as `megalign demo ARGS`."""

from __future__ import annotations

import sys

from megalign.cli import run_command

if __name__ == "__main__":  # pragma: no cover
    sys.exit(run_command("demo", sys.argv[1:]))
