"""Exceptions that carry a user-facing message (file, line or field, and what to do).

The CLI prints these without a traceback; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class MegalignError(Exception):
    """Base class for errors caused by user input, files or configuration."""


class DataFormatError(MegalignError, ValueError):
    """A data file (.bin/.idx, .npy cache, JSONL) is malformed, truncated or of the wrong version."""


class BadRecordError(DataFormatError):
    """One input record is unusable: malformed JSON, a missing key, invalid UTF-8."""


class ConfigError(MegalignError, ValueError):
    """Flags or settings are inconsistent (names the flag and the constraint that failed)."""


class TokenizerError(MegalignError, ValueError):
    """A tokenizer cannot be loaded or does not match the data or model."""
