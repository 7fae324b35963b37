"""`ossbatch`: the command line.

    ossbatch make-tiny-model DIR [--preset gpt-oss-20b | shape flags]
    ossbatch run --model DIR --input PATH... --output PATH [sampling, batching, storage flags]
    ossbatch label --labels A B C ... [--gold-column COL]   (same job flags as run)
    ossbatch synth --n 4 [--dedupe]                         (same job flags as run)
    ossbatch eval --gold-column answer [--grading choice|exact]      (same job flags as run)
    ossbatch serve | deploy [--prefect-file prefect.yaml]   (the nightly deployments)
    ossbatch plan --model DIR --gpu-memory 80GiB --max-context N [--shared-prefix-tokens N]
    ossbatch inspect OUTPUT [--json]
    ossbatch report OUTPUT                                  (the job's charts as one HTML page)

Every job command (run, label, synth, eval) takes --orchestrator prefect|none and the prices
--price-per-million-tokens IN OUT and --gpu-hour-price P (the job's cost, in its manifest). Exit status: 0 ok,
1 a job failed, 2 a usage error (one line on stderr, before Prefect is imported).
"""

import argparse
import difflib
import json
import math
import re
import sys
import typing
from datetime import datetime, timezone
from pathlib import Path

from ossbatch.engine.config import CheckpointError
from ossbatch.flows.environment import prepare_environment
from ossbatch.flows.progress import DEFAULT_INTERVAL
from ossbatch.pipeline.config import (
    CostOptions, EngineOptions, Job, JobOptions, PipelineOptions, RunnerOptions, SamplingOptions,
)
from ossbatch.pipeline.storage import LOCAL, InputError, Storage


USAGE_ERROR, JOB_FAILED = 2, 1  # exit statuses (README "Exit status"); 0 is success


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the examples' layout and ends each flag's help with its default (where it has one)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if ("(default" in text or action.default is None or action.default is False
                or action.default == argparse.SUPPRESS or not action.option_strings):
            return text
        shown = " ".join(map(str, action.default)) if isinstance(action.default, (list, tuple)) else "%(default)s"
        return f"{text} (default: {shown})"


class Parser(argparse.ArgumentParser):
    """argparse without abbreviations, whose usage errors are one line with a "did you mean"."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def option_names(self) -> list[str]:
        return [name for action in self._actions for name in action.option_strings]

    def error(self, message: str):
        bad = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
        if bad:
            choices = re.findall(r"'([^']*)'", bad.group(2))
            message += _did_you_mean(bad.group(1), choices)
        self.exit(USAGE_ERROR, f"{self.prog}: {message} (see {self.prog} --help)\n")

    def unrecognized(self, extras: list[str]):
        """Refuses unknown arguments, suggesting the closest flag of this command."""
        unknown = next((e for e in extras if e.startswith("-")), extras[0])
        flag = unknown.split("=", 1)[0]
        message = f"unrecognized argument{'s' if len(extras) > 1 else ''}: {' '.join(extras)}"
        self.error(message + (_did_you_mean(flag, self.option_names()) if flag.startswith("-") else ""))


def _did_you_mean(word: str, options: list[str]) -> str:
    close = difflib.get_close_matches(word, options, n=3, cutoff=0.6)
    return f"; did you mean {' or '.join(close)}?" if close else ""


def _storage_flag(text: str) -> Storage:
    try:
        return Storage.from_flag(text)
    except InputError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _positive(flag: str, kind: type, noun: str, positive: str):
    """An argparse type: ``kind(text)``, finite and above zero, or a message naming ``flag``."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} must be {noun}, got {text!r}") from None
        if not value > 0 or value == float("inf"):
            raise argparse.ArgumentTypeError(f"{flag} must be {positive}, got {text if kind is float else value}")
        return value

    return parse


def _size_flag(flag: str):
    """An argparse type: a size such as 4GiB, 512MB or a byte count."""
    def parse(text: str) -> int:
        from ossbatch.engine.memory_plan import parse_bytes

        try:
            return parse_bytes(text, flag)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    return parse


def _positive_int(flag: str):
    return _positive(flag, int, "an integer", "positive")


def _positive_float(flag: str):
    return _positive(flag, float, "a number", "a positive number")


def _probability(flag: str):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not 0 <= value <= 1:
            raise argparse.ArgumentTypeError(f"{flag} must be a probability from 0 to 1, got {text!r}")
        return value
    return parse


def _read_json_file(flag: str, path: str):
    try:
        return json.loads(Path(path).read_text())
    except OSError as err:
        raise InputError(f"{flag} {path}: {err.strerror}") from None
    except json.JSONDecodeError as err:
        raise InputError(f"{flag} {path} is not valid JSON: {err}") from None


def _read_schema_file(path: str) -> str:
    _read_json_file("--schema", path)
    return Path(path).read_text()  # as written: the schema text is part of the job's identity


def cmd_make_tiny_model(args) -> int:
    from ossbatch.engine.tiny_model import preset_config, write_random_checkpoint

    config = preset_config(
        args.preset,
        num_hidden_layers=args.layers,
        num_local_experts=args.experts,
        num_experts_per_tok=args.topk,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        head_dim=args.head_dim,
        sliding_window=args.sliding_window,
    )
    path = write_random_checkpoint(args.dir, config, seed=args.seed, layout=args.layout, layers_per_shard=args.layers_per_shard)
    print(f"wrote a random gpt-oss checkpoint ({config.num_hidden_layers} layers, {config.num_local_experts} experts, hidden {config.hidden_size}) to {path}")
    return 0


def _job_options(args) -> JobOptions:
    """The job's settings, built and validated once from the flags."""
    flags = vars(args)
    if getattr(args, "command", None) == "run" and args.schema:
        flags = {**flags, "response_schema": _read_schema_file(args.schema)}
    return JobOptions.from_flags(flags)


def _preflight(model: str, inputs: list[str], storage: Storage, columns: dict[str, str] | None = None) -> None:
    """Refuses a bad model, a missing input or a missing input column (``{flag: column}``)
    before Prefect is imported or its server started."""
    from ossbatch.engine.config import read_config
    from ossbatch.pipeline.storage import expand_inputs

    read_config(model)
    expand_inputs(inputs, storage)
    if columns:
        from ossbatch.flows.jobs import check_columns

        check_columns(inputs, storage, columns)


def _start_prefect(model: str, options: JobOptions, job_output: str, flows_module: str) -> None:
    """Starts Prefect's temporary server (unless PREFECT_API_URL names one), then imports the
    flows (and Prefect) and loads the model while it starts: the flow needs all three, and the
    waits overlap. A finished job loads no model, nor does this process when Ray actors run it."""
    import importlib

    from ossbatch.flows.server import start_in_background
    from ossbatch.pipeline.job import read_manifest

    server = start_in_background()
    importlib.import_module(flows_module)
    if options.runner == "local" and read_manifest(job_output, options.storage) is None:
        from ossbatch.pipeline.infer import load_engine

        load_engine(options.engine(model))  # cached: the flow's shards find it loaded
    if server is not None:
        server.wait()


def cmd_run(args) -> int:
    job = Job(model=args.model, inputs=args.input, output=args.output, options=_job_options(args))
    if job.options.runner != "local" and args.orchestrator == "none":
        raise InputError("--runner ray needs --orchestrator prefect (shards are Prefect tasks)")
    _preflight(job.model, job.inputs, job.storage)
    if args.orchestrator == "prefect":
        _start_prefect(job.model, job.options, job.output, "ossbatch.flows.batch")
        from ossbatch.flows.batch import batch_inference

        batch_inference(job, quiet=args.quiet, progress_seconds=args.progress_seconds)
    else:
        from ossbatch.flows.plain import run_job_plain

        run_job_plain(job, quiet=args.quiet, progress_seconds=args.progress_seconds)
    if not args.quiet:
        from ossbatch.pipeline.inspect import format_manifest

        print(format_manifest(args.output, job.storage))
    return 0


def _nightly(args, job: str):
    """The nightly job's function: its Prefect flow, or (``--orchestrator none``) its plain body."""
    import functools

    if args.orchestrator == "none":
        from ossbatch.flows import derived

        body = {"label": derived.label, "synth": derived.synth, "eval": derived.evaluate}[job]
        return functools.partial(body, derived.Plain(args.progress_seconds))
    from ossbatch.flows.jobs import job_dir, resolve_output

    today = datetime.now(timezone.utc).date()  # a command's run is scheduled now
    _start_prefect(args.model, _job_options(args), job_dir(resolve_output(args.output, today)), "ossbatch.flows.nightly")
    from ossbatch.flows import nightly

    flow = {"label": nightly.label_job, "synth": nightly.synth_job, "eval": nightly.eval_job}[job]
    return functools.partial(flow, progress_seconds=args.progress_seconds)


def cmd_label(args) -> int:
    labels = args.labels if args.labels else _read_json_file("--labels-file", args.labels_file)
    _preflight(args.model, args.input, args.storage, {"--gold-column": args.gold_column} if args.gold_column else None)
    summary = _nightly(args, "label")(args.model, args.input, args.output, labels, gold_column=args.gold_column,
                                      label_field=args.label_field, name=args.name, options=_job_options(args),
                                      quiet=args.quiet, min_confidence=args.min_confidence)
    if not args.quiet:
        abstained = f", {summary['abstained']} abstained" if args.min_confidence is not None else ""
        print(f"{summary['labeled']} of {summary['rows']} rows labeled{abstained} -> {summary['labels']}")
        if summary["confusion"]:
            print(f"confusion table -> {summary['confusion']}")
        print(summary["table"])
        print(f"report -> {summary['report_html']}")
    return 0


def cmd_synth(args) -> int:
    schema = _read_json_file("--schema", args.schema) if args.schema else None
    _preflight(args.model, args.input, args.storage)
    summary = _nightly(args, "synth")(args.model, args.input, args.output, n=args.n, dedupe=args.dedupe,
                                      answer_schema=schema, options=_job_options(args), quiet=args.quiet)
    if not args.quiet:
        dropped = f", {summary['duplicates']} duplicate answers dropped" if args.dedupe else ""
        print(f"{summary['rows']} rows x {args.n} samples: {summary['kept']} kept{dropped} -> {summary['samples']}")
        print(f"report -> {summary['report_html']}")
    return 0


def cmd_eval(args) -> int:
    schema = _read_json_file("--schema", args.schema) if args.schema else None
    _preflight(args.model, args.input, args.storage, {"--gold-column": args.gold_column})
    summary = _nightly(args, "eval")(
        args.model, args.input, args.output, gold_column=args.gold_column, grading_rule=args.grading,
        answer_field=args.answer_field, choices=args.choices, category_column=args.category_column or None,
        name=args.name, history=args.history, answer_schema=schema,
        options=_job_options(args), quiet=args.quiet,
    )
    if not args.quiet:
        print(summary["report"])
        print(f"\ngraded rows -> {summary['graded']}\nsummary -> {summary['summary']}\nreport -> {summary['report_html']}")
    return 0


def cmd_report(args) -> int:
    from ossbatch.flows.report import write_report

    print(write_report(args.output, args.storage))
    return 0


def cmd_serve(args) -> int:
    from ossbatch.flows.schedules import default_prefect_file, serve

    return serve(args.prefect_file or default_prefect_file(), args.deployment or None, limit=args.limit)


def cmd_deploy(args) -> int:
    from ossbatch.flows.schedules import default_prefect_file, deploy

    return deploy(args.prefect_file or default_prefect_file(), args.pool)


def cmd_plan(args) -> int:
    from ossbatch.engine.config import read_config
    from ossbatch.engine.memory_plan import format_plan, format_rows_by_context, parse_bytes, plan_memory, rows_by_context

    config = read_config(args.model)
    try:
        gpu = parse_bytes(args.gpu_memory)
        plan = plan_memory(config, gpu, args.max_context, shared_prefix_tokens=args.shared_prefix_tokens,
                           label_scoring=args.label_scoring)
    except ValueError as err:
        raise InputError(str(err)) from None
    print(format_plan(plan))
    print()
    print(format_rows_by_context(rows_by_context(config, gpu, args.shared_prefix_tokens, label_scoring=args.label_scoring)))
    return 0


def cmd_inspect(args) -> int:
    from ossbatch.pipeline.inspect import format_manifest, has_job, manifest_or_plan

    if not has_job(args.output, args.storage):
        manifest_or_plan(args.output, args.storage)  # raises: the folder holds no job
    if args.json:
        print(json.dumps(manifest_or_plan(args.output, args.storage), indent=2, sort_keys=True))
    else:
        print(format_manifest(args.output, args.storage, max_failures=args.failures))
    return 0


def _default(part, field: str):
    return part.model_fields[field].default


def _choices(part, field: str) -> list[str]:
    return list(typing.get_args(part.model_fields[field].annotation))


def _examples(*lines: str) -> str:
    return "examples:\n" + "\n".join(f"  {line}" for line in lines)


def _job_flags(p: argparse.ArgumentParser, output_help: str) -> None:
    """The flags every batch job takes (run, label, synth, eval)."""
    p.add_argument("--model", required=True, help="checkpoint directory (Hugging Face or original/ layout)")
    p.add_argument("--input", required=True, nargs="+", help="paths, URIs or globs: JSONL(.gz), Parquet, OpenAI Batch files")
    p.add_argument("--output", required=True, help=output_help)
    sampling, engine, pipeline, runner = SamplingOptions, EngineOptions, PipelineOptions, RunnerOptions
    p.add_argument("--temperature", type=float, default=_default(sampling, "temperature"),
                   help="sampling temperature, 0 to 2; 0 is greedy")
    p.add_argument("--top-p", type=float, default=_default(sampling, "top_p"), help="nucleus sampling mass, in (0, 1]")
    p.add_argument("--seed", type=int, default=_default(sampling, "seed"),
                   help="job seed; each row samples with a hash of it and the row's id")
    p.add_argument("--max-tokens", type=_positive_int("--max-tokens"), default=_default(sampling, "max_tokens"),
                   help="tokens a row may generate, reasoning included")
    p.add_argument("--max-reasoning-tokens", type=_positive_int("--max-reasoning-tokens"),
                   help="cap on the reasoning (analysis) tokens before the final answer (default: no cap)")
    p.add_argument("--reasoning-effort", choices=_choices(sampling, "reasoning_effort"),
                   default=_default(sampling, "reasoning_effort"), help="the harmony system prompt's reasoning effort")
    p.add_argument("--dtype", choices=_choices(engine, "dtype"), default=_default(engine, "dtype"),
                   help="dtype of the non-expert weights and activations")
    p.add_argument("--backend", choices=_choices(engine, "backend"), default=_default(engine, "backend"),
                   help="torch ops, or the Triton kernels (interpreted on a CPU)")
    p.add_argument("--device", choices=_choices(engine, "device"), default=_default(engine, "device"),
                   help="auto: the GPU for the triton backend when there is one, else the CPU")
    p.add_argument("--fp32-matmul", choices=_choices(engine, "fp32_matmul"), default=_default(engine, "fp32_matmul"),
                   help="float32 CPU matmuls: auto uses oneDNN's bf16 mode (~2.5x faster) where a start-up probe shows it "
                        "keeps float32-level error, else ieee; bf16 forces it")
    p.add_argument("--memory-budget", type=_size_flag("--memory-budget"), default=_default(engine, "memory_budget"),
                   help="anonymous host memory the job may use besides the memory-mapped weights (e.g. 4GiB); sizes the "
                        "expert cache (default: what the machine or its memory cgroup leaves)")
    p.add_argument("--shard-rows", type=_positive_int("--shard-rows"), default=_default(pipeline, "shard_rows"),
                   help="rows per shard: the unit that is committed, resumed and retried")
    p.add_argument("--batch-tokens", type=_positive_int("--batch-tokens"), default=_default(pipeline, "batch_tokens"),
                   help="KV-cache budget of one batch: rows x (longest prompt + largest max tokens)")
    p.add_argument("--max-batch-rows", type=_positive_int("--max-batch-rows"),
                   default=_default(pipeline, "max_batch_rows"), help="KV slots: rows decoding at once")
    p.add_argument("--no-prefix-sharing", dest="prefix_sharing", action="store_false",
                   help="prefill and store every row's whole prompt, even where rows share a prefix (for comparison; "
                        "default: share)")
    p.add_argument("--storage-options", dest="storage", type=_storage_flag, default=LOCAL,
                   help="fsspec options as JSON, flat or keyed by protocol ({\"s3\": {...}}); never written to the "
                        "output (default: none)")
    p.add_argument("--overwrite", action="store_true", help="replace an output written by a different job")
    p.add_argument("--served-model-name", metavar="NAME",
                   help="a name a Batch line's model may give, besides the checkpoint folder's and gpt-oss-20b/-120b "
                        "(lines asking for any other model fail); the Batch output's model when a line names none")
    p.add_argument("--error-output", metavar="PATH",
                   help="where a Batch (.jsonl) output's failed lines go (default: OUTPUT with .errors.jsonl)")
    p.add_argument("--runner", choices=_choices(runner, "runner"), default=_default(runner, "runner"),
                   help="local: shards run in this process; ray: on Ray actors (needs --orchestrator prefect)")
    p.add_argument("--ray-address", help="a Ray cluster to run on (default: start a local one)")
    p.add_argument("--ray-workers", type=_positive_int("--ray-workers"),
                   help="Ray actors, each loading the model once (default: one per GPU, else one per node)")
    cost = CostOptions
    p.add_argument("--price-per-million-tokens", nargs=2, type=float, metavar=("IN", "OUT"),
                   default=list(_default(cost, "price_per_million_tokens")),
                   help="prices per million prompt (IN) and completion (OUT) tokens: the cost in the manifest")
    p.add_argument("--gpu-hour-price", type=float, default=_default(cost, "gpu_hour_price"),
                   help="price of one GPU hour (wall time, or the summed shard time when larger): the cost in the manifest")
    p.add_argument("--quiet", action="store_true", help="print nothing but warnings and errors (for cron)")
    p.add_argument("--progress-seconds", type=_positive_float("--progress-seconds"), default=DEFAULT_INTERVAL,
                   help="seconds between progress lines when stderr is not a terminal (cron, logs); a terminal "
                        "shows a live bar instead")
    p.add_argument("--orchestrator", choices=["prefect", "none"], default="prefect",
                   help="prefect: a Prefect flow (a task per shard; reports to PREFECT_API_URL when set, else to a "
                        "temporary local server); none: the same stages in a plain loop, no Prefect")


def build_parser() -> Parser:
    parser = Parser(prog="ossbatch", description="Offline batch inference for gpt-oss models.",
                    epilog="exit status: 0 success, 1 a job failed, 2 a usage error (bad flag, input or output).\n"
                           + _examples("ossbatch run --model demo/model --input examples/prompts.jsonl --output demo/out",
                                       "ossbatch inspect demo/out", "ossbatch run --help"))
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser, metavar="COMMAND")

    tiny = sub.add_parser("make-tiny-model", help="write a random checkpoint in the released layout",
                          description="Write a random gpt-oss checkpoint in the released layout (MXFP4 experts).",
                          epilog=_examples(
                              "ossbatch make-tiny-model demo/model --layers 2 --experts 8 --topk 2 --hidden 128 "
                              "--intermediate 128 --heads 4 --kv-heads 2 --head-dim 32 --sliding-window 16",
                              "ossbatch make-tiny-model /tmp/20b-shaped --preset gpt-oss-20b --layers 1",
                              "ossbatch make-tiny-model /tmp/tiny --layout both --layers-per-shard 1"))
    tiny.add_argument("dir", help="directory to write the checkpoint to")
    tiny.add_argument("--preset", choices=["tiny", "gpt-oss-20b", "gpt-oss-120b"], default="tiny",
                      help="the shape to start from; the flags below override it")
    for flag, name, what in [("--layers", "layers", "transformer layers"), ("--experts", "experts", "experts per layer"),
                             ("--topk", "topk", "experts each token is routed to"), ("--hidden", "hidden", "hidden size"),
                             ("--intermediate", "intermediate", "expert intermediate size"),
                             ("--heads", "heads", "attention heads"), ("--kv-heads", "kv_heads", "key/value heads"),
                             ("--head-dim", "head_dim", "size of one attention head"),
                             ("--sliding-window", "sliding_window", "sliding attention window in tokens")]:
        tiny.add_argument(flag, dest=name, type=_positive_int(flag), help=f"{what} (default: the preset's)")
    tiny.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    tiny.add_argument("--layout", choices=["hf", "original", "both"], default="hf",
                      help="Hugging Face files, the original/ folder, or both")
    tiny.add_argument("--layers-per-shard", type=int, default=0,
                      help="split into indexed safetensors shards of this many layers (default: 0, one file)")
    tiny.set_defaults(func=cmd_make_tiny_model)

    run = sub.add_parser("run", help="run a batch job", description="Run a batch job: every input row through the model.",
                         epilog=_examples(
                             "ossbatch run --model demo/model --input examples/prompts.jsonl --output demo/out "
                             "--max-tokens 48 --temperature 0",
                             "ossbatch run --model demo/model --input examples/prompts.jsonl --output demo/structured "
                             "--schema examples/sentiment.schema.json --orchestrator none",
                             "ossbatch run --model /models/gpt-oss-20b --input 's3://bucket/in/*.parquet' "
                             "--output s3://bucket/out --shard-rows 5000 --quiet"))
    _job_flags(run, output_help="output directory (Parquet parts + _manifest.json) or a .jsonl (Batch output)")
    run.add_argument("--schema", help="a JSON Schema file every row's final answer must follow")
    run.add_argument("--keep-token-ids", action="store_true", help="add prompt_token_ids and output_token_ids columns")
    run.add_argument("--logprobs", action="store_true", help="add output_logprobs: each generated token's log-probability")
    run.add_argument("--logprobs-distribution", choices=_choices(SamplingOptions, "logprobs_distribution"),
                     default=_default(SamplingOptions, "logprobs_distribution"),
                     help="raw: logprobs under the model's own distribution (default); masked: under the distribution "
                          "a schema's grammar leaves, renormalised over the tokens it allows")
    run.add_argument("--label-field", metavar="PROPERTY",
                     help="for rows whose schema makes this answer property an enum: label_probs (each allowed "
                          "value's probability where the answer names it) and label_confidence")
    run.add_argument("--top-logprobs", type=int, default=_default(SamplingOptions, "top_logprobs"), metavar="K",
                     help="add output_top_logprobs: each generated token's K (0 to 20) most likely tokens, under the "
                          "model's raw distribution (a row's top_logprobs overrides it)")
    run.set_defaults(func=cmd_run)

    derived = "output root: job/ holds the batch job, {what} beside it; {{date}} becomes the run's date"
    label = sub.add_parser("label", help="bulk classification: every row answers with one of --labels",
                           description="Bulk classification: every row answers with one of --labels.",
                           epilog=_examples(
                               "ossbatch label --model demo/model --input examples/nightly/reviews.jsonl "
                               "--output labels/{date} --labels positive negative neutral",
                               "ossbatch label --model demo/model --input examples/nightly/reviews.jsonl --output labels/gold "
                               "--labels positive negative neutral --gold-column sentiment",
                               "ossbatch label --model demo/model --input examples/nightly/reviews.jsonl --output labels/demo --labels-file labels.json --quiet"))
    _job_flags(label, output_help=derived.format(what="labels.parquet and confusion.parquet"))
    given = label.add_mutually_exclusive_group(required=True)
    given.add_argument("--labels", nargs="+", help="the labels (an enum JSON Schema is built from them)")
    given.add_argument("--labels-file", help="a JSON file: a list of labels, or a JSON Schema with a label property")
    label.add_argument("--label-field", default="label", help="the answer's property that holds the label")
    label.add_argument("--gold-column", help="input column with the true label: adds correct and a confusion table")
    label.add_argument("--min-confidence", type=_probability("--min-confidence"), metavar="P",
                       help="leave label null where the answer's label_confidence is below P (0 to 1; the probabilities "
                            "stay): abstentions get their own confusion-table column and accuracy counts the rest")
    label.add_argument("--name", help="name of the job's Prefect artifact (default: the input's file name)")
    label.set_defaults(func=cmd_label)

    synth = sub.add_parser("synth", help="synthetic data: --n samples per input row, each with its own seed",
                           description="Synthetic data: --n samples per input row, each with its own seed.",
                           epilog=_examples(
                               "ossbatch synth --model demo/model --input examples/nightly/topics.jsonl --output synth/{date} --n 4",
                               "ossbatch synth --model demo/model --input examples/nightly/topics.jsonl --output synth/dedup "
                               "--n 8 --dedupe --temperature 1",
                               "ossbatch synth --model demo/model --input examples/nightly/topics.jsonl --output synth/structured "
                               "--schema examples/sentiment.schema.json"))
    _job_flags(synth, output_help=derived.format(what="requests.jsonl and samples.parquet"))
    synth.add_argument("--n", type=_positive_int("--n"), default=4, help="samples per input row")
    synth.add_argument("--dedupe", action="store_true", help="keep one sample per distinct answer of a row")
    synth.add_argument("--schema", help="a JSON Schema file the samples' answers follow (structured synthetic data)")
    synth.set_defaults(func=cmd_synth)

    evaluate = sub.add_parser("eval", help="benchmark evaluation: accuracy, Wilson 95%% CI, per category, history",
                              description="Benchmark evaluation: accuracy with a Wilson 95%% interval, per category, "
                                          "and the change since the previous night (the history file).",
                              epilog=_examples(
                                  "ossbatch eval --model demo/model --input examples/nightly/eval.jsonl --output evals/{date}",
                                  "ossbatch eval --model demo/model --input examples/nightly/eval.jsonl --output evals/{date} "
                                  "--grading exact --gold-column answer --answer-field answer",
                                  "ossbatch eval --model demo/model --input examples/nightly/eval.jsonl --output evals/{date} "
                                  "--price-per-million-tokens 0.05 0.20 --quiet"))
    _job_flags(evaluate, output_help=derived.format(what="graded.parquet, summary.parquet and eval.json"))
    evaluate.add_argument("--gold-column", default="answer", help="input column with the right answer")
    evaluate.add_argument("--grading", choices=["choice", "exact"], default="choice",
                          help="choice: a letter of --choices; exact: --answer-field equals the gold answer")
    evaluate.add_argument("--answer-field", default="answer", help="the structured answer's property that is graded")
    evaluate.add_argument("--choices", default="ABCD", help="the choice letters (grading choice)")
    evaluate.add_argument("--category-column", default="category", help="per-category breakdown by this column, if present")
    evaluate.add_argument("--schema", help="answer JSON Schema file (default: built from --grading and --answer-field)")
    evaluate.add_argument("--name", help="the eval's name in its history and artifacts (default: the input's file name)")
    evaluate.add_argument("--history", help="history file (default: <output>/../<name>.history.jsonl)")
    evaluate.set_defaults(func=cmd_eval)

    serve = sub.add_parser("serve", help="run prefect.yaml's nightly deployments on their schedules, on this machine",
                           description="Run prefect.yaml's nightly deployments on their cron schedules, on this machine "
                                       "(needs a Prefect server that keeps running: PREFECT_API_URL).",
                           epilog=_examples("ossbatch serve", "ossbatch serve --deployment nightly-eval --limit 2",
                                            "ossbatch serve --prefect-file deploy/prefect.yaml"))
    serve.add_argument("--prefect-file", help="default: ./prefect.yaml, else the repository's")
    serve.add_argument("--deployment", action="append", help="serve only this deployment (repeatable; default: all)")
    serve.add_argument("--limit", type=_positive_int("--limit"), default=1, help="flow runs at once")
    serve.set_defaults(func=cmd_serve)

    deploy = sub.add_parser("deploy", help="register prefect.yaml's deployments with a work pool (prefect deploy --all)",
                            description="Register prefect.yaml's deployments with a work pool (prefect deploy --all).",
                            epilog=_examples("ossbatch deploy", "ossbatch deploy --pool gpu-pool",
                                             "ossbatch deploy --prefect-file deploy/prefect.yaml --pool gpu-pool"))
    deploy.add_argument("--prefect-file", help="default: ./prefect.yaml, else the repository's")
    deploy.add_argument("--pool", help="work pool for every deployment (default: each deployment's own)")
    deploy.set_defaults(func=cmd_deploy)

    plan = sub.add_parser("plan", help="memory arithmetic: weights, KV per token, largest batch",
                          description="Memory arithmetic: weight bytes, KV bytes per token, the largest batch that fits.",
                          epilog=_examples("ossbatch plan --model demo/model",
                                           "ossbatch plan --model /models/gpt-oss-120b --gpu-memory 80GiB --max-context 8192",
                                           "ossbatch plan --model /models/gpt-oss-20b --gpu-memory 16GiB --max-context 4096 --shared-prefix-tokens 1500"))
    plan.add_argument("--model", required=True, help="checkpoint directory")
    plan.add_argument("--gpu-memory", default="80GiB", help="memory of one GPU (e.g. 80GiB, 24GB)")
    plan.add_argument("--max-context", type=_positive_int("--max-context"), default=8192,
                      help="longest prompt + completion a row may have")
    plan.add_argument("--shared-prefix-tokens", type=int, default=0,
                      help="prompt tokens every row shares (e.g. the system + developer message), stored once (default: 0)")
    plan.add_argument("--label-scoring", action="store_true",
                      help="rows get label probabilities (ossbatch label, eval --grading choice, --label-field): "
                           "reserve what scoring them takes")
    plan.set_defaults(func=cmd_plan)

    inspect = sub.add_parser("inspect", help="show a job's manifest and first failing rows",
                             description="Show a job's manifest (or an unfinished job's progress) and the first rows "
                                         "that failed (error) or were cut off (length).",
                             epilog=_examples("ossbatch inspect demo/out", "ossbatch inspect labels/2026-11-30/job --failures 20",
                                              "ossbatch inspect demo/out --json | jq .rows"))
    inspect.add_argument("output", help="a job's output directory (or .jsonl)")
    inspect.add_argument("--storage-options", dest="storage", type=_storage_flag, default=LOCAL,
                         help="fsspec options as JSON (default: none)")
    inspect.add_argument("--failures", type=int, default=5, help="example rows to show per status (error, length)")
    inspect.add_argument("--json", action="store_true", help="print the manifest as JSON (for scripts)")
    inspect.set_defaults(func=cmd_inspect)

    report = sub.add_parser("report", help="write a job's HTML report (charts) beside its results",
                            description="Write one self-contained HTML page with a finished job's charts beside its "
                                        "results: _report.html in a run's folder, report.html in a label, synth or "
                                        "eval output root. Prints its path.",
                            epilog=_examples("ossbatch report demo/out", "ossbatch report out/nightly/eval/2026-11-30",
                                             "ossbatch report s3://bucket/out --storage-options '{\"anon\": false}'"))
    report.add_argument("output", help="a job's output directory, or a label/synth/eval output root")
    report.add_argument("--storage-options", dest="storage", type=_storage_flag, default=LOCAL,
                        help="fsspec options as JSON (default: none)")
    report.set_defaults(func=cmd_report)
    return parser


def parse(argv=None) -> argparse.Namespace:
    """The parsed flags; a usage error exits 2 with one line (and a suggestion for a near miss)."""
    parser = build_parser()
    args, extras = parser.parse_known_args(argv)
    if extras:
        parser._subparsers._group_actions[0].choices[args.command].unrecognized(extras)
    return args


def main(argv=None) -> int:
    args = parse(argv)
    prepare_environment(backend=getattr(args, "backend", None), device=getattr(args, "device", None),
                        quiet=getattr(args, "quiet", False))
    try:
        return args.func(args)
    except (CheckpointError, InputError) as err:
        # A user's input that cannot run: one line, exit 2. Anything else is a bug and keeps its traceback.
        print(f"ossbatch {args.command}: {err}", file=sys.stderr)
        return USAGE_ERROR


if __name__ == "__main__":
    sys.exit(main())
