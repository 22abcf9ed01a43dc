"""Named method presets (each a config of the core API) and ``--set key=value`` overrides."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable
from typing import Any

from .config import CMAIConfig, SPDConfig, VMTCConfig

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
        current = configs.get(section) or cls()
        configs[section] = dataclasses.replace(current, **{field: _parse_value(raw)})
    return configs


def to_dict(configs: dict[str, Any]) -> dict[str, Any]:
    """JSON-ready form of resolved configs (saved with every run and checkpoint)."""
    return {k: (dataclasses.asdict(v) if v is not None else None) for k, v in configs.items()}


def from_dict(data: dict[str, Any]) -> dict[str, Any]:
    """Inverse of `to_dict`."""
    return {k: _CLASSES[k](**v) for k, v in data.items() if v is not None and k in _CLASSES}
