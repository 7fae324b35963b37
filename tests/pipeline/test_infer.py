"""The run stage's engine cache: keyed on the engine settings alone."""

import json

import pyarrow.parquet as pq

from ossbatch.engine.model import Transformer
from ossbatch.pipeline.config import Job, JobOptions
from ossbatch.pipeline.driver import job_spec, run_job
from ossbatch.pipeline.infer import ShardInferencer, load_engine
from pipeline_fakes import prompt_rows, write_jsonl


def test_a_second_job_changing_only_temperature_reuses_the_loaded_engine(tiny_model_dir, tmp_path, monkeypatch):
    loads = []
    real = Transformer.from_checkpoint

    def counting(*args, **kwargs):
        loads.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(Transformer, "from_checkpoint", staticmethod(counting))
    load_engine.cache_clear()
    inputs = write_jsonl(tmp_path / "in.jsonl", prompt_rows(3))

    def run(name, **options):
        job = Job(model=str(tiny_model_dir), inputs=[inputs], output=str(tmp_path / name),
                  options=JobOptions(max_tokens=3, **options))
        manifest = run_job(job_spec(job), ShardInferencer(job))
        assert manifest["rows"]["total"] == 3
        return json.loads((tmp_path / name / "_job.json").read_text())

    greedy = run("greedy", temperature=0.0)
    hot = run("hot", temperature=1.3)
    assert len(loads) == 1  # one model for both jobs
    assert greedy["job_key"] != hot["job_key"]  # yet two jobs: temperature is part of the identity
    assert pq.read_table(tmp_path / "hot" / "data" / "part-00000.parquet").num_rows == 3

    run("bf16", temperature=0.0, dtype="bfloat16")
    assert len(loads) == 2  # a different engine setting is a different model
    load_engine.cache_clear()


def test_an_inferencer_loads_nothing_until_it_runs(tiny_model_dir, monkeypatch):
    monkeypatch.setattr(Transformer, "from_checkpoint", staticmethod(lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded"))))
    load_engine.cache_clear()
    infer = ShardInferencer(Job(model=str(tiny_model_dir), inputs=["x"], output="y"))
    assert infer.settings == JobOptions().sampling and infer.engine.model == str(tiny_model_dir)


def test_an_exception_in_one_rows_grammar_generation_parse_or_validation_is_that_rows_error(tiny_model_dir, monkeypatch):
    from ossbatch.engine import generate as generate_module
    from ossbatch.pipeline import answer, grammar, infer, parse
    from ossbatch.pipeline.validate import normalize

    def schema(tag):
        return {"type": "object", "description": tag, "properties": {"a": {"type": "boolean"}}, "required": ["a"]}

    real_compile, real_generate, real_parse = grammar.compile_row_grammar, infer.generate, parse.parse_completion
    real_validate = answer.validate_answer

    def compile_row_grammar(schema_text, max_reasoning, *calls):
        if schema_text and "poison-grammar" in schema_text:
            raise KeyError("grammar blew up")
        return real_compile(schema_text, max_reasoning, *calls)

    def generate(model, prompts, params, *args, **kwargs):
        if any(p.seed == 4242 for p in params):
            raise OverflowError("Overflow when unpacking long long")
        return real_generate(model, prompts, params, *args, **kwargs)

    parsed = []

    def parse_completion(token_ids, finish_reason, *functions):
        parsed.append(1)
        if len(parsed) == 1:
            raise IndexError("parser blew up")
        return real_parse(token_ids, finish_reason, *functions)

    def validate_answer(text, schema_text):
        if "poison-validate" in schema_text:
            raise RecursionError("maximum recursion depth exceeded")
        return real_validate(text, schema_text)

    monkeypatch.setattr(grammar, "compile_row_grammar", compile_row_grammar)
    monkeypatch.setattr(infer, "generate", generate)
    monkeypatch.setattr(infer, "parse_completion", parse_completion)
    monkeypatch.setattr(answer, "validate_answer", validate_answer)
    assert generate_module  # the engine itself is untouched: only the calls into it fail
    records = [{"id": f"good-{i}", "prompt": f"hello {i}"} for i in range(4)]
    records += [{"id": "grammar", "prompt": "x", "schema": schema("poison-grammar")},
                {"id": "generate", "prompt": "x", "seed": 4242},
                {"id": "validate", "prompt": "x", "schema": schema("poison-validate")}]
    requests = [normalize(r, fallback_id=r["id"], where=f"in.jsonl line {i + 1}") for i, r in enumerate(records)]
    infer_shard = ShardInferencer(Job(model=str(tiny_model_dir), inputs=["x"], output="y",
                                      options=JobOptions(max_tokens=4, max_batch_rows=8)))
    results, stats = infer_shard(requests)
    by_id = {r["id"]: r for r in results}
    assert [r["id"] for r in results] == [r["id"] for r in records]
    assert by_id["grammar"]["status"] == "error" and "KeyError: 'grammar blew up'" in by_id["grammar"]["error"]
    assert by_id["generate"]["status"] == "error" and by_id["generate"]["error"].startswith("generation: OverflowError")
    assert by_id["validate"]["status"] == "error" and "parse/validation: RecursionError" in by_id["validate"]["error"]
    parse_failed = [r for r in results if "parser blew up" in (r["error"] or "")]
    assert len(parse_failed) == 1 and parse_failed[0]["status"] == "error"
    others = [r for r in results if r["id"] not in ("grammar", "generate", "validate") and r is not parse_failed[0]]
    assert len(others) >= 3 and all(r["status"] in ("ok", "length") and r["completion_tokens"] > 0 for r in others)


def test_an_engine_that_fails_for_every_row_stops_the_shard(tiny_model_dir, monkeypatch):
    from ossbatch.pipeline import infer

    def broken(*args, **kwargs):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(infer, "generate", broken)
    from ossbatch.pipeline.validate import normalize

    requests = [normalize({"id": f"r{i}", "prompt": "x"}, fallback_id="f", where="w") for i in range(3)]
    infer_shard = ShardInferencer(Job(model=str(tiny_model_dir), inputs=["x"], output="y", options=JobOptions(max_tokens=2)))
    import pytest

    with pytest.raises(RuntimeError, match="illegal memory access"):
        infer_shard(requests)


def test_a_failed_batchs_rows_are_counted_once_in_progress(tiny_model_dir, monkeypatch):
    """The batch reports two rows finished, then fails; each row runs again alone and reports again:
    the batch's two are taken back, so progress ends at the shard's rows, not above."""
    from ossbatch.pipeline import infer
    from ossbatch.pipeline.validate import normalize

    real_generate = infer.generate

    def generate(model, prompts, params, *args, **kwargs):
        if len(prompts) > 1:  # the batch: two rows finish, then the engine fails
            kwargs["on_step"](2, 8)
            raise OverflowError("Overflow when unpacking long long")
        return real_generate(model, prompts, params, *args, **kwargs)

    monkeypatch.setattr(infer, "generate", generate)
    heard = []
    infer_shard = ShardInferencer(Job(model=str(tiny_model_dir), inputs=["x"], output="y", options=JobOptions(max_tokens=3)))
    infer_shard.on_progress = lambda rows, tokens: heard.append((rows, tokens))
    requests = [normalize({"id": f"r{i}", "prompt": f"hi {i}"}, fallback_id="f", where="w") for i in range(4)]
    results, _ = infer_shard(requests)
    assert all(r["status"] in ("ok", "length") for r in results)
    assert heard[:2] == [(2, 8), (-2, 0)] and sum(rows for rows, _ in heard) == 4
