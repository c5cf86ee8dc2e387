"""Writes the JSON Schema files that producers in other languages validate against.

    python -m schemas.export          # rewrite schemas/json/*.json
    python -m schemas.export --check  # exit 1 when a file is out of date
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from pydantic import BaseModel

from schemas.attributed import AttributedUsage
from schemas.usage import UsageEvent

JSON_DIR = Path(__file__).parent / "json"
MODELS: dict[str, type[BaseModel]] = {
    "usage_event.v1.schema.json": UsageEvent,
    "attributed_usage.v1.schema.json": AttributedUsage,
}


def render(model: type[BaseModel]) -> str:
    schema = model.model_json_schema(mode="validation")
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"


def stale_files() -> list[str]:
    return [name for name, model in MODELS.items() if _read(JSON_DIR / name) != render(model)]


def write() -> None:
    JSON_DIR.mkdir(exist_ok=True)
    for name, model in MODELS.items():
        (JSON_DIR / name).write_text(render(model))


def _read(path: Path) -> str | None:
    return path.read_text() if path.exists() else None


if __name__ == "__main__":
    if "--check" in sys.argv[1:]:
        stale = stale_files()
        if stale:
            print(f"out of date: {', '.join(stale)}; run: python -m schemas.export", file=sys.stderr)
            sys.exit(1)
    else:
        write()
