"""OpenAI Batch files in and out: the output lines parse with the openai SDK's own models."""

import json

import pytest
from openai.types import BatchError
from openai.types.chat import ChatCompletion
from openai.types.responses import Response
from pipeline_fakes import FakeEngine, jsonl_bytes, write_jsonl

from ossbatch.pipeline.batch_api import batch_output_line
from ossbatch.pipeline.driver import run_job
from ossbatch.pipeline.job import JobSpec, finalize_job, load_plan

CHAT = "/v1/chat/completions"
RESPONSES = "/v1/responses"


def batch_lines() -> list:
    return [
        {"custom_id": "chat-1", "method": "POST", "url": CHAT, "body": {
            "model": "gpt-oss-20b", "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}],
            "max_completion_tokens": 64, "reasoning_effort": "low"}},
        {"custom_id": "chat-short", "method": "POST", "url": CHAT, "body": {
            "model": "gpt-oss-20b", "messages": [{"role": "user", "content": "Tell me everything"}], "max_tokens": 3}},
        {"custom_id": "resp-1", "method": "POST", "url": RESPONSES, "body": {
            "model": "gpt-oss-120b", "input": "Name a prime", "reasoning": {"effort": "high"}, "max_output_tokens": 32}},
        {"custom_id": "resp-short", "method": "POST", "url": RESPONSES, "body": {
            "model": "gpt-oss-120b", "input": [{"role": "user", "content": "Go on"}], "max_output_tokens": 2}},
        {"custom_id": "bad-effort", "method": "POST", "url": CHAT, "body": {
            "messages": [{"role": "user", "content": "x"}], "reasoning_effort": "extreme"}},
        '{"custom_id": "torn", "method": "POST", "url": ',
    ]


def parse_output(text: str) -> dict:
    lines = [json.loads(line) for line in text.splitlines()]
    by_id = {line["custom_id"]: line for line in lines}
    assert len(by_id) == len(lines)
    return by_id


def check_output(by_id: dict, source_name: str) -> None:
    assert set(by_id) == {"chat-1", "chat-short", "resp-1", "resp-short", "bad-effort", f"{source_name}:6"}

    chat = ChatCompletion.model_validate(by_id["chat-1"]["response"]["body"])
    assert by_id["chat-1"]["response"]["status_code"] == 200 and by_id["chat-1"]["error"] is None
    assert by_id["chat-1"]["id"].startswith("batch_req_") and by_id["chat-1"]["response"]["request_id"]
    assert chat.object == "chat.completion" and chat.model == "gpt-oss-20b"
    choice = chat.choices[0]
    assert choice.finish_reason == "stop" and choice.message.role == "assistant"
    assert choice.message.content == "answer to chat-1"
    assert choice.message.reasoning_content == "thinking it over"  # an extra field the SDK keeps
    assert chat.usage.prompt_tokens == 2 and chat.usage.completion_tokens == 7 and chat.usage.total_tokens == 9
    assert chat.usage.completion_tokens_details.reasoning_tokens == 3
    assert ChatCompletion.model_validate(by_id["chat-short"]["response"]["body"]).choices[0].finish_reason == "length"

    response = Response.model_validate(by_id["resp-1"]["response"]["body"])
    assert response.status == "completed" and response.model == "gpt-oss-120b"
    assert response.output_text == "answer to resp-1"
    reasoning, message = response.output
    assert reasoning.type == "reasoning" and reasoning.content[0].text == "thinking it over"
    assert message.type == "message" and message.role == "assistant"
    assert response.usage.input_tokens == 3 and response.usage.output_tokens == 7
    assert response.usage.output_tokens_details.reasoning_tokens == 3
    short = Response.model_validate(by_id["resp-short"]["response"]["body"])
    assert short.status == "incomplete" and short.incomplete_details.reason == "max_output_tokens"

    # refused as OpenAI refuses an invalid request: a 400 naming the field
    refused = by_id["bad-effort"]
    assert refused["error"] is None and refused["response"]["status_code"] == 400
    error = refused["response"]["body"]["error"]
    assert "body.reasoning_effort" in error["message"]
    assert (error["type"], error["code"], error["param"]) == ("invalid_request_error", "invalid_value", "reasoning_effort")
    line = by_id[f"{source_name}:6"]  # not a request at all: the Batch error object
    assert line["response"] is None
    assert "not valid JSON" in BatchError.model_validate(line["error"]).message


def check_split(output_text: str, errors_text: str) -> None:
    """Successes in the output file, failures in the error file, as OpenAI's Batch writes them."""
    assert {json.loads(line)["custom_id"] for line in output_text.splitlines()} == {"chat-1", "chat-short", "resp-1", "resp-short"}
    assert all(json.loads(line)["response"] and json.loads(line)["response"]["status_code"] == 200
               for line in output_text.splitlines())
    assert len(errors_text.splitlines()) == 2


def test_batch_file_in_batch_file_out(tmp_path):
    inputs = write_jsonl(tmp_path / "batch.jsonl", batch_lines())
    output = tmp_path / "results.jsonl"
    manifest = run_job(JobSpec(inputs=inputs, output=str(output), shard_rows=4), FakeEngine())
    errors = tmp_path / "results.errors.jsonl"
    check_output(parse_output(output.read_text() + errors.read_text()), "batch.jsonl")
    check_split(output.read_text(), errors.read_text())
    assert manifest["output"]["batch_file"] == {"lines": 4, "error_lines": 2, "error_uri": str(errors)}
    assert manifest["output"]["format"] == "batch_jsonl"
    assert (tmp_path / "results.jsonl.parts" / "_manifest.json").exists()
    assert manifest["rows"] == {"total": 6, "ok": 2, "length": 2, "error": 2}

    first = output.read_bytes(), errors.read_bytes()
    finalize_job(load_plan(str(output)), 1.0)
    assert (output.read_bytes(), errors.read_bytes()) == first  # ids derive from the job and custom_id: finalizing again changes nothing


def test_batch_file_on_s3(s3):
    inputs = s3.put("batches/in.jsonl", jsonl_bytes(batch_lines()))
    run_job(JobSpec(inputs=inputs, output=s3.uri("batches/out.jsonl"), shard_rows=2), FakeEngine())
    text, errors = (s3.fs.cat(f"{s3.bucket}/batches/{name}").decode() for name in ("out.jsonl", "out.errors.jsonl"))
    check_output(parse_output(text + errors), "in.jsonl")
    check_split(text, errors)
    assert s3.fs.exists(f"{s3.bucket}/batches/out.jsonl.parts/_manifest.json")


def test_an_existing_batch_output_is_not_replaced_without_overwrite(tmp_path):
    inputs = write_jsonl(tmp_path / "batch.jsonl", batch_lines())
    (tmp_path / "results.jsonl").write_text("someone else's results\n")
    with pytest.raises(ValueError, match="--overwrite"):
        run_job(JobSpec(inputs=inputs, output=str(tmp_path / "results.jsonl")), FakeEngine())


def test_plain_rows_come_out_as_chat_completions():
    row = {"id": "q1", "status": "ok", "finish_reason": "stop", "output_text": "4", "reasoning_text": None,
           "prompt_tokens": 5, "reasoning_tokens": 0, "output_tokens": 1, "completion_tokens": 1, "request_kind": "row"}
    line = batch_output_line(row, model="gpt-oss-20b", created=1_700_000_000, job_key="k")
    body = ChatCompletion.model_validate(line["response"]["body"])
    assert line["custom_id"] == "q1" and body.choices[0].message.content == "4"
    assert not hasattr(body.choices[0].message, "reasoning_content") or body.choices[0].message.reasoning_content is None
