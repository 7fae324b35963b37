"""Function calling through harmony: tools validated, rendered token-exact to openai-harmony,
calls forced and constrained by the grammar, parsed into tool_calls, written as the Batch API does."""

import json

import jsonschema
import pytest
from constraint_driver import run_random
from openai.types.chat import ChatCompletion
from openai.types.responses import Response
from openai_harmony import (
    Author, Conversation, DeveloperContent, Message, ReasoningEffort, Role, SystemContent, ToolDescription,
)

from ossbatch.pipeline.batch_api import batch_output_line
from ossbatch.pipeline.grammar import compile_row_grammar
from ossbatch.pipeline.harmony import CALL, CHANNEL, CONSTRAIN, MESSAGE, RETURN, START, harmony_encoding
from ossbatch.pipeline.parse import parse_completion
from ossbatch.pipeline.render import render_prompt
from ossbatch.pipeline.tools import CallSpec, call_spec
from ossbatch.pipeline.validate import normalize

CHAT = "/v1/chat/completions"
RESPONSES = "/v1/responses"
WEATHER = {"type": "object", "properties": {"city": {"enum": ["Paris", "Oslo", "Lima"]},
                                            "unit": {"enum": ["c", "f"]}},
           "required": ["city", "unit"], "additionalProperties": False}
LOOKUP = {"type": "object", "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 99}},
          "required": ["id"], "additionalProperties": False}


def chat_tool(name: str, parameters: dict | None, **extra) -> dict:
    function = {"name": name, "description": f"The {name} function.", **extra}
    if parameters is not None:
        function["parameters"] = parameters
    return {"type": "function", "function": function}


def chat_request(body: dict, custom_id: str = "c") -> dict:
    request = normalize({"custom_id": custom_id, "method": "POST", "url": CHAT, "body": body},
                        fallback_id="in:1", where="in.jsonl line 1")
    return request


def responses_request(body: dict, custom_id: str = "r") -> dict:
    return normalize({"custom_id": custom_id, "method": "POST", "url": RESPONSES, "body": body},
                     fallback_id="in:1", where="in.jsonl line 1")


def harmony_conversation(preamble: bool) -> list[int]:
    """The conversation built by hand with openai-harmony, rendered for completion."""
    tools = [ToolDescription.new("get_weather", "The get_weather function.", WEATHER),
             ToolDescription.new("ping", "The ping function.")]
    developer = DeveloperContent.new().with_instructions("Use tools.").with_function_tools(tools)
    call = (Message.from_role_and_content(Role.ASSISTANT, '{"city":"Paris","unit":"c"}').with_channel("commentary")
            .with_recipient("functions.get_weather").with_content_type("<|constrain|>json"))
    result = (Message.from_author_and_content(Author.new(Role.TOOL, "functions.get_weather"), '{"temp": 21}')
              .with_channel("commentary").with_recipient("assistant"))
    messages = [
        Message.from_role_and_content(Role.SYSTEM, SystemContent.new().with_reasoning_effort(ReasoningEffort.LOW)),
        Message.from_role_and_content(Role.DEVELOPER, developer),
        Message.from_role_and_content(Role.USER, "Weather in Paris?"),
        *([Message.from_role_and_content(Role.ASSISTANT, "Checking.").with_channel("commentary")] if preamble else []),
        call,
        result,
        Message.from_role_and_content(Role.USER, "And in Fahrenheit?"),
    ]
    return harmony_encoding().render_conversation_for_completion(Conversation.from_messages(messages), Role.ASSISTANT)


def test_a_conversation_with_a_tool_result_renders_token_exact_to_harmony():
    body = {
        "messages": [
            {"role": "system", "content": "Use tools."},
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": "Checking.", "tool_calls": [{"id": "call_1", "type": "function", "function": {
                "name": "get_weather", "arguments": '{"city":"Paris","unit":"c"}'}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'},
            {"role": "user", "content": "And in Fahrenheit?"},
        ],
        "tools": [chat_tool("get_weather", WEATHER), chat_tool("ping", None)],
        "reasoning_effort": "low",
    }
    request = chat_request(body)
    assert request["error"] is None
    tokens = render_prompt(request["messages"], request["instructions"], request["reasoning_effort"], None, request["tools"])
    assert tokens == harmony_conversation(preamble=True)
    text = harmony_encoding().decode(tokens)
    assert "type get_weather = (_: {" in text and "<|start|>functions.get_weather to=assistant<|channel|>commentary" in text

    # the same conversation as Responses input items (no preamble: function_call items carry none)
    items = {
        "instructions": "Use tools.", "reasoning": {"effort": "low"},
        "input": [
            {"role": "user", "content": "Weather in Paris?"},
            {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city":"Paris","unit":"c"}'},
            {"type": "function_call_output", "call_id": "call_1", "output": '{"temp": 21}'},
            {"role": "user", "content": "And in Fahrenheit?"},
        ],
        "tools": [{"type": "function", "name": "get_weather", "description": "The get_weather function.", "parameters": WEATHER},
                  {"type": "function", "name": "ping", "description": "The ping function."}],
    }
    request = responses_request(items)
    assert request["error"] is None
    tokens = render_prompt(request["messages"], request["instructions"], request["reasoning_effort"], None, request["tools"])
    assert tokens == harmony_conversation(preamble=False)


def test_tools_and_tool_choice_are_normalized():
    request = chat_request({"messages": [{"role": "user", "content": "x"}], "parallel_tool_calls": False,
                            "tools": [chat_tool("get_weather", WEATHER, strict=True), chat_tool("ping", None)],
                            "tool_choice": {"type": "function", "function": {"name": "ping"}}})
    assert request["error"] is None
    assert request["tools"] == [
        {"name": "get_weather", "description": "The get_weather function.", "parameters": json.dumps(WEATHER, separators=(",", ":")),
         "strict": True},
        {"name": "ping", "description": "The ping function.", "parameters": None, "strict": False}]
    assert request["tool_choice"] == {"name": "ping"}
    # Responses function tools are strict unless they say otherwise, as OpenAI's are
    request = responses_request({"input": "x", "tool_choice": "required", "parallel_tool_calls": True,
                                 "tools": [{"type": "function", "name": "a", "parameters": LOOKUP},
                                           {"type": "function", "name": "b", "strict": False}]})
    assert [t["strict"] for t in request["tools"]] == [True, False] and request["tool_choice"] == "required"


@pytest.mark.parametrize("body, message", [
    ({"tools": [{"type": "retrieval"}]}, "body.tools[0].type: only function tools are supported, got 'retrieval'"),
    ({"tools": [{"type": "function"}]}, "body.tools[0].function: missing"),
    ({"tools": [chat_tool("get weather!", None)]}, "body.tools[0].function.name: must be 1 to 64 letters"),
    ({"tools": [chat_tool("a", None), chat_tool("a", None)]}, "body.tools[1].function.name: function 'a' is defined twice"),
    ({"tools": [chat_tool("a", {"type": "objekt"})]}, "body.tools[0].function.parameters: not a valid JSON Schema"),
    ({"tools": [chat_tool("a", "{oops")]}, "body.tools[0].function.parameters: not valid JSON"),
    ({"tools": [chat_tool("a", None, strict="yes")]}, "body.tools[0].function.strict: must be true or false"),
    ({"tools": [chat_tool("a", None, description=3)]}, "body.tools[0].function.description: must be a string"),
    ({"tools": "get_weather"}, "body.tools: must be a list of function tools"),
    ({"tool_choice": "required"}, "body.tool_choice: is only allowed when tools are given"),  # auto/none ask for no call
    ({"tools": [chat_tool("a", None)], "tool_choice": "always"}, "body.tool_choice: unknown value 'always'"),
    ({"tools": [chat_tool("a", None)], "tool_choice": {"type": "function", "function": {"name": "b"}}},
     "body.tool_choice.function.name: names no function among the tools: 'b'"),
    ({"tools": [chat_tool("a", None)], "parallel_tool_calls": "no"}, "body.parallel_tool_calls: must be true or false"),
    ({"functions": [{"name": "a"}]}, "body.functions: not supported (the deprecated form: use tools)"),
])
def test_bad_tool_definitions_fail_their_line_naming_the_field(body, message):
    request = chat_request({"messages": [{"role": "user", "content": "x"}], **body})
    assert request["error"] is not None and message in request["error"], request["error"]


@pytest.mark.parametrize("messages, message", [
    ([{"role": "user", "content": "x"}, {"role": "tool", "tool_call_id": "nope", "content": "1"}],
     "body.messages[1].tool_call_id: 'nope' is the id of no earlier assistant tool call"),
    ([{"role": "user", "content": "x"}, {"role": "tool", "content": "1"}], "body.messages[1].tool_call_id: missing"),
    ([{"role": "user", "content": "x"}, {"role": "assistant", "content": None, "tool_calls": [{"id": "c", "type": "function",
      "function": {"name": "a", "arguments": {"k": 1}}}]}], "body.messages[1].tool_calls[0].function.arguments: must be the arguments as JSON text"),
    ([{"role": "user", "content": "x"}, {"role": "assistant", "content": None}], "body.messages[1].content"),
])
def test_bad_tool_messages_fail_their_line_naming_the_field(messages, message):
    request = chat_request({"messages": messages})
    assert request["error"] is not None and message in request["error"], request["error"]


def test_a_responses_output_without_its_call_names_the_item():
    request = responses_request({"input": [{"role": "user", "content": "x"},
                                           {"type": "function_call_output", "call_id": "gone", "output": "1"}]})
    assert "body.input[1].call_id: 'gone' is the id of no earlier assistant tool call" in request["error"]


def test_tool_choice_decides_the_grammar():
    strict = [{"name": "a", "parameters": json.dumps(LOOKUP), "strict": True}]
    loose = [{"name": "a", "parameters": json.dumps(LOOKUP), "strict": False}, {"name": "b", "parameters": None, "strict": False}]
    assert call_spec(None, None) is None and call_spec(loose, "auto") is None and call_spec(loose, None) is None
    assert call_spec(loose, "none") == CallSpec((), True)
    assert call_spec(strict, None) == CallSpec((("a", json.dumps(LOOKUP)),), True)
    required = call_spec(loose, "required")
    assert required.final is False and [name for name, _ in required.functions] == ["a", "b"]
    assert call_spec(loose, {"name": "b"}).functions == (("b", '{"type":"object","properties":{},"additionalProperties":false}'),)


def _header_tokens(name: str) -> list[int]:
    enc = harmony_encoding()
    return [CHANNEL, *enc.encode(f"commentary to=functions.{name} "), CONSTRAIN, *enc.encode("json"), MESSAGE]


def test_random_logits_make_only_well_formed_calls_valid_under_their_schema():
    """Forced and allowed calls, driven by random logits as the engine drives the masks: every row is a
    harmony completion harmony parses, each call's header is exactly the forced tokens, its arguments
    validate against the function's parameters, and the token counts add up to the completion."""
    tools = [{"name": "get_weather", "parameters": json.dumps(WEATHER), "strict": True},
             {"name": "lookup", "parameters": json.dumps(LOOKUP), "strict": False}]
    schemas = {"get_weather": WEATHER, "lookup": LOOKUP}
    choices = ["required", {"name": "lookup"}, "auto", "none"] * 6
    grammars = [compile_row_grammar(None, 8, call_spec(tools, choice)) for choice in choices]
    results, constraint = run_random(grammars, seed=3, steps=160, stops=(RETURN, CALL))
    assert constraint.errors() == [None] * len(choices)
    calls = finals = 0
    for choice, result in zip(choices, results):
        if not result.finished:
            continue
        tokens = result.tokens
        parsed = parse_completion(tokens, "stop", frozenset(schemas))
        assert parsed.status == "ok", parsed.error
        assert parsed.reasoning_tokens + parsed.output_tokens == len(tokens)
        if tokens[-1] == CALL:
            calls += 1
            assert choice != "none"
            (call,) = parsed.tool_calls
            assert parsed.finish_reason == "tool_calls" and parsed.output_text is None
            if isinstance(choice, dict):
                assert call["name"] == choice["name"]
            jsonschema.validate(json.loads(call["arguments"]), schemas[call["name"]])
            start = tokens.index(CHANNEL, len(tokens) - parsed.output_tokens)
            header = _header_tokens(call["name"])
            assert tokens[start:start + len(header)] == header
            assert parsed.output_tokens == len(tokens) - start  # the call from its <|channel|>: output
        else:
            finals += 1
            assert choice in ("auto", "none") and parsed.tool_calls is None and parsed.finish_reason == "stop"
    assert calls >= 6 and finals >= 1


def test_parse_names_a_call_to_an_unknown_function():
    enc = harmony_encoding()
    tokens = enc.encode('<|channel|>commentary to=functions.rm_rf <|constrain|>json<|message|>{}<|call|>', allowed_special="all")
    parsed = parse_completion(tokens, "stop", frozenset({"get_weather"}))
    assert parsed.status == "error" and "functions.rm_rf" in parsed.error and "get_weather" in parsed.error
    assert "has no tools" in parse_completion(tokens, "stop").error
    cut = parse_completion(tokens[:6], "length", frozenset({"rm_rf"}))
    assert cut.status == "length" and cut.tool_calls is None and cut.finish_reason == "length"


def test_a_call_after_reasoning_counts_as_output():
    enc = harmony_encoding()
    text = ('<|channel|>analysis<|message|>need weather<|end|><|start|>assistant'
            '<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"city":"Oslo","unit":"c"}<|call|>')
    tokens = enc.encode(text, allowed_special="all")
    parsed = parse_completion(tokens, "stop", frozenset({"get_weather"}))
    assert parsed.tool_calls == [{"name": "get_weather", "arguments": '{"city":"Oslo","unit":"c"}'}]
    assert parsed.reasoning_text == "need weather" and parsed.finish_reason == "tool_calls"
    call_start = max(i for i, t in enumerate(tokens) if t == START) + 2
    assert parsed.output_tokens == len(tokens) - call_start
    assert parsed.reasoning_tokens == call_start


def test_batch_lines_with_a_call_parse_with_the_openai_sdk():
    row = {"id": "w", "status": "ok", "finish_reason": "tool_calls", "output_text": None, "reasoning_text": "think",
           "prompt_tokens": 10, "reasoning_tokens": 3, "output_tokens": 9, "completion_tokens": 12, "request_kind": "chat",
           "tool_calls": [{"id": "call_abc", "name": "get_weather", "arguments": '{"city":"Oslo","unit":"c"}'}]}
    chat = ChatCompletion.model_validate(batch_output_line(row, model="gpt-oss-20b", created=1, job_key="k")["response"]["body"])
    choice = chat.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert (call.id, call.type, call.function.name) == ("call_abc", "function", "get_weather")
    assert json.loads(call.function.arguments) == {"city": "Oslo", "unit": "c"}

    response = Response.model_validate(
        batch_output_line(dict(row, request_kind="responses"), model="gpt-oss-20b", created=1, job_key="k")["response"]["body"])
    assert [item.type for item in response.output] == ["reasoning", "function_call"]
    item = response.output[1]
    assert (item.call_id, item.name, item.arguments) == ("call_abc", "get_weather", '{"city":"Oslo","unit":"c"}')
    assert response.output_text == ""


def test_tools_without_instructions_render_token_exact_to_harmony():
    request = chat_request({"messages": [{"role": "user", "content": "Look up 7"}], "tools": [chat_tool("lookup", LOOKUP)]})
    tokens = render_prompt(request["messages"], request["instructions"], "medium", None, request["tools"])
    developer = DeveloperContent.new().with_function_tools([ToolDescription.new("lookup", "The lookup function.", LOOKUP)])
    expected = harmony_encoding().render_conversation_for_completion(Conversation.from_messages([
        Message.from_role_and_content(Role.SYSTEM, SystemContent.new().with_reasoning_effort(ReasoningEffort.MEDIUM)),
        Message.from_role_and_content(Role.DEVELOPER, developer),
        Message.from_role_and_content(Role.USER, "Look up 7"),
    ]), Role.ASSISTANT)
    assert tokens == expected
    assert "# Instructions" not in harmony_encoding().decode(tokens)
    # without tools, the system message says nothing of function calls
    plain = harmony_encoding().decode(render_prompt(request["messages"]))
    assert "functions" not in plain and "# Tools" not in plain
