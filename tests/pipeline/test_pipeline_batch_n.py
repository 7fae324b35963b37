"""The Batch API's ``n``: a chat-completions line runs as n seeded rows over one prompt and comes
back as one line with ``choices[0..n-1]`` and usage as OpenAI counts it."""

import json

import pyarrow.parquet as pq
import pytest
from openai.types import BatchError
from openai.types.chat import ChatCompletion
from pipeline_fakes import FakeEngine, write_jsonl

from ossbatch.pipeline.batch_api import batch_output_line, choice_seed
from ossbatch.pipeline.driver import run_job
from ossbatch.pipeline.job import JobSpec, check_results, plan_job, read_shard
from ossbatch.pipeline.storage import InputError

CHAT = "/v1/chat/completions"


def chat_line(custom_id: str, content: str, **body) -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": CHAT,
            "body": {"model": "gpt-oss-20b", "messages": [{"role": "user", "content": content}], **body}}


def lines() -> list[dict]:
    return [
        chat_line("three", "Name a colour", n=3, seed=7, max_completion_tokens=64),
        chat_line("single", "Just once please", max_completion_tokens=64),
        chat_line("two-unseeded", "Pick a number", n=2, max_completion_tokens=64),
        chat_line("one", "n of one", n=1, max_completion_tokens=64),
        chat_line("bad", "x", n=4, reasoning_effort="extreme"),
    ]


def parts(output) -> list[dict]:
    # The result rows are OUTPUT/data's parts, in order.
    return [row for part in sorted((output / "data").glob("part-*.parquet")) for row in pq.read_table(part).to_pylist()]


def parse(text: str) -> dict:
    parsed = [json.loads(line) for line in text.splitlines()]
    return {line["custom_id"]: line for line in parsed}


def test_n_choices_come_back_as_one_line(tmp_path):
    inputs = write_jsonl(tmp_path / "batch.jsonl", lines())
    output = tmp_path / "results.jsonl"
    engine = FakeEngine()
    manifest = run_job(JobSpec(inputs=inputs, output=str(output), shard_rows=2), engine)

    assert engine.ids_seen == ["three#0", "three#1", "three#2", "single", "two-unseeded#0", "two-unseeded#1", "one", "bad"]
    text, errors = output.read_text(), (tmp_path / "results.errors.jsonl").read_text()
    assert len(text.splitlines()) == 4 and len(errors.splitlines()) == 1  # one line per input line, failed ones apart
    by_id = parse(text + errors)
    assert list(by_id) == ["three", "single", "two-unseeded", "one", "bad"]

    three = ChatCompletion.model_validate(by_id["three"]["response"]["body"])
    assert [c.index for c in three.choices] == [0, 1, 2]
    assert [c.message.content for c in three.choices] == ["answer to three#0", "answer to three#1", "answer to three#2"]
    assert all(c.finish_reason == "stop" and c.message.reasoning_content == "thinking it over" for c in three.choices)
    prompt = len("Name a colour".split())
    assert three.usage.prompt_tokens == prompt  # the prompt counted once
    assert three.usage.completion_tokens == 3 * 7 and three.usage.total_tokens == prompt + 21
    assert three.usage.completion_tokens_details.reasoning_tokens == 3 * 3

    for single in ("single", "one"):
        body = ChatCompletion.model_validate(by_id[single]["response"]["body"])
        assert len(body.choices) == 1 and body.choices[0].message.content == f"answer to {single}"
        assert body.usage.completion_tokens == 7
    assert len(ChatCompletion.model_validate(by_id["two-unseeded"]["response"]["body"]).choices) == 2

    bad = by_id["bad"]  # a line that fails validation stays one error line, however many choices it asked for
    assert bad["error"] is None and bad["response"]["status_code"] == 400
    assert "body.reasoning_effort" in bad["response"]["body"]["error"]["message"]
    assert manifest["rows"]["total"] == 8  # result rows: a line's choices are rows of their own


def test_each_choice_has_its_own_seed(tmp_path):
    inputs = write_jsonl(tmp_path / "batch.jsonl", lines())
    plan = plan_job(JobSpec(inputs=inputs, output=str(tmp_path / "results.jsonl"), shard_rows=10))
    requests = {r["id"]: r for r in read_shard(plan, 0)}
    seeds = [requests[f"three#{i}"]["seed"] for i in range(3)]
    assert len(set(seeds)) == 3 and seeds == [choice_seed(7, "three", i) for i in range(3)]
    assert all(0 <= seed < 1 << 63 for seed in seeds)  # in the range an explicit seed may take
    assert seeds == [r["seed"] for r in read_shard(plan, 0) if r["id"].startswith("three#")]  # the same on a re-read
    # Without a seed in the body, the run stage derives each choice's from the job seed and its own id.
    assert [requests[f"two-unseeded#{i}"]["seed"] for i in range(2)] == [None, None]
    assert requests["three#1"]["messages"] == requests["three#0"]["messages"]
    assert [requests[f"three#{i}"]["passthrough"]["choice_index"] for i in range(3)] == [0, 1, 2]
    assert "choice_index" not in requests["single"]["passthrough"]


def test_parquet_output_holds_a_row_per_choice(tmp_path):
    inputs = write_jsonl(tmp_path / "batch.jsonl", lines())
    run_job(JobSpec(inputs=inputs, output=str(tmp_path / "out"), shard_rows=3), FakeEngine())
    got = {row["id"]: row["choice_index"] for row in parts(tmp_path / "out")}
    assert got == {"three#0": 0, "three#1": 1, "three#2": 2, "single": None, "two-unseeded#0": 0,
                   "two-unseeded#1": 1, "one": None, "bad": None}


def test_choice_ids_cannot_collide_with_other_lines(tmp_path):
    inputs = write_jsonl(tmp_path / "batch.jsonl", [chat_line("a", "x", n=2), chat_line("a#1", "y")])
    with pytest.raises(InputError, match="'a#1' \\(2 rows\\)"):
        plan_job(JobSpec(inputs=inputs, output=str(tmp_path / "out")))


def test_a_failed_choice_fails_its_line():
    rows = [{"id": f"c#{i}", "choice_index": i, "status": "ok", "finish_reason": "stop", "output_text": str(i),
             "prompt_tokens": 5, "cached_prompt_tokens": 4, "completion_tokens": 2, "request_kind": "chat"} for i in range(3)]
    ok = batch_output_line(rows, model="gpt-oss-20b", created=1, job_key="k")
    assert ok["custom_id"] == "c" and ChatCompletion.model_validate(ok["response"]["body"]).usage.prompt_tokens_details.cached_tokens == 4
    rows[1] |= {"status": "error", "error": "grammar refused the token"}
    failed = batch_output_line(rows, model="gpt-oss-20b", created=1, job_key="k")
    assert failed["custom_id"] == "c" and failed["response"] is None
    assert BatchError.model_validate(failed["error"]).message == "choice 1 of 3: grammar refused the token"


def test_a_shard_commits_a_line_with_all_its_choices_in_order():
    def result(rid, index=None):
        return {"id": rid, "status": "ok", "request_kind": "chat", "passthrough": {} if index is None else {"choice_index": index}}

    check_results([result("a#0", 0), result("a#1", 1), result("b")], 2, 0)
    # A plain row's own column called choice_index is no choice: each such row is a line of its own.
    check_results([{"id": f"r{i}#1", "status": "ok", "request_kind": "row", "passthrough": {"choice_index": 1}} for i in range(2)], 2, 0)
    with pytest.raises(ValueError, match="choice 1 does not follow"):
        check_results([result("a#0", 0), result("b"), result("a#1", 1)], 2, 0)
    with pytest.raises(ValueError, match="3 results for 3 requests"):
        check_results([result("a#0", 0), result("a#1", 1), result("b")], 3, 0)


def test_n_choices_share_one_prefill_and_sample_apart(tiny_model_dir, tmp_path):
    from ossbatch.engine.generate import MIN_ROOT_TOKENS
    from ossbatch.pipeline.config import Job, JobOptions
    from ossbatch.pipeline.driver import job_spec
    from ossbatch.pipeline.infer import ShardInferencer

    batch = [chat_line("story", "write about the sea " * 20, n=4, seed=11, max_completion_tokens=4, temperature=1.0),
             chat_line("unseeded", "write about hills " * 20, n=3, max_completion_tokens=4, temperature=1.0)]
    inputs = write_jsonl(tmp_path / "batch.jsonl", batch)
    outputs = {}
    for name in ("out", "results.jsonl"):
        job = Job(model=str(tiny_model_dir), inputs=[inputs], output=str(tmp_path / name),
                  options=JobOptions(temperature=1.0, max_tokens=4, keep_token_ids=True,
                                     served_model_name="gpt-oss-20b"))  # the lines' model: the tiny one serves it
        outputs[name] = run_job(job_spec(job), ShardInferencer(job))

    rows = parts(tmp_path / "out")
    assert [r["id"] for r in rows] == [f"story#{i}" for i in range(4)] + [f"unseeded#{i}" for i in range(3)]
    by_line = {line: [r for r in rows if r["id"].startswith(line + "#")] for line in ("story", "unseeded")}
    for choices in by_line.values():
        assert len({tuple(r["prompt_token_ids"]) for r in choices}) == 1  # one prompt
        # ... prefilled once: every choice reads all but its last prompt token from the shared prefix
        assert all(r["cached_prompt_tokens"] == r["prompt_tokens"] - 1 for r in choices)
        assert len({tuple(r["output_token_ids"]) for r in choices}) > 1  # the choices sample apart
    # The two prompts' common harmony header is computed once, then each line's prompt less its last
    # token past the header, then each choice computes that last token.
    story, hills = (by_line[line][0]["prompt_token_ids"] for line in ("story", "unseeded"))
    header = next(i for i, (a, b) in enumerate(zip(story, hills)) if a != b)
    assert header >= MIN_ROOT_TOKENS
    computed = header + sum(choices[0]["prompt_tokens"] - 1 - header for choices in by_line.values()) + len(rows)
    assert outputs["out"]["tokens"]["prompt_computed"] == computed

    by_id = parse((tmp_path / "results.jsonl").read_text())
    assert list(by_id) == ["story", "unseeded"]
    for line, n in (("story", 4), ("unseeded", 3)):
        body = ChatCompletion.model_validate(by_id[line]["response"]["body"])
        choices = by_line[line]
        assert [c.index for c in body.choices] == list(range(n))
        assert body.usage.prompt_tokens == choices[0]["prompt_tokens"]
        assert body.usage.completion_tokens == sum(r["completion_tokens"] for r in choices)
        assert body.usage.prompt_tokens_details.cached_tokens == choices[0]["prompt_tokens"] - 1


def test_a_parquet_batch_input_with_n(tmp_path):
    import pyarrow as pa

    batch = [chat_line("p", "Name a colour", n=2, seed=3), chat_line("q", "Once", n=1, seed=4)]
    pq.write_table(pa.Table.from_pylist(batch), tmp_path / "batch.parquet")
    output = tmp_path / "results.jsonl"
    run_job(JobSpec(inputs=str(tmp_path / "batch.parquet"), output=str(output)), FakeEngine())
    by_id = parse(output.read_text())
    assert list(by_id) == ["p", "q"]
    assert [c.message.content for c in ChatCompletion.model_validate(by_id["p"]["response"]["body"]).choices] == \
        ["answer to p#0", "answer to p#1"]
    pq.write_table(pa.Table.from_pylist([*batch, chat_line("p#1", "clash")]), tmp_path / "clash.parquet")
    with pytest.raises(InputError, match="'p#1'"):  # the planner reads the bodies' n for the choice ids
        plan_job(JobSpec(inputs=str(tmp_path / "clash.parquet"), output=str(tmp_path / "clash")))
