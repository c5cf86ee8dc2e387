"""The configuration files' loader: YAML into frozen pydantic models, every mistake one line.

``config/prices.yaml`` (``streams.stages.prices``), ``paths.yaml`` (``streams.stages.tagging``)
and ``plans.yaml`` (``streams.stages.plans``) are read through ``load_model``; their models
derive from ``Strict``, so an unknown key is an error, not a silently ignored typo.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from streams.errors import CostlineError


class ConfigError(CostlineError, ValueError):
    """A configuration file is invalid; the message names the file, the entry and the problem."""


class Strict(BaseModel):
    """A configuration entry: unknown keys are refused, and the loaded value is frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def load_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}:{where} is not valid YAML: {getattr(exc, 'problem', exc)}") from None


def describe_error(path: Path, exc: ValidationError) -> ConfigError:
    e = exc.errors(include_url=False)[0]
    where = ".".join(str(p) for p in e["loc"]) or "(top level)"
    return ConfigError(f"{path}: {where}: {e['msg']}")


M = TypeVar("M", bound=BaseModel)


def load_model(path: Path | None, model: type[M]) -> M:
    """``model`` validated from the YAML file at ``path``; its defaults when the file does not exist.
    Every mistake becomes one ``ConfigError`` line naming the file and the entry."""
    if path is None or not path.exists():
        return model()
    try:
        return model.model_validate(load_yaml(path))
    except ValidationError as exc:
        raise describe_error(path, exc) from None
