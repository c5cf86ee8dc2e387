"""Stage 3: the business path an event's cost is attributed to, by the rules of ``config/paths.yaml``.

    rules:
      - path: support-bot/answer
        when: {service: support-bot, feature: [answer, answer-v2]}
      - path: "internal/{tags[team]}"
        when: {tags: {team: "*"}}
      - path: "{service}/{feature}"
        when: {service: "*", feature: "*"}

The first rule whose ``when`` matches wins; an event no rule matches is ``unattributed``.
``when`` tests ``service``, ``route``, ``feature``, ``step``, ``provider``, ``model``, ``tenant_id``
and ``tags``, each with a shell glob or a list of globs (case-sensitive); a field the event does
not have never matches. ``path`` may use those fields as ``{field}`` and tags as ``{tags[name]}``.
"""

from __future__ import annotations

import fnmatch
import operator
import string
from functools import lru_cache
from pathlib import Path
from typing import Annotated

from pydantic import BeforeValidator, Field, field_validator

from schemas.usage import UsageEvent
from streams.config import Strict, load_model

UNATTRIBUTED = "unattributed"
FIELDS = ("service", "route", "feature", "step", "provider", "model", "tenant_id")


def _as_list(value: object) -> object:
    return [value] if isinstance(value, str) else value


Globs = Annotated[list[str], BeforeValidator(_as_list), Field(min_length=1)]


class Condition(Strict):
    service: Globs | None = None
    route: Globs | None = None
    feature: Globs | None = None
    step: Globs | None = None
    provider: Globs | None = None
    model: Globs | None = None
    tenant_id: Globs | None = None
    tags: dict[str, Globs] = Field(default_factory=dict)


class Rule(Strict):
    path: Annotated[str, Field(min_length=1, max_length=256)]
    when: Condition = Field(default_factory=Condition)

    @field_validator("path")
    @classmethod
    def _known_placeholders(cls, path: str) -> str:
        for _, name, _, _ in string.Formatter().parse(path):
            if name is None:
                continue
            root = name.split("[", 1)[0]
            if root not in (*FIELDS, "tags") or (root == "tags" and not name.startswith("tags[")):
                raise ValueError(f"unknown placeholder {{{name}}}: use one of {', '.join(FIELDS)} or tags[name]")
        return path


class PathsFile(Strict):
    rules: list[Rule] = Field(default_factory=list)


class PathRules:
    """Evaluates the rules, caching the path per distinct combination of the tested fields."""

    def __init__(self, rules: list[Rule] | None = None) -> None:
        self.rules = list(rules or [])
        self._cached = lru_cache(maxsize=100_000)(self._path_uncached)
        # The cache key holds only what some rule looks at, so that, say, every tenant of a route
        # shares one entry when no rule names tenant_id.
        used = {f for r in self.rules for f in FIELDS if getattr(r.when, f) is not None or "{" + f in r.path}
        self._key_fields = tuple(f for f in FIELDS if f in used)
        # One C-level read of the used fields (always a tuple, whatever their number).
        self._values = operator.attrgetter(*self._key_fields, "tags") if self._key_fields else None
        self._all_tags = any("{tags" in r.path for r in self.rules)
        self._tag_keys = {key for r in self.rules for key in r.when.tags}

    @classmethod
    def from_file(cls, path: Path | None) -> PathRules:
        """The rules in ``path``; none (everything unattributed) when the file does not exist."""
        return cls(load_model(path, PathsFile).rules)

    def path_for(self, event: UsageEvent) -> str:
        if self._values is None:
            values: tuple[str | None, ...] = ()
            tags = event.tags
        else:
            *values, tags = self._values(event)
            values = tuple(values)
        if tags and not self._all_tags:
            tags = {k: v for k, v in tags.items() if k in self._tag_keys}
        return self._cached(values, tuple(sorted(tags.items())) if tags else ())

    def _path_uncached(self, values: tuple[str | None, ...], tag_items: tuple[tuple[str, str], ...]) -> str:
        fields = dict.fromkeys(FIELDS) | dict(zip(self._key_fields, values))
        tags = dict(tag_items)
        present = {name: value for name, value in fields.items() if value is not None}
        for rule in self.rules:
            if _matches(rule.when, fields, tags):
                try:
                    return rule.path.format_map({**present, "tags": tags})
                except (KeyError, IndexError):
                    continue  # the template names a field or tag this event lacks
        return UNATTRIBUTED


def _matches(when: Condition, fields: dict[str, str | None], tags: dict[str, str]) -> bool:
    for name in FIELDS:
        globs = getattr(when, name)
        if globs is not None and not _any(fields[name], globs):
            return False
    return all(_any(tags.get(key), globs) for key, globs in when.tags.items())


def _any(value: str | None, globs: list[str]) -> bool:
    return value is not None and any(fnmatch.fnmatchcase(value, g) for g in globs)
