"""Building a :class:`~megalign.config.training.TrainingConfig` from the command line and YAML files.

Priority, lowest first: the flag defaults, ``--config FILE.yaml`` (flat; keys are flag names with dashes or
underscores), explicit flags. The result is validated once, here, before any component is built.
"""

from __future__ import annotations

import argparse
import difflib
import os
from typing import Any, Dict, Sequence

from megalign.config.flags import add_flag_arguments, parse_value
from megalign.config.training import FLAGS, FLAGS_BY_DEST, SECTIONS, TrainingConfig
from megalign.errors import ConfigError
from megalign.utils.yaml_files import read_yaml_file

__all__ = [
    "add_arguments",
    "build_parser",
    "config_from_namespace",
    "load_config",
    "read_yaml",
    "values_from_namespace",
]


def read_yaml(path: str) -> Dict[str, Any]:
    """``{dest: value}`` from a flat YAML file of flag names (dashes or underscores); errors name the file and key."""
    data = read_yaml_file(path, f"--config {path}")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of flag names to values, got {type(data).__name__}")
    values: Dict[str, Any] = {}
    for key, value in data.items():
        dest = str(key).lstrip("-").replace("-", "_")
        if dest not in FLAGS_BY_DEST:
            close = difflib.get_close_matches(dest, list(FLAGS_BY_DEST), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{path}: unknown key {key!r}{hint} (keys are flag names, see docs/configuration.md)")
        if dest in values:
            raise ConfigError(f"{path}: key {key!r} is given twice (as dashes and underscores)")
        values[dest] = parse_value(FLAGS_BY_DEST[dest], value, f"{path}: ")
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--config`` and every training flag to ``parser`` (for the ``megalign train`` subcommand)."""
    parser.add_argument(
        "--config",
        metavar="FILE.yaml",
        default=None,
        help="YAML file of flag values (keys: flag names); explicit flags override it",
    )
    add_flag_arguments(parser, SECTIONS, FLAGS)


def build_parser() -> argparse.ArgumentParser:
    """The training argument parser (pretrain_gpt.py, ``megalign train``)."""
    parser = argparse.ArgumentParser(
        prog="pretrain_gpt.py",
        description="Train a GPT model (Megatron-LM's flags).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Flags and defaults: docs/configuration.md",
    )
    add_arguments(parser)
    return parser


def values_from_namespace(args: argparse.Namespace) -> Dict[str, Any]:
    """``{dest: value}`` of the settings given: ``args.config``'s YAML, then the explicit flags over it."""
    explicit = {dest: value for dest, value in vars(args).items() if dest in FLAGS_BY_DEST}
    path = vars(args).get("config")
    values = read_yaml(os.fspath(path)) if path else {}
    values.update(explicit)
    return values


def config_from_namespace(args: argparse.Namespace) -> TrainingConfig:
    """The config from parsed :func:`add_arguments` flags: defaults, then ``args.config``'s YAML, then the flags."""
    return TrainingConfig.from_values(values_from_namespace(args))


def load_config(argv: Sequence[str]) -> TrainingConfig:
    """Parse ``argv`` (flags and an optional ``--config FILE.yaml``) into a validated :class:`TrainingConfig`."""
    return config_from_namespace(build_parser().parse_args(list(argv)))
