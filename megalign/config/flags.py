"""Flags from typed dataclass fields: :func:`setting` declares one, :func:`collect_flags` reads them back as
:class:`Flag` records, and the argparse parser, value checking (:func:`parse_value`) and the Markdown reference
(:func:`flags_markdown`, embedded in docs/configuration.md) are built from those records.

A field ``micro_batch_size: Optional[int] = setting(None, "help", minimum=1)`` of a section is the flag
``--micro-batch-size`` and the YAML key ``micro_batch_size`` (or ``micro-batch-size``); the field's type gives
the kind of value (int, float, str, bool, or a list of strings), ``Optional`` that None (unset) is allowed.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import typing
from dataclasses import dataclass
from typing import Any, List, Optional, Sequence, Tuple

from megalign.errors import ConfigError

__all__ = ["Flag", "add_flag_arguments", "collect_flags", "flags_markdown", "parse_value", "setting"]

KINDS = ("int", "float", "str", "bool", "list")
_KIND_OF_TYPE = {int: "int", float: "float", str: "str", bool: "bool"}


def setting(
    default: Any, help: str, *, choices: Optional[Sequence[str]] = None, minimum: Optional[float] = None
) -> Any:
    """A section field that is also a flag: its default, help text, allowed values and lower bound."""
    metadata = {"help": help, "choices": tuple(choices) if choices is not None else None, "minimum": minimum}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


@dataclass(frozen=True)
class Flag:
    """One command-line flag / YAML key: its section, value kind, default, help and allowed values."""

    name: str
    section: str
    kind: str
    default: Any
    help: str
    choices: Optional[Tuple[str, ...]] = None
    minimum: Optional[float] = None

    @property
    def dest(self) -> str:
        """Attribute, dataclass field and YAML key (``--micro-batch-size`` -> ``micro_batch_size``)."""
        return self.name[2:].replace("-", "_")


def _kind(annotation: Any, where: str) -> str:
    """The value kind of a field type: int, float, str, bool, Optional of those, or Optional[List[str]]."""
    args = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
    if typing.get_origin(annotation) is typing.Union and len(args) == 1:
        annotation = args[0]
    if typing.get_origin(annotation) in (list, List) and typing.get_args(annotation) == (str,):
        return "list"
    if annotation in _KIND_OF_TYPE:
        return _KIND_OF_TYPE[annotation]
    raise TypeError(
        f"{where}: a setting must be typed int, float, str, bool or List[str] (optionally Optional), not {annotation!r}"
    )


def section_flags(key: str, section_type: type) -> List[Flag]:
    """The flags of one section dataclass, in field order (every field must be made with :func:`setting`)."""
    hints = typing.get_type_hints(section_type)
    flags = []
    for field in dataclasses.fields(section_type):
        where = f"{section_type.__name__}.{field.name}"
        if "help" not in field.metadata:
            raise TypeError(f"{where}: declare settings with megalign.config.flags.setting(...)")
        default = field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default
        flags.append(
            Flag(
                name="--" + field.name.replace("_", "-"),
                section=key,
                kind=_kind(hints[field.name], where),
                default=default,
                help=field.metadata["help"],
                choices=field.metadata["choices"],
                minimum=field.metadata["minimum"],
            )
        )
    return flags


def collect_flags(config_type: type) -> Tuple[Tuple[Tuple[str, str], ...], Tuple[Flag, ...]]:
    """``(sections, flags)`` of a config made of section dataclasses: ``sections`` is ``(key, title)`` in field
    order (the title is the section's ``title`` class attribute), ``flags`` every section's flags in order."""
    hints = typing.get_type_hints(config_type)
    sections, flags = [], []
    for field in dataclasses.fields(config_type):
        if not field.metadata.get("section", True):  # a derived input (e.g. the checkpoint's model), not flags
            continue
        section_type = hints[field.name]
        sections.append((field.name, section_type.title))
        flags += section_flags(field.name, section_type)
    names = [flag.name for flag in flags]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise TypeError(f"{config_type.__name__}: flags defined twice: {', '.join(duplicates)}")
    for flag in flags:
        if flag.default is not None and flag.kind != "list" and parse_value(flag, flag.default) != flag.default:
            raise TypeError(f"{flag.name}: default {flag.default!r} is not a valid value of the flag")
    return tuple(sections), tuple(flags)


def _describe(kind: str) -> str:
    return {
        "int": "an integer",
        "float": "a number",
        "str": "a string",
        "bool": "true or false",
        "list": "a list of strings",
    }[kind]


def parse_value(flag: Flag, value: Any, where: str = "") -> Any:
    """Check and convert one value (a CLI string, or a YAML/JSON value) for ``flag``.

    ``where`` prefixes the message (e.g. ``"cfg.yaml: "``). None is accepted only where the default is None.
    """
    prefix = f"{where}{flag.name}"
    if value is None:
        if flag.default is None:
            return None
        raise ConfigError(f"{prefix}: needs {_describe(flag.kind)}, got null")
    bad = ConfigError(f"{prefix}: expected {_describe(flag.kind)}, got {value!r}")
    if flag.kind == "bool":
        if not isinstance(value, bool):
            raise bad
        return value
    if flag.kind == "list":
        items = value.split() if isinstance(value, str) else value
        if (
            not isinstance(items, (list, tuple))
            or not items
            or any(isinstance(item, (bool, list, dict)) or item is None for item in items)
        ):
            raise bad
        return [str(item) for item in items]
    if isinstance(value, (bool, list, dict)):
        raise bad
    if flag.kind == "str":
        text = str(value)
        if flag.choices is not None:
            matched = {choice.lower(): choice for choice in flag.choices}.get(text.lower())
            if matched is None:
                raise ConfigError(f"{prefix}: {text!r} is not one of {', '.join(flag.choices)}")
            text = matched
        return text
    number: Any
    try:
        if flag.kind == "int":
            if isinstance(value, float):
                raise ValueError
            number = int(value)
        else:
            number = float(value)
    except ValueError:
        raise bad from None
    if flag.kind == "float" and not math.isfinite(number):
        raise ConfigError(f"{prefix}: {value!r} must be finite")
    if flag.minimum is not None and number < flag.minimum:
        raise ConfigError(f"{prefix}: {number!r} must be >= {flag.minimum:g}")
    return number


def _cli_type(flag: Flag) -> Any:
    def convert(text: str) -> Any:
        try:
            return parse_value(flag, text)
        except ConfigError as exc:  # argparse reports ArgumentTypeError's own message
            raise argparse.ArgumentTypeError(str(exc).split(": ", 1)[-1]) from None

    convert.__name__ = flag.kind
    return convert


def _default_text(flag: Flag) -> str:
    if flag.default is None:
        return "-"
    if flag.kind == "bool":
        return "false"
    return f"{flag.default:g}" if isinstance(flag.default, float) else str(flag.default)


_METAVARS = {"int": "N", "float": "X", "str": "STR", "list": "PATH"}


def add_flag_arguments(
    parser: argparse.ArgumentParser, sections: Sequence[Tuple[str, str]], flags: Sequence[Flag]
) -> None:
    """Add every flag, grouped by section. Defaults are SUPPRESSed (absent from the namespace unless given),
    so that explicit flags can be told apart from defaults and override YAML values."""
    groups = {key: parser.add_argument_group(title) for key, title in sections}
    for flag in flags:
        group = groups[flag.section]
        text = flag.help
        if flag.kind != "bool" and flag.default is not None:
            text += f" (default: {_default_text(flag)})"
        if flag.kind == "bool":
            group.add_argument(flag.name, action="store_true", default=argparse.SUPPRESS, help=text)
        else:
            metavar = "{" + ",".join(flag.choices) + "}" if flag.choices else _METAVARS[flag.kind]
            convert = str if flag.kind == "list" else _cli_type(flag)  # lists are checked whole, later
            group.add_argument(
                flag.name,
                type=convert,
                default=argparse.SUPPRESS,
                metavar=metavar,
                nargs="+" if flag.kind == "list" else None,
                help=text,
            )


def flags_markdown(sections: Sequence[Tuple[str, str]], flags: Sequence[Flag]) -> str:
    """The flag reference as Markdown tables, one per section (docs/configuration.md embeds this verbatim)."""
    lines = []
    for key, title in sections:
        lines += [f"### {title}", "", "| flag | default | description |", "| --- | --- | --- |"]
        for flag in (f for f in flags if f.section == key):
            text = flag.help.replace("|", "\\|")
            if flag.choices:
                text += " One of: " + ", ".join(f"`{choice}`" for choice in flag.choices) + "."
            lines.append(f"| `{flag.name}` | {_default_text(flag)} | {text} |")
        lines.append("")
    return "\n".join(lines)
