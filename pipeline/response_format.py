"""A row's response format: its JSON Schema text, checked, and the harmony section that shows it
to the model. The grammar (``grammar.py``) and the answer check (``answer.py``) start from here."""

from __future__ import annotations

import json
from typing import Any

__all__ = ["SchemaRefused", "check_schema", "parse_schema", "response_format_section", "validator_class"]


class SchemaRefused(ValueError):
    """A row's response format (or reasoning budget) that cannot be enforced.

    The message says what was refused: invalid JSON, an invalid JSON Schema
    (and where), or the keyword/feature llguidance cannot compile even leniently
    (remote ``$ref``, look-around in ``pattern``, an unsatisfiable schema, ...).
    The caller marks that row as an error; the job goes on.
    """


def parse_schema(schema_text: str) -> Any:
    """The schema text as JSON (an object or a boolean); raises :class:`SchemaRefused`."""
    if not isinstance(schema_text, str):
        raise SchemaRefused(f"response format must be JSON Schema text, got {type(schema_text).__name__}")
    try:
        schema = json.loads(schema_text, parse_constant=reject_constant)
    except (ValueError, RecursionError) as e:
        raise SchemaRefused(f"response format is not valid JSON: {e}") from None
    if not isinstance(schema, (dict, bool)):
        raise SchemaRefused(f"a JSON Schema must be an object or a boolean, got {type(schema).__name__}")
    return schema


def reject_constant(name: str):
    """``json.loads``'s ``parse_constant``: NaN and Infinity are not JSON."""
    raise ValueError(f"{name} is not JSON")


def validator_class(schema: Any):
    """jsonschema's validator class for the schema's ``$schema`` (draft 2020-12 by default)."""
    import jsonschema.validators

    return jsonschema.validators.validator_for(schema, default=jsonschema.validators.Draft202012Validator)


def check_schema(schema: Any) -> None:
    """Raises :class:`SchemaRefused`, naming where, for a schema its metaschema rejects."""
    import jsonschema.exceptions

    try:
        validator_class(schema).check_schema(schema)
    except jsonschema.exceptions.SchemaError as e:
        where = "/".join(str(p) for p in e.absolute_path) or "(root)"
        raise SchemaRefused(f"invalid JSON Schema at {where}: {e.message}") from None


def response_format_section(schema_text: str, name: str = "response") -> str:
    """The harmony ``# Response Formats`` section for a row's schema.

    Appended (after a blank line) to the developer instructions::

        # Response Formats

        ## {name}

        // {schema description, when the schema has a top-level one}
        {schema as compact JSON}

    Raises :class:`SchemaRefused` when ``schema_text`` is not JSON.
    """
    schema = parse_schema(schema_text)
    name = " ".join(str(name).split()) or "response"
    lines = ["# Response Formats", "", f"## {name}", ""]
    if isinstance(schema, dict) and isinstance(schema.get("description"), str) and schema["description"].strip():
        lines.append("// " + " ".join(schema["description"].split()))
    lines.append(json.dumps(schema, separators=(",", ":"), ensure_ascii=False))
    return "\n".join(lines)
