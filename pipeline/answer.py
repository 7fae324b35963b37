"""A row's final answer checked against its schema: re-serialised as JSON, then validated.

Remote ``$ref``s are never fetched: the validators run with a :class:`referencing.Registry`
whose retrieval always fails, so such a schema never calls an answer valid.
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any

from ossbatch.pipeline.response_format import SchemaRefused, check_schema, parse_schema, reject_constant, validator_class

__all__ = ["offline_registry", "validate_answer"]


def validate_answer(output_text: str, schema_text: str | None) -> tuple[str | None, bool | None]:
    """``(output_json, schema_valid)`` for a row's final answer.

    ``output_json`` is the answer parsed as JSON and re-serialised compactly
    (``None`` when it is not JSON: NaN/Infinity are not JSON either).
    ``schema_valid`` is jsonschema's verdict (``None`` without a schema; ``False``
    when the answer is not JSON, or the schema is unusable, or needs a remote $ref).
    """
    value: Any = None
    output_json: str | None = None
    try:
        value = json.loads(output_text, parse_constant=reject_constant)
        output_json = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    except (ValueError, TypeError, RecursionError):
        output_json = None
    if schema_text is None:
        return output_json, None
    if output_json is None:
        return None, False
    validator = _answer_validator(schema_text)
    if validator is None:
        return output_json, False
    try:
        return output_json, validator.is_valid(value)
    except Exception:  # referencing.exceptions.Unresolvable and friends: cannot say it is valid
        return output_json, False


def _refuse_retrieval(uri: str):
    raise LookupError(f"remote $ref {uri!r} is not fetched")


@lru_cache(maxsize=1)
def offline_registry():
    """A :class:`referencing.Registry` that never retrieves a resource."""
    import referencing

    return referencing.Registry(retrieve=_refuse_retrieval)


@lru_cache(maxsize=256)
def _answer_validator(schema_text: str):
    """A jsonschema validator for the schema text (cached: a job has few schemas and many rows),
    or None when the schema is unusable."""
    try:
        schema = parse_schema(schema_text)
        check_schema(schema)
    except SchemaRefused:
        return None
    return validator_class(schema)(schema, registry=offline_registry())
