"""Config fields that are also command-line options: the field, its default and its help in one place.

``fqgan.cli`` turns every field declared with :func:`option` into a flag (``--field-name``, or the
``flag`` given), with the field's type, default and help, and reads the parsed value back into the
config. Adding a config field with ``option(...)`` adds its flag; nothing else needs editing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from .errors import UsageError

__all__ = ["config_from_dict", "config_to_dict", "option", "run_defining_diff"]

_MISSING: Any = dataclasses.MISSING


def option(default: Any = _MISSING, help: str = "", *, flag: str | None = None, group: str | None = None,
           choices: Sequence[Any] | None = None, metavar: str | None = None, runtime: bool = False,
           default_factory: Callable[[], Any] | None = None) -> Any:
    """A dataclass ``field`` that the CLI exposes as an option.

    :param help: the flag's help text (the CLI appends the default)
    :param flag: the flag's name when not ``--`` + the field name with dashes (e.g. ``--batch-size`` for
        ``global_batch_size``); a bool field whose flag starts with ``--no-`` turns it off
    :param group: the help section it appears in
    :param choices: the allowed values
    :param runtime: the field says how a run executes, not what it computes (device, logging, paths of
        weight files, parallelism): a resumed run may change it (:func:`run_defining_diff` ignores it)
    """
    meta = {"help": help, "flag": flag, "group": group, "choices": tuple(choices) if choices else None,
            "metavar": metavar, "runtime": runtime}
    if default_factory is not None:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def run_defining_diff(config: Any, saved: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """``(field, saved value, current value)`` for each field of the dataclass ``config`` whose value
    differs from ``saved`` (its ``to_dict()`` at the time), leaving out :func:`option` fields marked
    ``runtime`` and fields the saved dict does not have (added since)."""
    now = config.to_dict() if hasattr(config, "to_dict") else dataclasses.asdict(config)
    runtime = {f.name for f in dataclasses.fields(config) if f.metadata.get("runtime")}
    return [(k, saved[k], now[k]) for k in now if k in saved and k not in runtime and saved[k] != now[k]]


C = TypeVar("C")


def config_to_dict(config: Any) -> dict[str, Any]:
    """A flat dataclass config as plain ``{field: value}`` (tuples as lists), for a checkpoint or a JSON file."""
    return {f.name: list(v) if isinstance(v := getattr(config, f.name), tuple) else v
            for f in dataclasses.fields(config)}


def config_from_dict(cls: type[C], data: dict[str, Any]) -> C:
    """Inverse of :func:`config_to_dict` (the dataclass converts lists back in its ``__post_init__``).

    :raises UsageError: a key that is not a field of ``cls`` (named)
    """
    unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise UsageError(f"unknown {cls.__name__} fields: {unknown}")
    return cls(**data)
