"""Top logprobs and the answer's logprobs through the run stage on the tiny model: Parquet
columns, and Batch lines that the openai SDK's models parse with the values filled."""

import json

import pyarrow.parquet as pq
import pytest
from openai.types.chat import ChatCompletion
from openai.types.responses import Response
from pipeline_fakes import write_jsonl

from ossbatch.pipeline.config import Job, JobOptions
from ossbatch.pipeline.driver import job_spec, run_job
from ossbatch.pipeline.harmony import MESSAGE
from ossbatch.pipeline.infer import ShardInferencer
from ossbatch.pipeline.logprobs import token_bytes
from ossbatch.pipeline.parse import final_content_spans
from ossbatch.pipeline.validate import normalize

SCHEMA = {"type": "object", "properties": {"label": {"enum": ["yes", "no"]}}, "required": ["label"],
          "additionalProperties": False}


def _run(model_dir, tmp_path, rows, output="out", **options):
    inputs = write_jsonl(tmp_path / "in.jsonl", rows)
    job = Job(model=str(model_dir), inputs=[inputs], output=str(tmp_path / output),
              options=JobOptions(max_tokens=40, temperature=0.0, keep_token_ids=True, **options))
    run_job(job_spec(job), ShardInferencer(job))
    return tmp_path / output


def test_top_logprobs_column_per_row_k(tiny_model_dir, tmp_path):
    out = _run(tiny_model_dir, tmp_path, [{"id": "job-k", "prompt": "hi"}, {"id": "own-k", "prompt": "yo", "top_logprobs": 5},
                                          {"id": "none", "prompt": "ok", "top_logprobs": 0}], top_logprobs=2)
    rows = {r["id"]: r for r in pq.read_table(out / "data").to_pylist()}
    for rid, k in (("job-k", 2), ("own-k", 5)):
        row = rows[rid]
        top = row["output_top_logprobs"]
        assert len(top) == len(row["output_token_ids"]) == len(row["output_logprobs"])
        for token, logprob, alternatives in zip(row["output_token_ids"], row["output_logprobs"], top):
            assert len(alternatives) == k
            assert alternatives[0]["token_id"] == token  # greedy: the chosen token is the most likely
            assert alternatives[0]["logprob"] == pytest.approx(logprob, abs=1e-6)
            assert [a["logprob"] for a in alternatives] == sorted((a["logprob"] for a in alternatives), reverse=True)
            assert all(a["token"] == token_bytes(a["token_id"]).decode("utf-8", "replace") for a in alternatives)
    assert rows["none"]["output_top_logprobs"] is None


def test_a_row_asking_for_top_logprobs_out_of_range_is_that_rows_error():
    request = normalize({"id": "r", "prompt": "x", "top_logprobs": 21}, fallback_id="f:1", where="f line 1")
    assert "top_logprobs: must be an integer from 0 to 20, got 21" in request["error"]
    request = normalize({"custom_id": "c", "url": "/v1/chat/completions",
                         "body": {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}},
                        fallback_id="f:1", where="f line 1")
    assert "body.top_logprobs: needs body.logprobs" in request["error"]


def test_final_content_spans_skip_the_reasoning():
    from ossbatch.pipeline.logprobs import encode_text
    from ossbatch.pipeline.harmony import CHANNEL, END, RETURN, START

    analysis = [CHANNEL, *encode_text("analysis"), MESSAGE, *encode_text("think"), END]
    final = [START, *encode_text("assistant"), CHANNEL, *encode_text("final"), MESSAGE, *encode_text("answer!"), RETURN]
    tokens = analysis + final
    (span,) = final_content_spans(tokens)
    assert b"".join(token_bytes(t) for t in tokens[span[0]:span[1]]) == b"answer!"
    assert final_content_spans(analysis) == []
    assert final_content_spans(tokens[:-1]) == [(span[0], len(tokens) - 1)]  # truncated: to the end


def _batch_lines():
    chat = {"messages": [{"role": "user", "content": "Is it?"}], "logprobs": True, "top_logprobs": 3, "max_tokens": 40,
            "response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": SCHEMA}}}
    responses = {"input": "Is it?", "include": ["message.output_text.logprobs"], "top_logprobs": 2,
                 "max_output_tokens": 40, "text": {"format": {"type": "json_schema", "name": "a", "schema": SCHEMA}}}
    plain = {"messages": [{"role": "user", "content": "Is it?"}], "max_tokens": 40}
    return [{"custom_id": "chat", "method": "POST", "url": "/v1/chat/completions", "body": chat},
            {"custom_id": "resp", "method": "POST", "url": "/v1/responses", "body": responses},
            {"custom_id": "plain", "method": "POST", "url": "/v1/chat/completions", "body": plain}]


def test_batch_logprobs_round_trip_through_the_openai_sdk(tiny_model_dir, tmp_path):
    parquet = _run(tiny_model_dir, tmp_path, _batch_lines(), output="parquet", max_reasoning_tokens=6)
    rows = {r["id"]: r for r in pq.read_table(parquet / "data").to_pylist()}
    out = _run(tiny_model_dir, tmp_path, _batch_lines(), output="out.jsonl", max_reasoning_tokens=6)
    lines = {line["custom_id"]: line for line in map(json.loads, out.read_text().splitlines())}

    chat = ChatCompletion.model_validate(lines["chat"]["response"]["body"])
    content = chat.choices[0].logprobs.content
    row = rows["chat"]
    assert row["status"] == "ok" and json.loads(chat.choices[0].message.content)["label"] in ("yes", "no")
    # The answer's tokens, not the reasoning's: their bytes spell the message content.
    assert b"".join(bytes(t.bytes) for t in content).decode() == chat.choices[0].message.content
    (span,) = final_content_spans(row["output_token_ids"])
    assert len(content) == span[1] - span[0] < len(row["output_token_ids"])
    for entry, logprob, alternatives in zip(content, row["output_logprobs"][span[0]:span[1]],
                                            row["answer_logprobs"]):
        assert entry.logprob == pytest.approx(logprob) and entry.token == alternatives["token"]
        assert len(entry.top_logprobs) == 3
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx([a["logprob"] for a in alternatives["top_logprobs"]])
        assert entry.top_logprobs[0].logprob >= entry.logprob - 1e-6  # the raw distribution's best is at least as likely

    response = Response.model_validate(lines["resp"]["response"]["body"])
    text = response.output[-1].content[0]
    assert text.logprobs and b"".join(bytes(t.bytes) for t in text.logprobs).decode() == text.text == response.output_text
    assert all(len(t.top_logprobs) == 2 for t in text.logprobs)

    plain = ChatCompletion.model_validate(lines["plain"]["response"]["body"])
    assert plain.choices[0].logprobs is None and rows["plain"]["answer_logprobs"] is None


def test_masked_distribution_under_a_grammar(tiny_model_dir, tmp_path):
    """--logprobs-distribution masked: greedy under the grammar picks the masked distribution's most
    likely token, and each logprob is at least its raw one (renormalised over fewer tokens)."""
    rows = [{"id": "a", "prompt": "Is it?", "schema": SCHEMA}]
    raw = _run(tiny_model_dir, tmp_path, rows, output="raw", top_logprobs=3, max_reasoning_tokens=4)
    masked = _run(tiny_model_dir, tmp_path, rows, output="masked", top_logprobs=3, max_reasoning_tokens=4,
                  logprobs_distribution="masked")
    (r,), (m,) = pq.read_table(raw / "data").to_pylist(), pq.read_table(masked / "data").to_pylist()
    assert r["output_token_ids"] == m["output_token_ids"]  # the mask decides the tokens either way
    assert all(alts[0]["token_id"] == t for t, alts in zip(m["output_token_ids"], m["output_top_logprobs"]))
    assert any(alts[0]["token_id"] != t for t, alts in zip(r["output_token_ids"], r["output_top_logprobs"]))
    assert all(lm >= lr - 1e-5 for lm, lr in zip(m["output_logprobs"], r["output_logprobs"]))
    assert any(lm > lr + 1e-3 for lm, lr in zip(m["output_logprobs"], r["output_logprobs"]))


def test_the_new_settings_are_checked_and_keep_earlier_job_keys():
    from ossbatch.pipeline.storage import InputError

    with pytest.raises(InputError) as err:
        JobOptions.from_flags({"top_logprobs": 21})
    assert str(err.value).startswith("--top-logprobs: ") and "less than or equal to 20" in str(err.value)
    with pytest.raises(InputError, match="--logprobs-distribution: "):
        JobOptions.from_flags({"logprobs_distribution": "softmax"})
    # At their defaults they stay out of the identity: a job that does not use them resumes its output.
    assert not {"top_logprobs", "logprobs_distribution", "label_field"} & set(JobOptions().identity())
    changed = JobOptions(top_logprobs=3, label_field="label", logprobs_distribution="masked").identity()
    assert (changed["top_logprobs"], changed["label_field"], changed["logprobs_distribution"]) == (3, "label", "masked")
