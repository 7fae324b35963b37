"""The run stage shares prompt prefixes: rows behind the same developer message (and schema) are
grouped, the prefix is computed once, and every row's tokens are those it gets without sharing."""

from ossbatch.flows.cli import build_parser
from ossbatch.pipeline.config import Job, JobOptions
from ossbatch.pipeline.infer import ShardInferencer

DEVELOPER = "Label each message as billing, shipping or other. " + "Definitions follow. " * 30
SCHEMA = '{"type": "object", "properties": {"label": {"enum": ["billing", "shipping", "other"]}}, "required": ["label"]}'


def _requests() -> list[dict]:
    rows = [{"id": f"r{i}", "messages": [{"role": "user", "content": f"message {i}: " + "refund " * (i % 5 + 1)}],
             "instructions": DEVELOPER} for i in range(6)]
    rows += [{"id": f"s{i}", "messages": [{"role": "user", "content": f"item {i} " * (i + 1)}], "instructions": DEVELOPER,
              "schema": SCHEMA} for i in range(3)]
    rows += [{"id": "alone", "messages": [{"role": "user", "content": "nothing shared here"}]}]
    return rows


def _run(tiny_model_dir, sharing: bool):
    job = Job(model=str(tiny_model_dir), inputs=["unused"], output="unused",
              options=JobOptions(temperature=0.0, max_tokens=4, keep_token_ids=True, logprobs=True, prefix_sharing=sharing,
                                 batch_tokens=4096, max_batch_rows=4))
    return ShardInferencer(job)(_requests())


def test_shared_prefixes_give_every_row_its_unshared_tokens(tiny_model_dir):
    plain, plain_stats = _run(tiny_model_dir, sharing=False)
    shared, stats = _run(tiny_model_dir, sharing=True)
    for a, b in zip(plain, shared):
        assert a["id"] == b["id"] and a["output_token_ids"] == b["output_token_ids"], a["id"]
        assert max(abs(x - y) for x, y in zip(a["output_logprobs"], b["output_logprobs"])) <= 1e-5, a["id"]
        assert a["cached_prompt_tokens"] == 0
    by_id = {r["id"]: r for r in shared}
    header = by_id["r0"]["cached_prompt_tokens"]
    assert header > len(DEVELOPER.split()) and all(by_id[f"r{i}"]["cached_prompt_tokens"] == header for i in range(6))
    # The schema rows' developer message goes on with the schema's section: they form a group of
    # their own that shares it too, and the two groups' common header is computed once (nested).
    schema_prefix = by_id["s0"]["cached_prompt_tokens"]
    assert schema_prefix > header and all(by_id[f"s{i}"]["cached_prompt_tokens"] == schema_prefix for i in range(3))
    r0, s0 = by_id["r0"]["prompt_token_ids"], by_id["s0"]["prompt_token_ids"]
    root = next(i for i, (a, b) in enumerate(zip(r0, s0)) if a != b)
    assert root > len(DEVELOPER.split())
    own = sum(r["prompt_tokens"] - r["cached_prompt_tokens"] for r in shared)
    assert stats["prompt_computed"] == root + (header - root) + (schema_prefix - root) + own
    assert by_id["alone"]["cached_prompt_tokens"] == 0
    prompt_tokens = sum(r["prompt_tokens"] for r in shared)
    assert plain_stats["prompt_computed"] == prompt_tokens and plain_stats["kv_bytes_saved"] == 0
    assert stats["prompt_computed"] < prompt_tokens - 4 * header and stats["kv_bytes_saved"] > 0


def test_no_prefix_sharing_flag():
    parser = build_parser()
    base = ["run", "--model", "m", "--input", "i", "--output", "o"]
    assert JobOptions.from_flags(vars(parser.parse_args(base))).prefix_sharing is True
    assert JobOptions.from_flags(vars(parser.parse_args(base + ["--no-prefix-sharing"]))).prefix_sharing is False


def test_n_samples_run_as_n_rows_over_one_shared_prompt(tiny_model_dir):
    """What `ossbatch synth --n 4` sends: each prompt four times, each copy its own seed."""
    requests = [{"id": f"p{p}#{k}", "messages": [{"role": "user", "content": f"write about topic {p} " * 20}], "seed": 100 * p + k}
                for p in range(2) for k in range(4)]
    out = {}
    for sharing in (False, True):
        job = Job(model=str(tiny_model_dir), inputs=["unused"], output="unused",
                  options=JobOptions(temperature=1.0, max_tokens=4, keep_token_ids=True, logprobs=True, prefix_sharing=sharing))
        out[sharing], _ = ShardInferencer(job)(requests)
    for a, b in zip(out[False], out[True]):
        assert a["output_token_ids"] == b["output_token_ids"], a["id"]
        assert max(abs(x - y) for x, y in zip(a["output_logprobs"], b["output_logprobs"])) <= 1e-5, a["id"]
        assert b["cached_prompt_tokens"] == b["prompt_tokens"] - 1  # all but the last prompt token, computed once
    assert len({tuple(r["output_token_ids"]) for r in out[True]}) > 2  # the copies really sample apart


def test_manifest_counts_what_sharing_saved(tiny_model_dir, tmp_path):
    import pyarrow.parquet as pq

    from ossbatch.pipeline.driver import job_spec, run_job
    from ossbatch.pipeline.inspect import format_manifest
    from pipeline_fakes import write_jsonl

    rows = [{"id": f"q{i}", "prompt": f"question {i}", "instructions": DEVELOPER} for i in range(5)]
    inputs = write_jsonl(tmp_path / "in.jsonl", rows)
    job = Job(model=str(tiny_model_dir), inputs=[inputs], output=str(tmp_path / "out"),
              options=JobOptions(temperature=0.0, max_tokens=3))
    manifest = run_job(job_spec(job), ShardInferencer(job))
    tokens = manifest["tokens"]
    cached = pq.read_table(tmp_path / "out" / "data" / "part-00000.parquet").column("cached_prompt_tokens").to_pylist()
    assert tokens["cached_prompt"] == sum(cached) > 0 and len(set(cached)) == 1
    assert tokens["prompt_computed"] == tokens["prompt"] - 4 * cached[0]  # the prefix computed once for five rows
    assert tokens["kv_bytes_saved"] > 0
    assert f"prompt computed {tokens['prompt_computed']:,}" in format_manifest(str(tmp_path / "out"))
