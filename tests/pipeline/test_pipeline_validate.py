"""Validation: every bad row becomes an error request whose message names the place and the field."""

import json

import jsonschema
import pytest
from pipeline_fakes import write_jsonl

from ossbatch.pipeline.read import read_requests
from ossbatch.pipeline.validate import REQUEST_KEYS, load_schema, normalize


def one(record: dict) -> dict:
    request = normalize(record, fallback_id="in.jsonl:7", where="in.jsonl line 7")
    assert set(request) == set(REQUEST_KEYS)
    return request


@pytest.mark.parametrize("name", ["request.schema.json", "output.schema.json", "manifest.schema.json"])
def test_schemas_are_valid_draft_2020_12(name):
    schema = load_schema(name)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    jsonschema.Draft202012Validator.check_schema(schema)


@pytest.mark.parametrize("record, message", [
    ({"id": "x"}, "in.jsonl line 7: a row needs exactly one of 'prompt' (a string) or 'messages'"),
    ({"id": "x", "prompt": "p", "reasoning_effort": "extreme"},
     "in.jsonl line 7: reasoning_effort: unknown reasoning effort 'extreme'; allowed: low, medium, high"),
    ({"id": "x", "prompt": "p", "max_tokens": 0}, "max_tokens: must be a positive integer, got 0"),
    ({"id": "x", "prompt": "p", "max_tokens": "12"}, "max_tokens: must be a positive integer, got '12'"),
    ({"id": "x", "prompt": "p", "max_tokens": True}, "max_tokens: must be a positive integer, got true"),
    ({"id": "x", "prompt": "p", "temperature": 3}, "temperature: must be a number from 0 to 2, got 3"),
    ({"id": "x", "prompt": "p", "top_p": 0}, "top_p: must be a number in (0, 1], got 0"),
    ({"id": "x", "prompt": 5}, "prompt: must be a non-empty string, got 5"),
    ({"id": "x", "messages": [{"role": "robot", "content": "c"}]},
     "messages[0].role: unsupported role 'robot'; allowed: system, developer, user, assistant, tool"),
    ({"id": "x", "messages": [{"role": "tool", "content": "c"}]}, "messages[0].tool_call_id: missing"),
    ({"id": "x", "messages": [{"role": "user"}]}, "messages[0].content: missing"),
    ({"id": "x", "messages": [{"role": "system", "content": "only instructions"}]},
     "messages: needs at least one user or assistant message"),
    ({"id": "x", "prompt": "p", "schema": "{not json"}, "schema: not valid JSON"),
    ({"id": "x", "prompt": "p", "schema": {"type": "objekt"}}, "schema: not a valid JSON Schema"),
    ({"id": ["x"], "prompt": "p"}, "id: must be a non-empty string or an integer"),
])
def test_bad_rows_name_their_field(record, message):
    request = one(record)
    assert message in request["error"]
    assert request["error"].startswith("in.jsonl line 7: ")


def test_bad_json_line_names_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", [{"id": "ok", "prompt": "fine"}, '{"id": "broken", "prompt": '])
    good, bad = read_requests(path)
    assert good["error"] is None
    assert bad["id"] == "in.jsonl:2"
    assert bad["error"] == f"{path} line 2: not valid JSON (Expecting value at column 28)"


def test_plain_row_normalization():
    request = one({
        "id": 42, "instructions": "Answer briefly.",
        "messages": [{"role": "system", "content": "You are terse."},
                     {"role": "user", "content": [{"type": "text", "text": "part one"}, {"type": "input_text", "text": "part two"}]}],
        "reasoning_effort": "low", "max_tokens": 64.0, "temperature": 0, "top_p": 1, "seed": 7,
        "max_reasoning_tokens": 32, "schema": '{"type": "object"}', "source": "crawl", "custom_id": "kept",
        "top_k": None,
    })
    assert request == {
        "id": "42", "messages": [{"role": "user", "content": "part one\npart two"}],
        "instructions": "Answer briefly.\n\nYou are terse.", "reasoning_effort": "low", "max_tokens": 64,
        "temperature": 0.0, "top_p": 1.0, "seed": 7, "max_reasoning_tokens": 32, "schema": '{"type":"object"}',
        "stop": None, "logit_bias": None, "presence_penalty": None, "frequency_penalty": None,
        "request_kind": "row", "passthrough": {"source": "crawl", "custom_id": "kept", "top_k": None}, "error": None,
        "tools": None, "tool_choice": None, "logprobs": None, "top_logprobs": None,
    }


def test_nulls_count_as_absent():
    request = one({"id": None, "prompt": "p", "max_tokens": None, "reasoning_effort": None})
    assert request["error"] is None and request["id"] == "in.jsonl:7" and request["max_tokens"] is None


def test_chat_batch_line():
    request = one({"custom_id": "req-1", "method": "POST", "url": "/v1/chat/completions", "body": {
        "model": "gpt-oss-120b",
        "messages": [{"role": "developer", "content": "Use JSON."}, {"role": "system", "content": "Be kind."},
                     {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                     {"role": "user", "content": "Again"}],
        "max_completion_tokens": 100, "max_tokens": 5, "reasoning_effort": "high", "temperature": 0.7,
        "top_p": 0.9, "seed": 1, "n": 1, "stream": False,
        "response_format": {"type": "json_schema", "json_schema": {"name": "a", "strict": True, "schema": {"type": "object"}}},
    }})
    assert request["error"] is None
    assert request["id"] == "req-1" and request["request_kind"] == "chat"
    assert request["instructions"] == "Use JSON.\n\nBe kind."
    assert [m["role"] for m in request["messages"]] == ["user", "assistant", "user"]
    assert (request["max_tokens"], request["reasoning_effort"], request["temperature"], request["top_p"], request["seed"]) == (100, "high", 0.7, 0.9, 1)
    assert json.loads(request["schema"]) == {"type": "object"}
    # the model it asked for, and what its output echoes (nothing but the endpoint here)
    assert request["passthrough"] == {"model": "gpt-oss-120b", "batch_echo": '{"body": {}, "kind": "chat"}'}


def test_responses_batch_line():
    request = one({"custom_id": "r", "method": "POST", "url": "/v1/responses", "body": {
        "model": "gpt-oss-20b", "instructions": "Be brief.",
        "input": [{"type": "message", "role": "system", "content": "No emoji."},
                  {"role": "user", "content": [{"type": "input_text", "text": "Name a color"}]}],
        "reasoning": {"effort": "medium"}, "max_output_tokens": 50,
        "text": {"format": {"type": "json_schema", "name": "c", "schema": {"type": "object", "properties": {"c": {"type": "string"}}}}},
    }})
    assert request["error"] is None and request["request_kind"] == "responses"
    assert request["instructions"] == "Be brief.\n\nNo emoji."
    assert request["messages"] == [{"role": "user", "content": "Name a color"}]
    assert (request["reasoning_effort"], request["max_tokens"]) == ("medium", 50)
    assert json.loads(request["schema"])["properties"] == {"c": {"type": "string"}}
    plain = one({"custom_id": "s", "url": "/v1/responses", "body": {"input": "Hi", "text": {"format": {"type": "json_object"}}}})
    assert plain["messages"] == [{"role": "user", "content": "Hi"}] and plain["schema"] == '{"type":"object"}'


@pytest.mark.parametrize("line, message", [
    ({"custom_id": "b", "method": "POST", "url": "/v1/embeddings", "body": {"input": "x"}},
     "url: unsupported endpoint '/v1/embeddings'; allowed: /v1/chat/completions, /v1/responses"),
    ({"custom_id": "b", "method": "GET", "url": "/v1/chat/completions", "body": {"messages": [{"role": "user", "content": "x"}]}},
     "method: must be POST"),
    ({"custom_id": "b", "url": "/v1/chat/completions", "body": {"messages": [{"role": "user", "content": "x"}], "reasoning_effort": "minimal"}},
     "body.reasoning_effort: unknown reasoning effort 'minimal'; allowed: low, medium, high"),
    ({"custom_id": "b", "url": "/v1/chat/completions", "body": {"messages": [{"role": "user", "content": "x"}], "n": 129}},
     "body.n: must be an integer from 1 to 128"),
    ({"custom_id": "b", "url": "/v1/chat/completions", "body": {"messages": [{"role": "user", "content": "x"}], "n": 0}},
     "body.n: must be an integer from 1 to 128"),
    ({"custom_id": "b", "url": "/v1/responses", "body": {"input": "x", "n": 3}},
     "body.n: only n=1 is supported"),
    ({"custom_id": "b", "url": "/v1/chat/completions", "body": {"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": -1}},
     "body.max_completion_tokens: must be a positive integer, got -1"),
    ({"custom_id": "b", "url": "/v1/responses", "body": {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "u"}]}]}},
     "body.input[0].content[0].type: unsupported content part type 'input_image'"),
    ({"custom_id": "b", "url": "/v1/responses", "body": {"input": "x", "reasoning": {"effort": "max"}}},
     "body.reasoning.effort: unknown reasoning effort 'max'"),
    ({"url": "/v1/chat/completions", "body": {"messages": [{"role": "user", "content": "x"}]}}, "custom_id: missing"),
    ({"custom_id": "b", "url": "/v1/chat/completions", "body": {}}, "body.messages: missing"),
])
def test_bad_batch_lines_name_their_field(line, message):
    request = one(line)
    assert message in request["error"], request["error"]
