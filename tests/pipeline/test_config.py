"""The job configuration: one typed place, validated once with messages that name the flag,
secrets kept out of everything it serialises."""

import json

import pytest

from ossbatch.pipeline.config import EngineConfig, Job, JobOptions, SamplingOptions, flag_of
from ossbatch.pipeline.storage import InputError, Storage


@pytest.mark.parametrize("values, flag, words", [
    ({"temperature": float("nan")}, "--temperature", "finite"),
    ({"temperature": float("inf")}, "--temperature", "finite"),
    ({"temperature": 2.5}, "--temperature", "less than or equal to 2"),
    ({"top_p": 0.0}, "--top-p", "greater than 0"),
    ({"max_tokens": 0}, "--max-tokens", "greater than or equal to 1"),
    ({"dtype": "float16"}, "--dtype", "'float32' or 'bfloat16'"),
    ({"backend": "cuda"}, "--backend", "'torch' or 'triton'"),
    ({"reasoning_effort": "extreme"}, "--reasoning-effort", "'low', 'medium' or 'high'"),
    ({"ray_workers": 0}, "--ray-workers", "greater than or equal to 1"),
])
def test_a_bad_setting_is_refused_naming_its_flag(values, flag, words):
    with pytest.raises(InputError) as err:
        JobOptions.from_flags(values)
    assert str(err.value).startswith(f"{flag}: ") and words in str(err.value)


def test_flags_not_given_keep_the_defaults_and_unknown_keys_are_not_settings():
    assert JobOptions.from_flags({"temperature": None, "command": "run", "quiet": True}) == JobOptions()
    assert flag_of("storage") == "--storage-options" and flag_of("response_schema") == "--schema"


def test_the_engine_key_ignores_sampling_and_batching():
    cold = JobOptions(temperature=0.0, top_p=0.5, seed=3, max_tokens=7, batch_tokens=99, shard_rows=2)
    assert cold.engine("m") == JobOptions().engine("m") and hash(cold.engine("m")) == hash(JobOptions().engine("m"))
    assert JobOptions(dtype="bfloat16").engine("m") != JobOptions().engine("m")
    assert set(EngineConfig.model_fields) == {"model", "dtype", "backend", "device", "fp32_matmul", "expert_cache_bytes", "memory_budget"}
    assert cold.sampling == SamplingOptions(temperature=0.0, top_p=0.5, seed=3, max_tokens=7)


def test_storage_options_never_leave_the_storage_object():
    storage = Storage.from_options({"s3": {"secret": "hunter2"}})
    job = Job(model="m", inputs=["s3://b/in.jsonl"], output="s3://b/out", options=JobOptions(storage=storage))
    assert job.storage.options_for("s3://b/k") == {"secret": "hunter2"}
    assert "hunter2" not in json.dumps(job.model_dump(mode="json")) and "hunter2" not in repr(job)
    assert "hunter2" not in json.dumps(job.options.identity())
    assert job.on_device("cuda").storage.options == {"s3": {"secret": "hunter2"}}
    with pytest.raises(InputError, match="JSON object"):
        Storage.from_flag("[1, 2]")
    # A flow's options (prefect.yaml) give the fsspec options as they are.
    assert JobOptions(storage={"s3": {"anon": True}}).storage.options_for("s3://b/k") == {"anon": True}


def test_a_schema_given_as_a_dict_is_stored_as_canonical_text():
    options = JobOptions().with_schema({"type": "object", "properties": {"a": {"type": "string"}}})
    assert json.loads(options.response_schema)["properties"] == {"a": {"type": "string"}}
    assert options.identity()["schema"] == options.response_schema
    with pytest.raises(InputError, match="--temperature"):
        options.replaced(temperature=-1)


def test_the_job_identity_keeps_the_keys_earlier_outputs_were_written_with():
    # An output planned before the configuration moved here must still resume: same keys, same values.
    assert JobOptions().identity() == {
        "temperature": 1.0, "top_p": 1.0, "seed": 0, "max_tokens": 1024, "reasoning_effort": "medium",
        "max_reasoning_tokens": None, "schema": None, "keep_token_ids": False, "logprobs": False,
        "batch_tokens": 32768, "max_batch_rows": 256, "dtype": "float32", "backend": "torch", "fp32_matmul": "auto",
    }
    assert "device" not in JobOptions().identity() and "storage" not in JobOptions().identity()
