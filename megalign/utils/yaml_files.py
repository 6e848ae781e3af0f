"""Reading YAML files with errors that name the file (ConfigError), for configs, guidelines and lexicons."""

from __future__ import annotations

from typing import Any, Optional

import yaml

from megalign.errors import ConfigError

__all__ = ["read_yaml_file"]


def read_yaml_file(path: str, label: Optional[str] = None, what: str = "it") -> Any:
    """The parsed contents of YAML file ``path``; ConfigError "LABEL: cannot read WHAT (...)" or "LABEL: not
    valid YAML: ..." (LABEL defaults to the path) when it is unreadable or malformed."""
    label = label or path
    try:
        with open(path, encoding="utf-8") as handle:
            return yaml.safe_load(handle)
    except OSError as error:
        raise ConfigError(f"{label}: cannot read {what} ({error.strerror})") from None
    except UnicodeDecodeError as error:
        raise ConfigError(f"{label}: not UTF-8 text ({error.reason} at byte {error.start})") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{label}: not valid YAML: {error}") from None
