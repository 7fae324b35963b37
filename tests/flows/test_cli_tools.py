"""Function calling end to end on the tiny random model, a Batch file in and out through the CLI: its
choices are random, so any hole in the call grammar shows as a malformed call or invalid arguments."""

import json

import jsonschema
import pyarrow.parquet as pq
from openai.types.chat import ChatCompletion
from openai.types.responses import Response

from ossbatch.flows.cli import main

CHAT = "/v1/chat/completions"
RESPONSES = "/v1/responses"
WEATHER = {"type": "object", "properties": {"city": {"enum": ["Paris", "Oslo", "Lima"]}, "unit": {"enum": ["c", "f"]}},
           "required": ["city", "unit"], "additionalProperties": False}
LOOKUP = {"type": "object", "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 99},
                                           "exact": {"type": "boolean"}},
          "required": ["id", "exact"], "additionalProperties": False}
SCHEMAS = {"get_weather": WEATHER, "lookup": LOOKUP}
# uniqueItems: llguidance enforces this only leniently, so a call may slip; such a row must fail, never pass
PICK = {"type": "object", "properties": {"picks": {"type": "array", "items": {"enum": [1, 2]}, "minItems": 2, "maxItems": 2,
                                                   "uniqueItems": True}}, "required": ["picks"], "additionalProperties": False}


def chat_tools(strict: bool) -> list[dict]:
    return [{"type": "function", "function": {"name": name, "description": f"Calls {name}.", "parameters": schema,
                                              "strict": strict}} for name, schema in SCHEMAS.items()]


def responses_tools() -> list[dict]:  # strict by default, as the Responses API has it
    return [{"type": "function", "name": name, "description": f"Calls {name}.", "parameters": schema}
            for name, schema in SCHEMAS.items()]


def chat_line(custom_id: str, **body) -> dict:
    body.setdefault("messages", [{"role": "user", "content": "What is the weather in Oslo?"}])
    return {"custom_id": custom_id, "method": "POST", "url": CHAT, "body": {"model": "gpt-oss-20b", **body}}


def responses_line(custom_id: str, **body) -> dict:
    body.setdefault("input", "Look up item 7.")
    return {"custom_id": custom_id, "method": "POST", "url": RESPONSES, "body": {"model": "gpt-oss-20b", **body}}


EARLIER_CALL = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris","unit":"c"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'},
]


def lines() -> list[dict]:
    forced = {"type": "function", "function": {"name": "lookup"}}
    return [
        *(chat_line(f"named-{i}", tools=chat_tools(False), tool_choice=forced, parallel_tool_calls=False) for i in range(3)),
        *(chat_line(f"required-{i}", tools=chat_tools(False), tool_choice="required") for i in range(3)),
        *(chat_line(f"strict-auto-{i}", tools=chat_tools(True)) for i in range(2)),
        chat_line("none", messages=EARLIER_CALL, tools=chat_tools(True), tool_choice="none"),
        *(responses_line(f"resp-{i}", tools=responses_tools(), tool_choice="required") for i in range(2)),
        responses_line("resp-none", tools=responses_tools(), tool_choice="none", input=[
            {"role": "user", "content": "Weather in Paris?"},
            {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city":"Paris","unit":"c"}'},
            {"type": "function_call_output", "call_id": "call_1", "output": '{"temp": 21}'}]),
        chat_line("bad-tool", tools=[{"type": "function", "function": {"name": "x", "parameters": {"type": "objekt"}}}]),
        *(chat_line(f"lenient-{i}", tools=[{"type": "function", "function": {"name": "pick", "parameters": PICK}}],
                    tool_choice="required") for i in range(4)),
    ]


def test_strict_tools_end_to_end(tiny_model_dir, tmp_path):
    inp = tmp_path / "batch.jsonl"
    inp.write_text("".join(json.dumps(line) + "\n" for line in lines()))
    out = tmp_path / "out.jsonl"
    assert main(["run", "--model", str(tiny_model_dir), "--input", str(inp), "--output", str(out), "--orchestrator", "none",
                 "--quiet", "--temperature", "1.0", "--max-tokens", "96", "--max-reasoning-tokens", "4",
                 "--served-model-name", "gpt-oss-20b"]) == 0
    errors = tmp_path / "out.errors.jsonl"  # failed lines go to the error file
    text = out.read_text() + (errors.read_text() if errors.exists() else "")
    by_id = {line["custom_id"]: line for line in map(json.loads, text.splitlines())}
    assert set(by_id) == {line["custom_id"] for line in lines()}

    bad = by_id.pop("bad-tool")  # an invalid request: OpenAI's 400 line
    assert bad["response"]["status_code"] == 400
    assert "body.tools[0].function.parameters: not a valid JSON Schema" in bad["response"]["body"]["error"]["message"]
    for i in range(4):
        line = by_id.pop(f"lenient-{i}")
        if line["error"] is not None:  # a row that failed while running: the Batch error object
            assert "tool call pick: arguments do not match the function's parameters" in line["error"]["message"]
        else:
            for call in ChatCompletion.model_validate(line["response"]["body"]).choices[0].message.tool_calls or []:
                jsonschema.validate(json.loads(call.function.arguments), PICK)
    calls = {}
    for custom_id, line in by_id.items():
        assert line["error"] is None, line
        body = line["response"]["body"]
        if custom_id.startswith("resp"):
            response = Response.model_validate(body)
            made = [(item.name, item.arguments) for item in response.output if item.type == "function_call"]
            assert all(item.call_id.startswith("call_") for item in response.output if item.type == "function_call")
            finished = response.status == "completed"
        else:
            (choice,) = ChatCompletion.model_validate(body).choices
            made = [(c.function.name, c.function.arguments) for c in choice.message.tool_calls or []]
            assert (choice.finish_reason == "tool_calls") == bool(made)
            finished = choice.finish_reason != "length"
        assert len(made) <= 1  # one call per turn, as harmony ends a turn at its call
        for name, arguments in made:
            jsonschema.validate(json.loads(arguments), SCHEMAS[name])
        if finished and not custom_id.endswith("none") and not custom_id.startswith("strict-auto"):
            assert made, custom_id  # a forced call is made unless the row ran out of tokens
        if custom_id.startswith("named") and made:
            assert made[0][0] == "lookup"
        if custom_id.endswith("none"):
            assert not made
        calls[custom_id] = made
    assert sum(map(len, calls.values())) >= 3

    parts = sorted((tmp_path / "out.jsonl.parts" / "data").glob("part-*.parquet"))
    assert parts and all("tool_calls" in pq.read_schema(part).names for part in parts)
    rows = [row for part in parts for row in pq.read_table(part).to_pylist()]
    assert sum(bool(row["tool_calls"]) for row in rows if row["id"] in calls) == sum(map(len, calls.values()))
    for row in rows:
        if row["tool_calls"] and row["id"] in calls:
            assert row["finish_reason"] == "tool_calls" and row["status"] == "ok"
            assert [(c["name"], c["arguments"]) for c in row["tool_calls"]] == calls[row["id"]]
            assert row["reasoning_tokens"] + row["output_tokens"] == row["completion_tokens"]
