"""Building blocks of the config schema that every section uses: the error that names a key, and
the range checks a section runs on its own values."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


class ConfigError(ValueError):
    """A configuration key or value is wrong; the message names the key."""


def check_choices(section: str, obj: object, choices: dict[str, Iterable[Any]]) -> None:
    """Each `field -> allowed values` of `obj` (the config section named `section`)."""
    for key, allowed in choices.items():
        value = getattr(obj, key)
        if value not in tuple(allowed):
            raise ConfigError(f"{section}.{key}={value!r}: must be one of {', '.join(map(repr, allowed))}")


def check_positive(section: str, obj: object, keys: Iterable[str]) -> None:
    """Each field `key` of `obj` (the config section named `section`) is above 0."""
    for key in keys:
        value = getattr(obj, key)
        if value <= 0:
            raise ConfigError(f"{section}.{key}={value!r}: must be positive")


def check_non_negative(section: str, obj: object, keys: Iterable[str]) -> None:
    """Each field `key` of `obj` (the config section named `section`) is 0 or more."""
    for key in keys:
        value = getattr(obj, key)
        if value < 0:
            raise ConfigError(f"{section}.{key}={value!r}: must be >= 0")
