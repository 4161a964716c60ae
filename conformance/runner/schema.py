"""A validator for the JSON Schema keywords `conformance/pipeline.schema.json` uses, with the
standard library only; it refuses schemas that use any other keyword. The self-test checks it
against the `jsonschema` package when that is installed."""

from __future__ import annotations

import json
import re
from pathlib import Path

SCHEMA_PATH = Path(__file__).resolve().parents[1] / "pipeline.schema.json"
TYPES = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "boolean": lambda v: isinstance(v, bool),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "null": lambda v: v is None,
}
ANNOTATIONS = {"$schema", "$id", "$defs", "title", "description"}


def load_schema() -> dict:
    return json.loads(SCHEMA_PATH.read_text())


def problems(value, schema: dict | None = None) -> list[str]:
    root = schema or load_schema()
    found: list[str] = []
    _check(root, root, value, "$", found)
    return found


def _check(root, node, value, path, found) -> None:
    for keyword, arg in node.items():
        if keyword in ANNOTATIONS:
            continue
        if keyword == "$ref":
            target = root
            for part in arg.removeprefix("#/").split("/"):
                target = target[part]
            _check(root, target, value, path, found)
        elif keyword == "type":
            if not TYPES[arg](value):
                found.append(f"{path}: expected {arg}, found {json.dumps(value)}")
        elif keyword == "const":
            if value != arg or type(value) is not type(arg):
                found.append(f"{path}: expected {arg!r}, found {value!r}")
        elif keyword in ("minimum", "maximum"):
            if TYPES["number"](value) and (value < arg if keyword == "minimum" else value > arg):
                found.append(f"{path}: {value} breaks {keyword} {arg}")
        elif keyword in ("minLength", "maxLength"):
            if isinstance(value, str) and (len(value) < arg if keyword == "minLength"
                                           else len(value) > arg):
                found.append(f"{path}: length {len(value)} breaks {keyword} {arg}")
        elif keyword == "pattern":
            if isinstance(value, str) and not re.search(arg, value):
                found.append(f"{path}: {value!r} does not match {arg}")
        elif keyword == "required":
            if isinstance(value, dict):
                missing = [key for key in arg if key not in value]
                if missing:
                    found.append(f"{path}: missing {missing}")
        elif keyword == "properties":
            if isinstance(value, dict):
                for key, sub in arg.items():
                    if key in value:
                        _check(root, sub, value[key], f"{path}.{key}", found)
        elif keyword == "items":
            if isinstance(value, list):
                for index, item in enumerate(value):
                    _check(root, arg, item, f"{path}[{index}]", found)
        else:
            raise ValueError(f"schema keyword {keyword!r} is not supported by this validator")
