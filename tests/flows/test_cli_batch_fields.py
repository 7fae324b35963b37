"""Every field of the Batch table (pipeline/batch_fields.py) in one file through `ossbatch run` on the
tiny model: each line parses with the openai SDK's models, honoured fields have their effect,
refused and unknown fields and a wrong model fail their own line (400), and failures go to the
error file."""

import json

import pytest
from openai.types.chat import ChatCompletion
from openai.types.responses import Response
from openai.types.shared import ErrorObject

from flow_helpers import ossbatch, write_jsonl
from ossbatch.pipeline.batch_fields import CHAT_FIELDS, RESPONSES_FIELDS, fields_markdown
from ossbatch.pipeline.harmony import harmony_encoding

CHAT, RESPONSES = "/v1/chat/completions", "/v1/responses"
SCHEMA = {"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"], "additionalProperties": False}
FORMAT = {"type": "json_schema", "json_schema": {"name": "x", "strict": True, "schema": SCHEMA}}
MESSAGES = [{"role": "developer", "content": "Answer in JSON."}, {"role": "user", "content": "Give me a number"}]
SERVED = "my-gpt"
FOLDER = "<the checkpoint folder's name>"  # filled in by the fixture


def banana() -> int:
    (token,) = harmony_encoding().encode(" banana", allowed_special=set())
    return token


def chat(custom_id, **body):
    return {"custom_id": custom_id, "method": "POST", "url": CHAT,
            "body": {"model": SERVED, "messages": MESSAGES, "max_completion_tokens": 24, **body}}


def responses(custom_id, **body):
    return {"custom_id": custom_id, "method": "POST", "url": RESPONSES,
            "body": {"model": SERVED, "input": "Give me a number", **body}}


# Succeeding lines: every honoured and accepted field, with values that ask for nothing refused.
OK_LINES = [
    chat("answer", model=FOLDER, response_format=FORMAT, temperature=0),
    chat("stopped", response_format=FORMAT, temperature=0, stop=[":", "never-there"]),
    chat("biased", temperature=0, logit_bias={str(banana()): 20}),
    chat("penalised", temperature=0, logit_bias={str(banana()): 20}, presence_penalty=2, frequency_penalty=2),
    chat("everything", model=SERVED, messages=MESSAGES, max_tokens=24, temperature=0.7, top_p=0.9, seed=5, n=2,
         reasoning_effort="low", response_format={"type": "json_object"}, stop="}", logit_bias={"0": -1},
         presence_penalty=0.1, frequency_penalty=0.1, user="u-1", metadata={"team": "nightly"}, store=False,
         service_tier="flex", prompt_cache_key="k", safety_identifier="s", stream=False, stream_options=None,
         logprobs=False, top_logprobs=0, modalities=["text"], verbosity="medium", tools=[], tool_choice="none",
         parallel_tool_calls=True, functions=[], function_call="auto", audio=None, prediction=None,
         web_search_options=None),
    responses("r-echo", model=FOLDER, instructions="Be brief.", max_output_tokens=24, temperature=0, top_p=0.5, seed=3, n=1,
              reasoning={"effort": "low", "summary": None}, text={"format": {"type": "json_schema", "name": "x",
                                                                                "schema": SCHEMA, "strict": True},
                                                                     "verbosity": "medium"},
              user="u-2", metadata={"k": "v"}, store=True, service_tier="default", prompt_cache_key="c",
              safety_identifier="s", truncation="disabled", stream=False, background=False, include=[],
              top_logprobs=0, tools=[], tool_choice="auto", parallel_tool_calls=False, max_tool_calls=1,
              previous_response_id=None, conversation=None, prompt=None, stream_options=None),
    responses("r-defaults", model=None),  # no model: the job's (--served-model-name) is echoed
]
# Failing lines: (line, code, param) for refused values, unknown fields, a wrong model, bad values.
FAILING = [
    (chat("wrong-model", model="gpt-4o-mini"), "model_not_found", "model"),
    (chat("unknown", top_k=5), "unknown_parameter", "top_k"),
    (chat("c-stream", stream=True), "unsupported_parameter", "stream"),
    (chat("c-stream-options", stream_options={"include_usage": True}), "unsupported_parameter", "stream_options"),
    (chat("c-logprobs", logprobs="yes"), "invalid_value", "logprobs"),
    (chat("c-top-logprobs", top_logprobs=3), "invalid_value", "top_logprobs"),  # without logprobs: true
    (chat("c-modalities", modalities=["text", "audio"]), "unsupported_parameter", "modalities"),
    (chat("c-verbosity", verbosity="low"), "unsupported_parameter", "verbosity"),
    (chat("c-audio", audio={"voice": "alloy", "format": "wav"}), "unsupported_parameter", "audio"),
    (chat("c-prediction", prediction={"type": "content", "content": "x"}), "unsupported_parameter", "prediction"),
    (chat("c-web", web_search_options={}), "unsupported_parameter", "web_search_options"),
    (chat("c-tools", tools=[{"type": "function", "function": {}}]), "invalid_value", "tools"),  # no name
    (chat("c-tool-choice", tool_choice="required"), "invalid_value", "tool_choice"),  # nothing to call
    (chat("c-parallel", parallel_tool_calls="yes"), "invalid_value", "parallel_tool_calls"),
    (chat("c-functions", functions=[{"name": "f"}]), "unsupported_parameter", "functions"),
    (chat("c-function-call", function_call={"name": "f"}), "unsupported_parameter", "function_call"),
    (chat("c-stop-5", stop=["a", "b", "c", "d", "e"]), "invalid_value", "stop"),
    (chat("c-bias-range", logit_bias={"5": 101}), "invalid_value", "logit_bias"),
    (chat("c-bias-token", logit_bias={"999999": 1}), "invalid_value", "logit_bias"),
    (chat("c-penalty", presence_penalty=3), "invalid_value", "presence_penalty"),
    (responses("r-wrong-model", model="gpt-oss-120b"), "model_not_found", "model"),
    (responses("r-unknown", frobnicate=True), "unknown_parameter", "frobnicate"),
    (responses("r-stop", stop=["x"]), "unknown_parameter", "stop"),  # the Responses API has no stop
    (responses("r-summary", reasoning={"effort": "low", "summary": "auto"}), "unsupported_parameter", "reasoning.summary"),
    (responses("r-generate-summary", reasoning={"generate_summary": "concise"}), "unsupported_parameter",
     "reasoning.generate_summary"),
    (responses("r-verbosity", text={"verbosity": "high"}), "unsupported_parameter", "text.verbosity"),
    (responses("r-truncation", truncation="auto"), "unsupported_parameter", "truncation"),
    (responses("r-stream", stream=True), "unsupported_parameter", "stream"),
    (responses("r-stream-options", stream_options={}), "unsupported_parameter", "stream_options"),
    (responses("r-background", background=True), "unsupported_parameter", "background"),
    (responses("r-include", include=["reasoning.encrypted_content"]), "unsupported_parameter", "include"),
    (responses("r-top-logprobs", top_logprobs=2), "invalid_value", "top_logprobs"),  # without the include
    (responses("r-previous", previous_response_id="resp_1"), "unsupported_parameter", "previous_response_id"),
    (responses("r-conversation", conversation="conv_1"), "unsupported_parameter", "conversation"),
    (responses("r-prompt", prompt={"id": "pmpt_1"}), "unsupported_parameter", "prompt"),
    (responses("r-tools", tools=[{"type": "web_search"}]), "invalid_value", "tools"),  # function tools only
    (responses("r-tool-choice", tool_choice="required"), "invalid_value", "tool_choice"),
    (responses("r-parallel", parallel_tool_calls=1), "invalid_value", "parallel_tool_calls"),
    (responses("r-max-tool-calls", max_tool_calls="many"), "invalid_value", "max_tool_calls"),
    (responses("r-temperature", temperature=9), "invalid_value", "temperature"),
]


def _fields_used(lines, url) -> set[str]:
    used = set()
    for line in lines:
        if line["url"] == url:
            for name, value in line["body"].items():
                used.add(name)
                if name in ("reasoning", "text") and isinstance(value, dict):
                    used |= {f"{name}.{key}" for key in value}
    return used


def test_the_file_exercises_every_field_of_the_table():
    lines = OK_LINES + [line for line, _, _ in FAILING]
    assert _fields_used(lines, CHAT) >= set(CHAT_FIELDS)
    assert _fields_used(lines, RESPONSES) >= set(RESPONSES_FIELDS)


def test_the_readme_shows_the_table_in_code():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert fields_markdown() in readme


@pytest.fixture(scope="module")
def batch_run(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fields")
    text = json.dumps(OK_LINES + [line for line, _, _ in FAILING]).replace(FOLDER, tiny_model_dir.name)
    inputs = write_jsonl(tmp / "batch.jsonl", json.loads(text))
    output = tmp / "out.jsonl"
    run = ossbatch("run", "--model", tiny_model_dir, "--input", inputs, "--output", output, "--max-tokens", "24",
                   "--max-reasoning-tokens", "2", "--temperature", "0", "--served-model-name", SERVED,
                   "--orchestrator", "none", "--quiet")
    assert run.returncode == 0, run.stderr
    lines = {}
    for path in (output, tmp / "out.errors.jsonl"):
        for text in path.read_text().splitlines():
            line = json.loads(text)
            lines[line["custom_id"]] = (line, path.name)
    manifest = json.loads((tmp / "out.jsonl.parts" / "_manifest.json").read_text())
    return lines, manifest, tiny_model_dir.name


def _body(lines, custom_id):
    line, file = lines[custom_id]
    assert file == "out.jsonl" and line["error"] is None and line["response"]["status_code"] == 200, line
    return line["response"]["body"]


def test_every_line_parses_and_failures_go_to_the_error_file(batch_run):
    lines, manifest, _ = batch_run
    assert set(lines) == {line["custom_id"] for line in OK_LINES} | {line["custom_id"] for line, _, _ in FAILING}
    for line in OK_LINES:
        body = _body(lines, line["custom_id"])
        model = ChatCompletion if line["url"] == CHAT else Response
        model.model_validate(body)
    for line, code, param in FAILING:
        got, file = lines[line["custom_id"]]
        assert file == "out.errors.jsonl" and got["error"] is None and got["response"]["status_code"] == 400
        error = ErrorObject.model_validate(got["response"]["body"]["error"])
        assert (error.code, error.param, error.type) == (code, param, "invalid_request_error"), line["custom_id"]
        assert f"body.{param}" in error.message and "batch.jsonl line " in error.message  # the field and the line
    assert manifest["output"]["batch_file"]["lines"] == len(OK_LINES)
    assert manifest["output"]["batch_file"]["error_lines"] == len(FAILING)


def test_stop_cuts_the_answer_before_the_stop_string(batch_run):
    lines, _, folder = batch_run
    full = ChatCompletion.model_validate(_body(lines, "answer"))
    stopped = ChatCompletion.model_validate(_body(lines, "stopped"))
    answer = full.choices[0].message.content
    assert ":" in answer  # {"x": ...}: the schema puts the stop string in the answer
    assert stopped.choices[0].message.content == answer[: answer.index(":")]
    assert stopped.choices[0].finish_reason == "stop"
    # Stopped as soon as the answer held the stop string, not cut after running on.
    assert stopped.usage.completion_tokens < full.usage.completion_tokens


def test_logit_bias_and_penalties_change_what_is_sampled(batch_run):
    lines, _, folder = batch_run
    biased = ChatCompletion.model_validate(_body(lines, "biased")).choices[0]
    # +20: every free token (the answer's text; the grammar picks the headers) is that token, to the budget
    assert biased.message.content == " banana" * 21 and biased.finish_reason == "length"
    # The same bias, less 2 + 2 per banana already written: after a few the penalty outweighs it.
    penalised = ChatCompletion.model_validate(_body(lines, "penalised")).choices[0].message.content
    assert penalised.startswith(" banana") and 1 <= penalised.count(" banana") < 21


def test_models_and_echoes(batch_run):
    lines, _, folder = batch_run
    assert ChatCompletion.model_validate(_body(lines, "answer")).model == folder  # the name asked
    everything = ChatCompletion.model_validate(_body(lines, "everything"))
    assert everything.model == SERVED and everything.service_tier == "flex" and len(everything.choices) == 2
    echo = Response.model_validate(_body(lines, "r-echo"))
    assert echo.model == folder and echo.instructions == "Be brief."
    assert (echo.max_output_tokens, echo.temperature, echo.top_p) == (24, 0, 0.5)
    assert echo.reasoning.effort == "low" and echo.text.format.type == "json_schema"
    assert (echo.user, echo.metadata, echo.store, echo.service_tier) == ("u-2", {"k": "v"}, True, "default")
    assert echo.prompt_cache_key == "c" and echo.safety_identifier == "s" and echo.truncation == "disabled"
    defaults = Response.model_validate(_body(lines, "r-defaults"))  # the job's settings, never null
    assert defaults.model == SERVED and (defaults.max_output_tokens, defaults.temperature, defaults.top_p) == (24, 0, 1)
    assert defaults.reasoning.effort == "medium" and defaults.text.format.type == "text"


def test_the_example_batch_files_run_unchanged(tiny_model_dir, tmp_path):
    """vLLM's run-batch input shape and an OpenAI-style file (examples/batch), as they are; the tiny
    checkpoint answers to the files' model through --served-model-name (a real 20b does by its shape)."""
    from pathlib import Path

    examples = Path(__file__).resolve().parents[2] / "examples" / "batch"
    output, schema = tmp_path / "out.jsonl", tmp_path / "short.schema.json"
    # The files ask for up to 1000 tokens: a short reasoning budget and a one-word answer schema end
    # the random tiny model's rows early (a line's own response_format still wins).
    schema.write_text(json.dumps({"enum": ["yes", "no"]}))
    run = ossbatch("run", "--model", tiny_model_dir, "--input", examples / "vllm_run_batch.jsonl",
                   examples / "openai_batch.jsonl", "--output", output, "--max-reasoning-tokens", "2", "--schema", schema,
                   "--served-model-name", "openai/gpt-oss-20b", "--orchestrator", "none", "--quiet")
    assert run.returncode == 0, run.stderr
    done = [json.loads(text) for text in output.read_text().splitlines()]
    assert [line["custom_id"] for line in done] == ["request-1", "request-2", "chat-stop", "chat-json", "chat-varied", "resp-1"]
    for line in done:
        parse = Response if line["response"]["body"]["object"] == "response" else ChatCompletion
        assert parse.model_validate(line["response"]["body"]).model == "openai/gpt-oss-20b"
    (refused,) = [json.loads(text) for text in (tmp_path / "out.errors.jsonl").read_text().splitlines()]
    assert refused["custom_id"] == "resp-refused" and refused["response"]["body"]["error"]["param"] == "previous_response_id"
