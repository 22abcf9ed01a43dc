"""Named method presets (each a config of the core API) and ``--set key=value`` overrides."""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from collections.abc import Iterable
from typing import Any

from .config import DEFAULT_RATIO, CMAIConfig, SPDConfig, VMTCConfig

# "describe-then-answer" is not a model patch but an evaluation strategy (see unclutter.eval).
METHODS: dict[str, dict[str, Any]] = {
    "stock": {},
    "spd": {"spd": SPDConfig(grid=12)},
    "vmtc": {"vmtc": VMTCConfig()},
    "cmai": {"cmai": CMAIConfig()},
    "vmtc+cmai": {"vmtc": VMTCConfig(), "cmai": CMAIConfig()},
    "describe-then-answer": {},
}
_CLASSES = {"vmtc": VMTCConfig, "cmai": CMAIConfig, "spd": SPDConfig}


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text  # bare strings: --set vmtc.merge=drop


# VMTC's budget fields and their defaults: an override of one resets the other (a checkpoint recorded with
# num_tokens=16, evaluated with --set vmtc.ratio=0.25, would otherwise keep 16)
BUDGET = {"ratio": DEFAULT_RATIO, "num_tokens": None}


def resolve(name: str, overrides: Iterable[str] = (), recorded: dict | None = None) -> dict[str, Any]:
    """The ``apply`` kwargs of method ``name`` with ``section.field=value`` overrides applied.

    An override may switch a method on: ``--set cmai.gamma_max=0.5`` on ``vmtc`` gives VMTC + CMAI.
    ``name="checkpoint"`` takes the configs a checkpoint recorded in training (``recorded``).
    """
    if name == "checkpoint":
        if recorded is None:
            raise ValueError("method 'checkpoint' needs a model trained by `unclutter train` (config.unclutter).")
        configs = from_dict(recorded.get("configs", {}))
    elif name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join([*METHODS, 'checkpoint'])}.")
    else:
        configs = dict(METHODS[name])
    for item in overrides:
        key, sep, raw = item.partition("=")
        section, dot, field = key.strip().partition(".")
        if not sep or not dot or section not in _CLASSES:
            raise ValueError(f"--set takes section.field=value with section vmtc, cmai or spd; got {item!r}.")
        cls = _CLASSES[section]
        names = {f.name for f in dataclasses.fields(cls)}
        if field not in names:
            raise ValueError(f"{cls.__name__} has no field {field!r}; fields: {', '.join(sorted(names))}.")
        value = _parse_value(raw)
        _check_type(cls, field, value, item)
        current = configs.get(section) or cls()
        changes = {field: value}
        if section == "vmtc" and field in BUDGET and value is not None:  # the budget: the last of ratio / num_tokens
            changes.update({other: default for other, default in BUDGET.items() if other != field})
        configs[section] = dataclasses.replace(current, **changes)
    return configs


def _check_type(cls: type, field: str, value: Any, item: str) -> None:
    """``value`` (parsed from JSON) fits the field's annotation: int, float, bool, str / Literal, tuples of int or
    float, or None where the field admits it; else an error naming the override (not a TypeError from inside)."""
    want = typing.get_type_hints(cls)[field]
    if not _fits(want, value):
        raise ValueError(f"--set {item!r}: {field} takes {_describe(want)}, got {value!r}.")


def _fits(want: Any, value: Any) -> bool:
    origin, args = typing.get_origin(want), typing.get_args(want)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(a, value) for a in args)
    if origin is typing.Literal:
        return value in args
    if origin is tuple:  # tuple[int, ...] and the like: a JSON list
        return isinstance(value, list | tuple) and all(_fits(args[0], v) for v in value)
    if want is type(None):
        return value is None
    if want is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if want is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, want)


def _describe(want: Any) -> str:
    origin, args = typing.get_origin(want), typing.get_args(want)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is typing.Literal:
        return "one of " + ", ".join(map(repr, args))
    if origin is tuple:
        return f"a list of {_describe(args[0])}"
    return "null" if want is type(None) else want.__name__


def to_dict(configs: dict[str, Any]) -> dict[str, Any]:
    """JSON-ready form of resolved configs (saved with every run and checkpoint)."""
    return {k: (dataclasses.asdict(v) if v is not None else None) for k, v in configs.items()}


def from_dict(data: dict[str, Any]) -> dict[str, Any]:
    """Inverse of `to_dict`. Configs recorded before VMTCConfig refused both budget fields may hold a ratio beside
    num_tokens, which decided the budget: they load as they trained."""
    configs = {}
    for k, v in data.items():
        if v is None or k not in _CLASSES:
            continue
        if k == "vmtc" and v.get("num_tokens") is not None:
            v = {**v, "ratio": DEFAULT_RATIO}
        configs[k] = _CLASSES[k](**v)
    return configs
