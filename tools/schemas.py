"""Checking inputs against a tool's JSON Schema (Draft 2020-12), with errors in words.

Messages never repeat the submitted value: inputs may hold secrets.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError

ROOT = "(root)"


@lru_cache(maxsize=256)
def _validator(schema_json: str) -> Draft202012Validator:
    return Draft202012Validator(json.loads(schema_json))


def _validator_for(schema: dict[str, Any]) -> Draft202012Validator:
    return _validator(json.dumps(schema, sort_keys=True))


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _message(error: ValidationError) -> str:
    v, expected = error.validator, error.validator_value
    if v == "type":
        kinds = expected if isinstance(expected, list) else [expected]
        return f"Must be of type {' or '.join(kinds)}."
    if v == "enum":
        return "Must be one of: " + ", ".join(json.dumps(x) for x in expected) + "."
    if v == "const":
        return f"Must be {json.dumps(expected)}."
    if v == "minLength":
        return "Must not be empty." if expected == 1 else f"Must be at least {_plural(expected, 'character')} long."
    if v == "maxLength":
        return f"Must be at most {_plural(expected, 'character')} long."
    if v == "minimum":
        return f"Must be at least {expected}."
    if v == "maximum":
        return f"Must be at most {expected}."
    if v == "exclusiveMinimum":
        return f"Must be greater than {expected}."
    if v == "exclusiveMaximum":
        return f"Must be less than {expected}."
    if v == "minItems":
        return f"Must have at least {_plural(expected, 'item')}."
    if v == "maxItems":
        return f"Must have at most {_plural(expected, 'item')}."
    if v == "pattern":
        return f"Must match the pattern {expected}."
    if v == "format":
        return f"Must be a valid {expected}."
    if v == "uniqueItems":
        return "Must not contain duplicate items."
    return f"Does not satisfy the schema's {v!r} rule."


def _path(error: ValidationError) -> str:
    return ".".join(str(part) for part in error.absolute_path) or ROOT


def errors_by_field(schema: dict[str, Any], data: Any) -> dict[str, list[str]]:
    """Every way ``data`` breaks ``schema``, keyed by dotted field path."""
    errors: dict[str, list[str]] = {}
    for error in _validator_for(schema).iter_errors(data):
        base = ".".join(str(part) for part in error.absolute_path)
        if error.validator == "required":
            present = error.instance if isinstance(error.instance, dict) else {}
            for name in error.validator_value:
                if name not in present:
                    errors.setdefault(f"{base}.{name}" if base else name, []).append("This field is required.")
        elif error.validator == "additionalProperties" and isinstance(error.instance, dict):
            known = set(error.schema.get("properties", {}))
            patterns = list(error.schema.get("patternProperties", {}))
            for name in error.instance:
                if name not in known and not any(re.search(pattern, name) for pattern in patterns):
                    errors.setdefault(f"{base}.{name}" if base else name, []).append("Unknown field.")
        else:
            errors.setdefault(_path(error), []).append(_message(error))
    return errors


def defaults_errors(schema: dict[str, Any], defaults: dict[str, Any]) -> dict[str, list[str]]:
    """Like :func:`errors_by_field` for default inputs, where required fields may be absent."""
    relaxed = {key: value for key, value in schema.items() if key != "required"}
    return errors_by_field(relaxed, defaults)


def summary(field_errors: dict[str, list[str]]) -> str:
    """One sentence naming every failing field, for ``error_message``."""
    parts = [f"{path}: {' '.join(messages)}" for path, messages in field_errors.items()]
    return "The inputs are not valid. " + "; ".join(parts)


def nul_errors(value: Any, path: str = "") -> dict[str, list[str]]:
    """Where ``value`` holds a NUL character, which PostgreSQL cannot store in JSON or text."""
    errors: dict[str, list[str]] = {}
    message = "Must not contain the NUL character (\\u0000)."
    if isinstance(value, str):
        if "\x00" in value:
            errors[path or ROOT] = [message]
    elif isinstance(value, dict):
        for key, item in value.items():
            child = f"{path}.{key}" if path else str(key)
            if isinstance(key, str) and "\x00" in key:
                errors[child.replace("\x00", "\\u0000")] = ["Field names must not contain the NUL character."]
            else:
                errors.update(nul_errors(item, child))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            errors.update(nul_errors(item, f"{path}.{index}" if path else str(index)))
    return errors
