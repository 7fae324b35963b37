"""The run stage: render a shard's requests, pack them into length buckets, generate each run of
buckets with the engine (one KV cache whose freed slots take the run's next rows), and parse the
completions.

`ShardInferencer` is built per job and called per shard; the model it runs comes from
`load_engine`, cached on the engine settings alone, so a Ray actor or a long-lived worker loads
it once for every job that shares them (whatever their sampling settings). It never touches files
or Prefect.
"""

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property, lru_cache

import torch

from ossbatch.engine.generate import Completion, SamplingParams, SharedPrefix, generate
from ossbatch.engine.host_memory import fit_expert_cache
from ossbatch.engine.model import Transformer
from ossbatch.pipeline.bucket import pack_batches_by_prefix
from ossbatch.pipeline.config import EngineConfig, Job
from ossbatch.pipeline.label_probs import LabelScoring, LabelSpelling, label_fields
from ossbatch.pipeline.logprobs import answer_logprobs, output_top_logprobs
from ossbatch.pipeline.parse import ParsedCompletion, parse_completion
from ossbatch.pipeline.render import REASONING_EFFORTS, render_prompt, stop_token_ids
from ossbatch.pipeline.stops import StopStrings, cut_at_stop
from ossbatch.pipeline.tools import call_id, call_spec

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def resolve_device(device: str, backend: str) -> str:
    """"auto": the GPU for the Triton backend when there is one, else the CPU
    (where Triton kernels run under TRITON_INTERPRET=1)."""
    if device != "auto":
        return device
    return "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"


@lru_cache(maxsize=2)
def load_engine(engine: EngineConfig) -> Transformer:
    """The model for ``engine``, loaded once per process."""
    return Transformer.from_checkpoint(engine.model, DTYPES[engine.dtype], engine.backend, engine.expert_cache_bytes,
                                       resolve_device(engine.device, engine.backend), engine.fp32_matmul)


def row_seed(job_seed: int, row_id: str) -> int:
    """A row's default seed: a stable hash of the job seed and the row's id, so
    the same row samples the same way in any batch, shard or re-run."""
    digest = hashlib.blake2b(f"{job_seed}:{row_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


@dataclass
class _Prepared:
    index: int
    prompt: list[int]
    params: SamplingParams
    grammar: object | None
    schema: str | None
    stop: list[str] | None = None  # OpenAI's stop strings, on the final answer (pipeline.stops)
    functions: frozenset[str] = frozenset()  # the request's function tools
    call_schemas: dict | None = None  # function -> parameter schema text, where the grammar constrains calls
    top_logprobs: int = 0  # K alternatives per generated token
    logprobs: bool = False  # the request asked for its answer's logprobs (a Batch line's logprobs / include)


@dataclass
class _Outcome:
    """A row's generation: its completion (None: generation failed, `error` says why) and the
    constraint's error; with --label-field, its parse and label spelling, made as it finished."""

    row: _Prepared
    completion: Completion | None
    error: str | None
    parsed: ParsedCompletion | None = None
    labelled: bool = False  # its schema makes --label-field an enum
    spelling: LabelSpelling | None = None  # None when the answer names no label


class _RowsHeard:
    """``on_progress`` for one batch, counting the rows it reported finished: if the batch fails,
    its rows run again one by one and report again, so those are taken back first."""

    def __init__(self, report: Callable[[int, int], None] | None):
        self.report, self.rows = report, 0

    def __call__(self, rows: int, tokens: int) -> None:
        self.rows += rows
        if self.report is not None:
            self.report(rows, tokens)

    def take_back(self) -> None:
        if self.report is not None and self.rows:
            self.report(-self.rows, 0)
        self.rows = 0


class ShardInferencer:
    """``infer(requests) -> (results, stats)`` for one job's shards. The model loads on the first
    call (or on ``.model``), so a job whose shards are all committed never loads it.

    ``on_progress(rows, tokens)``, when set, hears of rows finished and tokens generated inside a
    shard as they happen (every engine step; rows refused before the engine at once)."""

    on_progress: Callable[[int, int], None] | None = None
    host_budget = None  # how the last shard's --memory-budget was spent (engine.memory_plan.HostBudget)

    def __init__(self, job: Job):
        self.engine = job.engine
        self.settings = job.options.sampling
        self.batch_tokens = job.options.batch_tokens
        self.max_batch_rows = job.options.max_batch_rows
        self.prefix_sharing = job.options.prefix_sharing
        self.label_field = job.options.label_field
        self.label_seconds = 0.0  # engine time spent scoring labels (benchmarks read it)
        self.stops = stop_token_ids()

    @cached_property
    def model(self) -> Transformer:
        return load_engine(self.engine)

    @property
    def context(self) -> int:
        return self.model.config.max_position_embeddings

    def __call__(self, requests: list[dict]) -> tuple[list[dict], dict]:
        results: list[dict | None] = [None] * len(requests)
        prepared = []
        for i, request in enumerate(requests):
            if request.get("error"):
                results[i] = _error_row(request, request["error"])
                continue
            try:
                prepared.append(self._prepare(i, request))
            except ValueError as err:
                results[i] = _error_row(request, str(err))
            except Exception as err:  # noqa: BLE001 - one row's failure is that row's error
                results[i] = _error_row(request, f"render/grammar: {_describe(err)}")

        if self.on_progress is not None and len(prepared) < len(requests):
            self.on_progress(len(requests) - len(prepared), 0)
        stats = {"padded_prompt_slots": 0, "decode_slots": 0, "batches": 0, "engine_seconds": 0.0, "prompt_computed": 0,
                 "kv_bytes_saved": 0, "kv_cache_bytes": 0}
        budgets = [p.params.max_tokens for p in prepared]
        if prepared:
            # The expert cache gets what --memory-budget leaves after this shard's batch buffers at their
            # largest: --batch-tokens and --max-batch-rows, or less where the shard's rows need less.
            wanted = sum(len(p.prompt) + p.params.max_tokens for p in prepared)
            self.host_budget = fit_expert_cache(self.model, self.engine.memory_budget, min(self.batch_tokens, wanted),
                                                min(self.max_batch_rows, len(prepared)), self.engine.expert_cache_bytes,
                                                label_scoring=self.label_field is not None)
        # Rows whose prompts share a prefix are bucketed together; a row's KV holds its own tokens only.
        buckets = pack_batches_by_prefix([p.prompt for p in prepared], budgets, self.batch_tokens, self.max_batch_rows,
                                         share=self.prefix_sharing)
        group_of = {m: group for bucket, group in buckets for m in bucket}
        lengths = [len(p.prompt) - group_of[m].length for m, p in enumerate(prepared)]
        # Each run of buckets shares one KV cache whose freed slots take the run's next row.
        for run, slots in _refill_runs([b for b, _ in buckets], lengths, budgets, self.batch_tokens, self.max_batch_rows):
            members = [m for bucket in run for m in bucket]
            rows = [prepared[m] for m in members]
            position = {m: i for i, m in enumerate(members)}
            groups = [[position[m] for m in bucket] for bucket in run]
            shared = {}
            for m in members:
                if group_of[m].length:
                    shared.setdefault(id(group_of[m]), (group_of[m].length, []))[1].append(position[m])
            prefixes = [SharedPrefix(tuple(at), length) for length, at in shared.values()]
            heard = _RowsHeard(self.on_progress)
            try:
                outcomes = self._generate(rows, groups, slots, stats, prefixes, on_step=heard)
            except Exception as err:  # noqa: BLE001
                # Which row broke the batch? Each alone: a poison row fails by itself, the rest run.
                # When every row fails alone too, the engine is broken, not a row: stop the job.
                heard.take_back()  # rows the batch reported finished run again, and report again
                outcomes = []
                for row in rows:
                    try:
                        outcomes += self._generate([row], [[0]], 1, stats)
                    except Exception as row_err:  # noqa: BLE001
                        outcomes.append(_Outcome(row, None, f"generation: {_describe(row_err)}"))
                if all(outcome.completion is None for outcome in outcomes):
                    raise err
            # Parsing in a thread behind the engine measured no faster on 2 cores: openai-harmony
            # holds the GIL, and the engine's many small ops wait for it (benchmarks/README.md).
            for outcome in outcomes:
                row, completion = outcome.row, outcome.completion
                request = requests[row.index]
                if completion is None:
                    results[row.index] = _error_row(request, outcome.error)
                    continue
                try:
                    results[row.index] = self._result(request, row, completion, outcome.error, outcome.parsed)
                except Exception as err:  # noqa: BLE001
                    results[row.index] = _error_row(request, f"parse/validation: {_describe(err)}") | {
                        "prompt_tokens": len(row.prompt), "completion_tokens": len(completion.token_ids)}
                    continue
                if outcome.labelled and results[row.index]["status"] != "error":
                    results[row.index] |= label_fields(outcome.spelling, completion.continuation_logprobs)
        return results, stats

    def _generate(self, rows: list["_Prepared"], groups: list[list[int]], slots: int, stats: dict,
                  prefixes: list[SharedPrefix] = (), on_step: Callable[[int, int], None] | None = None) -> list[_Outcome]:
        """Each row's outcome, for one run of rows sharing a KV cache (and ``prefixes``). With
        --label-field, each row's labels are scored as it finishes, from its own KV."""
        constraint = _batch_constraint(rows, self.model.config.vocab_size)
        labels = LabelScoring([(r.prompt, r.schema, r.functions) for r in rows], self.label_field) if self.label_field else None
        started = time.perf_counter()
        completions, gen = generate(
            self.model,
            [r.prompt for r in rows],
            [r.params for r in rows],
            self.stops,
            constraint=constraint,
            logprobs=self.settings.logprobs or any(r.logprobs or r.top_logprobs for r in rows),
            top_logprobs=[r.top_logprobs for r in rows],
            masked_logprobs=self.settings.logprobs_distribution == "masked",
            prefill_groups=groups,
            slots=slots,
            shared_prefixes=list(prefixes),
            on_step=on_step or self.on_progress,
            continuations=labels,
        )
        stats["engine_seconds"] += time.perf_counter() - started
        stats["padded_prompt_slots"] += gen.padded_prompt_slots
        stats["decode_slots"] += gen.decode_slots
        stats["prompt_computed"] += gen.prompt_computed
        stats["kv_bytes_saved"] += gen.kv_bytes_saved
        stats["kv_cache_bytes"] = max(stats["kv_cache_bytes"], gen.kv_cache_bytes)  # runs hold theirs one at a time
        stats["batches"] += 1
        self.label_seconds += gen.scoring_seconds
        errors = constraint.errors() if constraint is not None else [None] * len(rows)
        if labels is None:
            return [_Outcome(row, completion, error) for row, completion, error in zip(rows, completions, errors)]
        return [_Outcome(row, completion, error, labels.parsed.get(n), n in labels.spellings, labels.spellings.get(n))
                for n, (row, completion, error) in enumerate(zip(rows, completions, errors))]

    def _prepare(self, index: int, request: dict) -> _Prepared:
        s = self.settings
        effort = request.get("reasoning_effort") or s.reasoning_effort
        if effort not in REASONING_EFFORTS:
            raise ValueError(f"reasoning_effort must be one of {', '.join(REASONING_EFFORTS)}, got {effort!r}")
        schema = request.get("schema") or s.response_schema
        max_reasoning = _first(request.get("max_reasoning_tokens"), s.max_reasoning_tokens)
        tools = request.get("tools")
        calls = call_spec(tools, request.get("tool_choice"))
        grammar, response_format = None, None
        if schema is not None or max_reasoning is not None or calls is not None:
            from ossbatch.pipeline.grammar import compile_row_grammar
            from ossbatch.pipeline.response_format import SchemaRefused, response_format_section

            try:
                grammar = compile_row_grammar(schema, max_reasoning, calls)
            except SchemaRefused as err:
                raise ValueError(f"{'schema' if schema is not None else 'tools'} refused: {err}") from None
            if schema is not None:
                response_format = response_format_section(schema)
        prompt = render_prompt(request["messages"], request.get("instructions"), effort, response_format, tools)
        if len(prompt) >= self.context:
            raise ValueError(f"prompt has {len(prompt)} tokens; the model's context is {self.context}")
        room = self.context - len(prompt)
        if request.get("max_tokens") is not None and request["max_tokens"] > room:
            # Refused, not clamped: a row asking for more than fits would silently get less.
            raise ValueError(f"max_tokens: {request['max_tokens']} is more than the {room} tokens the model's "
                             f"context ({self.context}) leaves after this row's {len(prompt)}-token prompt")
        max_tokens = min(s.max_tokens, room) if request.get("max_tokens") is None else request["max_tokens"]
        seed = request.get("seed")
        if seed is not None and not 0 <= int(seed) < 1 << 63:
            raise ValueError(f"seed: must be an integer from 0 to 2^63-1, got {seed}")
        params = SamplingParams(
            max_tokens=max_tokens,
            temperature=float(_first(request.get("temperature"), s.temperature)),
            top_p=float(_first(request.get("top_p"), s.top_p)),
            seed=int(seed) if seed is not None else row_seed(s.seed, request["id"]),
            presence_penalty=float(request.get("presence_penalty") or 0.0),
            frequency_penalty=float(request.get("frequency_penalty") or 0.0),
            logit_bias=_logit_bias(request.get("logit_bias"), self.model.config.vocab_size),
        )
        return _Prepared(index, prompt, params, grammar, schema,
                         stop=request.get("stop") or None,
                         functions=frozenset(t["name"] for t in tools or ()),
                         call_schemas=dict(calls.functions) if calls is not None else None,
                         top_logprobs=int(_first(request.get("top_logprobs"), s.top_logprobs)),
                         logprobs=bool(request.get("logprobs")))

    def _result(self, request: dict, row: _Prepared, completion: Completion, constraint_error: str | None,
                parsed: ParsedCompletion | None = None) -> dict:
        """The row's result (``parsed``: its parse, where label scoring made it already)."""
        from ossbatch.pipeline.answer import answer_fields, validate_answer  # re2 and jsonschema: only once rows run

        if parsed is None:
            parsed = parse_completion(completion.token_ids, completion.finish_reason, row.functions)
        result = _base_row(request) | {
            "status": parsed.status,
            "finish_reason": parsed.finish_reason,
            "output_text": parsed.output_text,
            "reasoning_text": parsed.reasoning_text,
            "error": parsed.error,
            "prompt_tokens": len(row.prompt),
            "cached_prompt_tokens": completion.cached_prompt_tokens,
            "reasoning_tokens": parsed.reasoning_tokens,
            "output_tokens": parsed.output_tokens,
            "completion_tokens": len(completion.token_ids),
            "tool_calls": [{"id": call_id(request["id"], i), **call} for i, call in enumerate(parsed.tool_calls)]
            if parsed.tool_calls else None,
        }
        answer = cut_at_stop(parsed.output_text, row.stop)
        if answer is not None and parsed.status != "error":  # a stop string ends the answer, as OpenAI's stop
            result |= {"output_text": answer, "status": "ok", "finish_reason": "stop"}
        if constraint_error:
            result |= {"status": "error", "finish_reason": "error", "error": constraint_error}
        # A parameter schema llguidance enforces only leniently (uniqueItems, ...) may let a call slip.
        for call in parsed.tool_calls if row.call_schemas and result["status"] == "ok" else ():
            schema_text = row.call_schemas.get(call["name"])
            if schema_text is not None and validate_answer(call["arguments"], schema_text)[1] is not True:
                result |= {"status": "error", "finish_reason": "error",
                           "error": f"tool call {call['name']}: arguments do not match the function's parameters"}
        if row.schema is not None and not parsed.tool_calls:  # a call is no answer to check
            result |= answer_fields(result["output_text"] or "", row.schema)
        if self.settings.keep_token_ids:
            result["prompt_token_ids"] = row.prompt
            result["output_token_ids"] = completion.token_ids
        if self.settings.logprobs or row.logprobs or row.top_logprobs:
            result["output_logprobs"] = completion.logprobs
        if row.top_logprobs:
            result["output_top_logprobs"] = output_top_logprobs(completion.top_logprobs)
        if row.logprobs:
            result["answer_logprobs"] = answer_logprobs(completion.token_ids, completion.logprobs, completion.top_logprobs,
                                                        parsed.answer_spans)
        return result


def _refill_runs(buckets: list[list[int]], lengths: list[int], budgets: list[int], batch_tokens: int, max_rows: int):
    """Consecutive length buckets sharing one KV cache of ``slots`` rows, each as wide as the run's
    longest prompt + largest budget, with ``slots * width <= batch_tokens`` (the KV memory one
    batch may use). A bucket joins the run unless its width would cut the slots by more than a
    quarter where they bind, so one long row does not narrow the cache for every short one.
    Yields (buckets, slots)."""
    run: list[list[int]] = []
    rows = width = first_cap = 0
    for bucket in buckets:
        b_width = max(lengths[i] for i in bucket) + max(budgets[i] for i in bucket)
        wider = _slot_cap(max(width, b_width), batch_tokens, max_rows)
        if run and wider < rows + len(bucket) and wider * 4 < first_cap * 3:
            yield run, min(_slot_cap(width, batch_tokens, max_rows), rows)
            run, rows, width = [], 0, 0
        if not run:
            first_cap = _slot_cap(b_width, batch_tokens, max_rows)
        run.append(bucket)
        rows, width = rows + len(bucket), max(width, b_width)
    if run:
        yield run, min(_slot_cap(width, batch_tokens, max_rows), rows)


def _slot_cap(width: int, batch_tokens: int, max_rows: int) -> int:
    return max(1, min(max_rows, batch_tokens // max(width, 1)))


def _batch_constraint(rows: list[_Prepared], vocab_size: int):
    inner = None
    if any(r.grammar is not None for r in rows):
        from ossbatch.pipeline.masks import BatchConstraint

        inner = BatchConstraint([r.grammar for r in rows], vocab_size)
    if any(r.stop for r in rows):
        return StopStrings([r.stop for r in rows], inner)
    return inner


def _logit_bias(bias: dict | None, vocab_size: int) -> dict[int, float]:
    """A row's logit_bias (validated as o200k_harmony ids), refused past the model's vocabulary."""
    for token in bias or {}:
        if not 0 <= int(token) < vocab_size:
            raise ValueError(f"logit_bias: token id {token} is outside the model's vocabulary ({vocab_size})")
    return {int(t): float(v) for t, v in (bias or {}).items()}


def _describe(err: BaseException) -> str:
    text = str(err) or type(err).__name__
    return text if isinstance(err, ValueError) else f"{type(err).__name__}: {text}"


def _first(value, default):
    return default if value is None else value


def _base_row(request: dict) -> dict:
    return {
        "id": request["id"],
        "passthrough": request.get("passthrough") or {},
        "request_kind": request.get("request_kind", "row"),
    }


def _error_row(request: dict, message: str) -> dict:
    return _base_row(request) | {
        "status": "error",
        "finish_reason": "error",
        "output_text": None,
        "reasoning_text": None,
        "error": message,
        "prompt_tokens": 0,
        "reasoning_tokens": 0,
        "output_tokens": 0,
        "completion_tokens": 0,
    }
