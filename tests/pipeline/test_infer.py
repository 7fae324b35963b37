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
