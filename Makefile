# Two commands for a newcomer: `make demo` and `make test`.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
OSSBATCH := $(VENV)/bin/ossbatch

# Offline machines keep the o200k vocabulary beside the project.
SHARED_TIKTOKEN := $(abspath ../shared/tiktoken)
ifneq ($(wildcard $(SHARED_TIKTOKEN)/o200k_base.tiktoken),)
export TIKTOKEN_ENCODINGS_BASE ?= $(SHARED_TIKTOKEN)
endif
# Nothing leaves loopback: Prefect's telemetry off.
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DO_NOT_TRACK := 1
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS := 90

.PHONY: demo test bench clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	# torch first, pinned: pip takes the local CPU build of exactly this version.
	$(VENV)/bin/pip install --quiet torch==2.13.0
	$(VENV)/bin/pip install --quiet -e '.[test]'
	touch $@

$(VENV): $(VENV)/.installed

demo: $(VENV)
	$(OSSBATCH) make-tiny-model demo/model --layers 2 --experts 8 --topk 2 --hidden 128 --intermediate 128 --heads 4 --kv-heads 2 --head-dim 32 --sliding-window 16
	$(OSSBATCH) run --model demo/model --input examples/prompts.jsonl --output demo/out --max-tokens 48 --temperature 0 --overwrite
	$(OSSBATCH) inspect demo/out
	# The same rows under a JSON Schema: the grammar makes even a random model answer validly.
	$(OSSBATCH) run --model demo/model --input examples/prompts.jsonl --output demo/out-schema --schema examples/sentiment.schema.json --label-field label --max-reasoning-tokens 16 --max-tokens 96 --orchestrator none --overwrite --quiet
	$(OSSBATCH) inspect demo/out-schema
	# label_confidence: the probability of the answer's label among the schema's labels (a random model is unsure).
	$(PY) -c "import polars as pl; print(pl.read_parquet('demo/out-schema/data').select('id', 'status', 'output_json', 'schema_valid', 'label_confidence', 'completion_tokens'))"

test: $(VENV)
	$(PY) -m pytest -q

bench: $(VENV)
	$(PY) benchmarks/run_all.py

clean:
	rm -rf demo .pytest_cache
