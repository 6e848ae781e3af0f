#!/usr/bin/env python3
"""Megatron-style script: same flags as `megalign convert` (see its --help)."""
from _tool import run

if __name__ == "__main__":
    run("convert")
