"""The flat Flower run config of a run spec: keys, values and one-line errors (pydantic only; clients/spec.py's)."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

PREFIX = {"training": "", "data": "", "privacy": "privacy-", "distill": "distill-",
          "simulation": "simulation-"}  # run-config key prefix per group


def key(prefix: str, field: str) -> str:
    """Return the run-config key of a field: its name with dashes, after its group's prefix."""
    return prefix + field.replace("_", "-")


def flat(dumped: dict[str, Any]) -> dict[str, Any]:
    """Flatten a dumped RunSpec into run-config keys."""
    out = {key("", k): v for k, v in dumped.items() if k not in PREFIX}
    for group, prefix in PREFIX.items():
        out.update({key(prefix, k): v for k, v in dumped[group].items()})
    return out


def encode(value: Any) -> bool | int | float | str:
    """Return a spec value as a Flower config value: None as "", sizes as "HxW", node ids as "3,7"."""
    if value is None:
        return ""
    if isinstance(value, tuple):
        return "x".join(str(side) for side in value)
    if isinstance(value, list):
        return ",".join(str(item) for item in value)
    return value


def run_config_key(location: tuple[str | int, ...]) -> str:
    """Return the run-config key of a validation error's location (``("training", "learning_rate")``)."""
    parts = [str(part) for part in location]
    if parts and parts[0] in PREFIX and len(parts) > 1:
        return key(PREFIX[parts[0]], parts[1])
    return key("", parts[0]) if parts else "run config"


def describe_errors(exc: ValidationError, *, keys: bool = False) -> str:
    """Return a pydantic validation error as one line: ``field: problem; field: problem``.

    ``keys``: name the fields by their run-config keys (``learning-rate``) instead of their dotted
    path (``large.learning_rate``).
    """
    parts = []
    for error in exc.errors():
        location = tuple(part for part in error["loc"] if not str(part).startswith("function-"))
        message = error["msg"].removeprefix("Value error, ")
        if not location:  # a rule across fields: its message names them
            parts.append(message)
            continue
        field = run_config_key(location) if keys else ".".join(str(part) for part in location)
        parts.append(f"{field}: {message}")
    return "; ".join(parts)
