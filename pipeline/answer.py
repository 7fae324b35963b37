"""A row's final answer checked against its schema: re-serialised as JSON, then validated.

The answer is model output, so its check must cost little whatever the schema says:

* ``pattern``, ``patternProperties`` (and the ``additionalProperties``/``unevaluatedProperties``
  that depend on them) match with RE2, a linear-time engine, never Python's backtracking ``re``
  (``^(a+)+c$`` against 40 ``a``s would run for minutes). RE2 reads ECMA-262 patterns as JSON
  Schema means them where they differ from Python's: ``\\d``/``\\w`` are ASCII, ``$`` is the end of
  the text; ECMA's ``\\uXXXX`` escapes are translated. A pattern RE2 cannot run (back-references)
  fails the row with a message; llguidance already refuses look-around before any row runs.
* Every keyword the validator evaluates first checks a per-answer deadline
  (:data:`ANSWER_CHECK_SECONDS`), so a schema whose checking explodes (nested ``anyOf`` over
  ``$ref``s is exponential in its depth) fails its own row with a message, and the job goes on.

Remote ``$ref``s are never fetched: the validators run with a :class:`referencing.Registry`
whose retrieval always fails, so such a schema never calls an answer valid.
"""

from __future__ import annotations

import json
import re
import threading
import time
from functools import lru_cache
from typing import Any

import re2

from ossbatch.pipeline.response_format import SchemaRefused, check_schema, parse_schema, reject_constant, validator_class

__all__ = ["ANSWER_CHECK_SECONDS", "AnswerCheckFailed", "answer_fields", "offline_registry", "validate_answer"]

# The most one answer's check may take; past it the row fails (checking is linear in the answer
# for all but combinatorial schemas, which it stops).
ANSWER_CHECK_SECONDS = 2.0


class AnswerCheckFailed(ValueError):
    """The answer could not be checked against its schema (too costly, or a pattern RE2 cannot run)."""


def answer_fields(output_text: str, schema_text: str) -> dict:
    """A schema row's result fields: ``output_json`` and ``schema_valid``, and when the answer could
    not be checked, ``status``/``finish_reason`` ``error`` with the reason in ``error``."""
    try:
        output_json, schema_valid = validate_answer(output_text, schema_text)
    except AnswerCheckFailed as err:
        return {"output_json": None, "schema_valid": None, "status": "error", "finish_reason": "error", "error": str(err)}
    return {"output_json": output_json, "schema_valid": schema_valid}


def validate_answer(output_text: str, schema_text: str | None) -> tuple[str | None, bool | None]:
    """``(output_json, schema_valid)`` for a row's final answer.

    ``output_json`` is the answer parsed as JSON and re-serialised compactly
    (``None`` when it is not JSON: NaN/Infinity are not JSON either).
    ``schema_valid`` is jsonschema's verdict (``None`` without a schema; ``False``
    when the answer is not JSON, or the schema is unusable, or needs a remote $ref).
    Raises :class:`AnswerCheckFailed` when the check ran past its deadline or meets a pattern
    RE2 cannot run.
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
    _deadline.at = time.monotonic() + ANSWER_CHECK_SECONDS
    try:
        return output_json, validator.is_valid(value)
    except _PastDeadline:
        raise AnswerCheckFailed(f"checking the answer against its schema took over {ANSWER_CHECK_SECONDS:g} s "
                                "(the schema is too costly to check); the answer is not marked valid") from None
    except AnswerCheckFailed:
        raise
    except Exception:  # referencing.exceptions.Unresolvable, RecursionError and friends: cannot say it is valid
        return output_json, False
    finally:
        _deadline.at = float("inf")


def _refuse_retrieval(uri: str):
    raise LookupError(f"remote $ref {uri!r} is not fetched")


@lru_cache(maxsize=1)
def offline_registry():
    """A :class:`referencing.Registry` that never retrieves a resource."""
    import referencing

    return referencing.Registry(retrieve=_refuse_retrieval)


@lru_cache(maxsize=256)
def _answer_validator(schema_text: str):
    """A bounded, linear-regex jsonschema validator for the schema text (cached: a job has few
    schemas and many rows), or None when the schema is unusable."""
    try:
        schema = parse_schema(schema_text)
        check_schema(schema)
    except SchemaRefused:
        return None
    return _bounded_class(validator_class(schema))(schema, registry=offline_registry())


# --------------------------------------------------------------------------- linear-time patterns

_ECMA_UNICODE_ESCAPE = re.compile(r"(?<!\\)((?:\\\\)*)\\u([0-9A-Fa-f]{4})")
_RE2_OPTIONS = re2.Options()
_RE2_OPTIONS.log_errors = False  # a refused pattern is reported on its row, not on stderr


@lru_cache(maxsize=1024)
def _regex(pattern: str):
    """The pattern compiled by RE2 (ECMA ``\\uXXXX`` as RE2's ``\\x{XXXX}``)."""
    translated = _ECMA_UNICODE_ESCAPE.sub(r"\1\\x{\2}", pattern)
    try:
        return re2.compile(translated, _RE2_OPTIONS)
    except re2.error as err:
        raise AnswerCheckFailed(f"pattern {pattern!r} cannot be checked in linear time ({err}); "
                                "the answer is not marked valid") from None


def _matches(pattern: str, text: str) -> bool:
    return _regex(pattern).search(text) is not None


def _pattern(validator, pattern, instance, schema):
    from jsonschema.exceptions import ValidationError

    if validator.is_type(instance, "string") and not _matches(pattern, instance):
        yield ValidationError(f"{instance!r} does not match {pattern!r}")


def _pattern_properties(validator, pattern_properties, instance, schema):
    if not validator.is_type(instance, "object"):
        return
    for pattern, subschema in pattern_properties.items():
        for key, value in instance.items():
            if _matches(pattern, key):
                yield from validator.descend(value, subschema, path=key, schema_path=pattern)


def _additional(instance: dict, schema: dict) -> list[str]:
    """Keys neither ``properties`` nor ``patternProperties`` cover."""
    properties = schema.get("properties", {})
    patterns = list(schema.get("patternProperties", {}))
    return [k for k in instance if k not in properties and not any(_matches(p, k) for p in patterns)]


def _additional_properties(validator, additional, instance, schema):
    from jsonschema.exceptions import ValidationError

    if not validator.is_type(instance, "object"):
        return
    extras = _additional(instance, schema)
    if validator.is_type(additional, "object"):
        for extra in extras:
            yield from validator.descend(instance[extra], additional, path=extra)
    elif not additional and extras:
        yield ValidationError(f"additional properties are not allowed ({', '.join(map(repr, sorted(extras)))})")


def _evaluated_keys(validator, instance: dict, schema) -> set[str]:
    """The keys of ``instance`` that ``schema``'s applicators evaluate (JSON Schema 2020-12,
    as jsonschema's own ``find_evaluated_property_keys_by_schema``, patterns through RE2)."""
    if validator.is_type(schema, "boolean"):
        return set()
    keys: set[str] = set()
    for ref_keyword in ("$ref", "$dynamicRef"):
        if (ref := schema.get(ref_keyword)) is not None:
            resolved = validator._resolver.lookup(ref)
            keys |= _evaluated_keys(validator.evolve(schema=resolved.contents, _resolver=resolved.resolver),
                                    instance, resolved.contents)
    properties = schema.get("properties")
    if validator.is_type(properties, "object"):
        keys |= properties.keys() & instance.keys()
    for keyword in ("additionalProperties", "unevaluatedProperties"):
        if (subschema := schema.get(keyword)) is not None:
            keys |= {k for k, v in instance.items() if _passes(validator, v, subschema)}
    for pattern in schema.get("patternProperties", {}):
        keys |= {k for k in instance if _matches(pattern, k)}
    for key, subschema in schema.get("dependentSchemas", {}).items():
        if key in instance:
            keys |= _evaluated_keys(validator, instance, subschema)
    for keyword in ("allOf", "oneOf", "anyOf"):
        for subschema in schema.get(keyword, []):
            if _passes(validator, instance, subschema):
                keys |= _evaluated_keys(validator, instance, subschema)
    if "if" in schema:
        if validator.evolve(schema=schema["if"]).is_valid(instance):
            keys |= _evaluated_keys(validator, instance, schema["if"])
            if "then" in schema:
                keys |= _evaluated_keys(validator, instance, schema["then"])
        elif "else" in schema:
            keys |= _evaluated_keys(validator, instance, schema["else"])
    return keys


def _passes(validator, instance, subschema, path=None) -> bool:
    """``instance`` is valid under ``subschema`` (descending as jsonschema does: ``$id`` scopes)."""
    return next(validator.descend(instance, subschema, path=path), None) is None


def _unevaluated_properties(validator, unevaluated, instance, schema):
    from jsonschema.exceptions import ValidationError

    if not validator.is_type(instance, "object"):
        return
    evaluated = _evaluated_keys(validator, instance, schema)
    bad = [k for k in instance if k not in evaluated and not _passes(validator, instance[k], unevaluated, path=k)]
    if bad:
        yield ValidationError(f"unevaluated properties are not valid ({', '.join(map(repr, sorted(bad)))})")


_LINEAR = {
    "pattern": _pattern,
    "patternProperties": _pattern_properties,
    "additionalProperties": _additional_properties,
    "unevaluatedProperties": _unevaluated_properties,
}

# --------------------------------------------------------------------------- deadline

_deadline = threading.local()
_deadline.at = float("inf")


class _PastDeadline(Exception):
    pass


def _checks_deadline(keyword):
    def bounded(validator, value, instance, schema):
        if time.monotonic() > getattr(_deadline, "at", float("inf")):
            raise _PastDeadline
        return keyword(validator, value, instance, schema)

    return bounded


@lru_cache(maxsize=None)
def _bounded_class(cls):
    """``cls`` with the linear-time keywords, and every keyword checking the answer's deadline."""
    import jsonschema.validators

    keywords = {k: _LINEAR.get(k, fn) for k, fn in cls.VALIDATORS.items()}
    return jsonschema.validators.extend(cls, {k: _checks_deadline(fn) for k, fn in keywords.items()})
