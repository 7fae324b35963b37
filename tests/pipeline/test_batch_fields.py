"""The Batch field table's checks, the job's model names, stop strings on harmony tokens, and the
error file, without the engine."""

import json

import torch
from openai.types.chat import ChatCompletion
from openai.types.responses import Response
from openai_harmony import Message, Role
from pipeline_fakes import FakeEngine, write_jsonl

from ossbatch.engine.config import PRESETS
from ossbatch.pipeline.batch_api import batch_output_line, error_output_of
from ossbatch.pipeline.batch_fields import body_error, model_family, served_names
from ossbatch.pipeline.driver import run_job
from ossbatch.pipeline.harmony import RETURN, harmony_encoding
from ossbatch.pipeline.job import JobSpec
from ossbatch.pipeline.stops import StopStrings, cut_at_stop
from ossbatch.pipeline.validate import ECHO_COLUMN, normalize

CHAT = "/v1/chat/completions"


def line(**body) -> dict:
    return {"custom_id": "c", "method": "POST", "url": CHAT,
            "body": {"messages": [{"role": "user", "content": "hi"}], **body}}


def one(record, models=None) -> dict:
    return normalize(record, fallback_id="f:1", where="in.jsonl line 1", models=models)


def refusal(request) -> dict:
    return json.loads(request["passthrough"][ECHO_COLUMN])["error"]


def test_the_job_answers_to_its_folder_its_family_and_its_served_name():
    config_20b = PRESETS["gpt-oss-20b"].to_hf_json()
    assert model_family(config_20b) == "gpt-oss-20b" and model_family(PRESETS["gpt-oss-120b"].to_hf_json()) == "gpt-oss-120b"
    assert served_names("/models/ckpt-7/", config_20b, "prod") == {"ckpt-7", "gpt-oss-20b", "openai/gpt-oss-20b", "prod"}
    tiny = dict(config_20b, num_hidden_layers=2)
    assert model_family(tiny) is None and served_names("/m/tiny", tiny, None) == {"tiny"}


def test_a_line_for_another_model_fails_alone():
    names = served_names("/m/tiny", None, "prod")
    for asked in ("tiny", "prod", None):
        assert one(line(model=asked), names)["error"] is None, asked
    wrong = one(line(model="gpt-4o-mini"), names)
    assert "body.model: 'gpt-4o-mini' is not this job's model" in wrong["error"] and "in.jsonl line 1" in wrong["error"]
    assert refusal(wrong) == {"code": "model_not_found", "param": "model"}
    assert one(line(model="gpt-4o-mini"))["error"] is None  # no names given (a plan without a model): no check


def test_unknown_and_refused_fields_name_themselves():
    assert body_error({"reasoning": {"effort": "low", "colour": "blue"}, "input": "x"}, "responses").param == "reasoning.colour"
    assert body_error({"tool_choice": "none", "tools": [], "stream": False, "logprobs": None}, "chat") is None
    unknown = one(line(top_k=3))
    assert refusal(unknown) == {"code": "unknown_parameter", "param": "top_k"} and "body.top_k: unknown parameter" in unknown["error"]
    assert refusal(one(line(stream=True))) == {"code": "unsupported_parameter", "param": "stream"}


def test_stop_bias_and_penalties_are_read_from_bodies_and_plain_rows():
    request = one(line(stop="END", logit_bias={"12": -100, "7": 2.5}, presence_penalty=0.5, frequency_penalty=-1))
    assert (request["stop"], request["logit_bias"]) == (["END"], {12: -100.0, 7: 2.5})
    assert (request["presence_penalty"], request["frequency_penalty"]) == (0.5, -1.0)
    row = one({"id": "r", "prompt": "p", "stop": ["a", "b"], "logit_bias": {"3": 1}, "frequency_penalty": 1})
    assert (row["error"], row["stop"], row["logit_bias"], row["frequency_penalty"]) == (None, ["a", "b"], {3: 1.0}, 1.0)
    assert "passthrough" in row and "stop" not in row["passthrough"]  # consumed, not passed through
    bad = one({"id": "r", "prompt": "p", "logit_bias": {"300000": 1}})
    assert "logit_bias: '300000' is not a token id of o200k_harmony" in bad["error"]
    assert "stop: must be a non-empty string or a list of up to 4" in one({"id": "r", "prompt": "p", "stop": ["a"] * 5})["error"]
    assert "stop[0]: '' should be non-empty" in one({"id": "r", "prompt": "p", "stop": [""]})["error"]


def _completion_tokens(final: str) -> list[int]:
    """What a model writes after ``<|start|>assistant``: reasoning, then ``final``, as harmony renders it."""
    encoding = harmony_encoding()
    analysis = encoding.render(Message.from_role_and_content(Role.ASSISTANT, "think: a while").with_channel("analysis"))
    answer = encoding.render(Message.from_role_and_content(Role.ASSISTANT, final).with_channel("final"))
    start = encoding.encode("<|start|>assistant", allowed_special={"<|start|>"})
    return analysis[len(start):] + answer


class RecordingInner:
    def __init__(self):
        self.advanced = []

    def prepare(self, rows):
        pass

    def apply(self, logits, rows):
        pass

    def advance(self, tokens, rows):
        self.advanced.append((tokens.tolist(), list(rows)))

    def errors(self):
        return [None, None]


def test_a_stop_string_in_the_answer_forces_the_end_of_the_turn():
    tokens = _completion_tokens("The answer: 42, done.")[:-1]  # without the closing <|end|>
    inner = RecordingInner()
    stops = StopStrings([[":"], None], inner)  # row 0 watches ":" (in its reasoning too, which does not count)
    ended_at = None
    for step, token in enumerate(tokens):
        logits = torch.zeros(2, 201088)
        stops.prepare([0, 1])
        stops.apply(logits, [0, 1])
        if stops.ending[0]:
            ended_at = step
            assert logits[0].argmax() == RETURN and torch.isinf(logits[0]).sum() == logits.shape[1] - 1
            assert not torch.isinf(logits[1]).any()  # the other row is untouched
            break
        stops.advance(torch.tensor([token, token]), [0, 1])
    assert ended_at is not None
    text = harmony_encoding().decode(tokens[:ended_at])
    assert text.endswith(":") or ":" in text.rsplit("<|message|>", 1)[1]  # it stopped right after the stop string
    stops.advance(torch.tensor([RETURN, 5]), [0, 1])  # the forced token never reaches the grammar
    assert inner.advanced[-1] == ([5], [1])


def test_cut_at_stop_takes_the_earliest():
    assert cut_at_stop("a, b; c", [";", ","]) == "a"
    assert cut_at_stop("abc", ["x"]) is None and cut_at_stop(None, [","]) is None and cut_at_stop("a,b", None) is None


def test_refused_lines_come_out_as_400s_and_responses_echo_the_job_defaults():
    refused = one(line(top_k=1)) | {"status": "error", "request_kind": "chat"}
    out = batch_output_line(refused, model="m", created=1, job_key="k")
    assert out["error"] is None and out["response"]["status_code"] == 400
    assert out["response"]["body"]["error"]["code"] == "unknown_parameter"
    ok = {"id": "r", "status": "ok", "finish_reason": "stop", "output_text": "4", "request_kind": "responses",
          "passthrough": {ECHO_COLUMN: json.dumps({"kind": "responses", "body": {"top_p": 0.5, "user": "u"}})}}
    body = Response.model_validate(batch_output_line(ok, model="m", created=1, job_key="k", defaults={
        "temperature": 0.7, "top_p": 1.0, "max_tokens": 99, "reasoning_effort": "high"})["response"]["body"])
    assert (body.temperature, body.top_p, body.max_output_tokens, body.reasoning.effort, body.user) == (0.7, 0.5, 99, "high", "u")
    chat = dict(ok, request_kind="chat", passthrough={ECHO_COLUMN: json.dumps({"kind": "chat", "body": {"service_tier": "flex"}})})
    assert ChatCompletion.model_validate(batch_output_line(chat, model="m", created=1, job_key="k")["response"]["body"]).service_tier == "flex"


def test_the_error_file_exists_only_with_failures(tmp_path):
    assert error_output_of("s3://b/out.jsonl") == "s3://b/out.errors.jsonl"
    output, errors = tmp_path / "out.jsonl", tmp_path / "out.errors.jsonl"
    errors.write_text("an earlier job's errors\n")
    run_job(JobSpec(inputs=write_jsonl(tmp_path / "in.jsonl", [line()]), output=str(output), overwrite=True), FakeEngine())
    assert len(output.read_text().splitlines()) == 1 and not errors.exists()
    custom = tmp_path / "failed-lines.jsonl"
    manifest = run_job(JobSpec(inputs=write_jsonl(tmp_path / "in2.jsonl", [line(), line(top_k=2) | {"custom_id": "d"}]),
                               output=str(tmp_path / "out2.jsonl"), error_output=str(custom)), FakeEngine())
    assert [json.loads(x)["custom_id"] for x in custom.read_text().splitlines()] == ["d"]
    assert manifest["output"]["batch_file"] == {"lines": 1, "error_lines": 1, "error_uri": str(custom)}
