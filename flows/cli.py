"""`ossbatch`: the command line.

    ossbatch make-tiny-model DIR [--preset gpt-oss-20b | shape flags]
    ossbatch run --model DIR --input PATH... --output PATH [sampling, batching, storage flags]
    ossbatch label --labels A B C ... [--gold-column COL]   (same job flags as run)
    ossbatch synth --n 4 [--dedupe]                         (same job flags as run)
    ossbatch eval --gold-column answer [--grading choice|exact] [--price-per-million-tokens IN OUT]
    ossbatch serve | deploy [--prefect-file prefect.yaml]   (the nightly deployments)
    ossbatch plan --model DIR --gpu-memory 80GiB --max-context N [--shared-prefix-tokens N]
    ossbatch inspect OUTPUT
"""

import argparse
import json
import sys
import typing
from pathlib import Path

from ossbatch.engine.config import CheckpointError
from ossbatch.flows.environment import prepare_environment
from ossbatch.pipeline.config import EngineOptions, Job, JobOptions, PipelineOptions, RunnerOptions, SamplingOptions
from ossbatch.pipeline.storage import LOCAL, InputError, Storage


def _storage_flag(text: str) -> Storage:
    try:
        return Storage.from_flag(text)
    except InputError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _positive_int(flag: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} must be an integer, got {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"{flag} must be positive, got {value}")
        return value

    return parse


def _read_json_file(flag: str, path: str):
    try:
        return json.loads(Path(path).read_text())
    except OSError as err:
        raise SystemExit(f"ossbatch: {flag} {path}: {err.strerror}") from None
    except json.JSONDecodeError as err:
        raise SystemExit(f"ossbatch: {flag} {path} is not valid JSON: {err}") from None


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


def cmd_run(args) -> int:
    job = Job(model=args.model, inputs=args.input, output=args.output, options=_job_options(args))
    if args.orchestrator == "prefect":
        from ossbatch.engine.config import read_config
        from ossbatch.flows.batch import batch_inference

        read_config(job.model)  # a bad model is refused before Prefect starts its server

        batch_inference(job, quiet=args.quiet)
    else:
        if job.options.runner != "local":
            raise InputError("--runner ray needs --orchestrator prefect (shards are Prefect tasks)")
        from ossbatch.flows.progress import Progress
        from ossbatch.pipeline.driver import job_spec, run_job
        from ossbatch.pipeline.infer import ShardInferencer

        progress: list[Progress] = []

        def report(event: dict) -> None:
            if event["event"] == "planned":
                progress.append(Progress(event["rows"], event["shards"], event["pending"], quiet=args.quiet))
            else:
                progress[0].committed(event["marker"])

        # The model loads on the first pending shard, not for a job that is already complete.
        manifest = run_job(job_spec(job), ShardInferencer(job), report)
        progress[0].close(manifest)
    if not args.quiet:
        from ossbatch.pipeline.inspect import format_manifest

        print(format_manifest(args.output, job.storage))
    return 0


def cmd_label(args) -> int:
    from ossbatch.flows.nightly import label_job

    labels = args.labels if args.labels else _read_json_file("--labels-file", args.labels_file)
    summary = label_job(args.model, args.input, args.output, labels, gold_column=args.gold_column,
                        label_field=args.label_field, name=args.name, options=_job_options(args), quiet=args.quiet)
    if not args.quiet:
        print(f"{summary['labeled']} of {summary['rows']} rows labeled -> {summary['labels']}")
        if summary["confusion"]:
            print(f"confusion table -> {summary['confusion']}")
        print(summary["table"])
    return 0


def cmd_synth(args) -> int:
    from ossbatch.flows.nightly import synth_job

    schema = _read_json_file("--schema", args.schema) if args.schema else None
    summary = synth_job(args.model, args.input, args.output, n=args.n, dedupe=args.dedupe, answer_schema=schema,
                        options=_job_options(args), quiet=args.quiet)
    if not args.quiet:
        dropped = f", {summary['duplicates']} duplicate answers dropped" if args.dedupe else ""
        print(f"{summary['rows']} rows x {args.n} samples: {summary['kept']} kept{dropped} -> {summary['samples']}")
    return 0


def cmd_eval(args) -> int:
    from ossbatch.flows.nightly import eval_job

    schema = _read_json_file("--schema", args.schema) if args.schema else None
    summary = eval_job(
        args.model, args.input, args.output, gold_column=args.gold_column, grading_rule=args.grading,
        answer_field=args.answer_field, choices=args.choices, category_column=args.category_column or None,
        name=args.name, history=args.history, answer_schema=schema,
        price_per_million_tokens=tuple(args.price_per_million_tokens), options=_job_options(args), quiet=args.quiet,
    )
    if not args.quiet:
        print(summary["report"])
        print(f"\ngraded rows -> {summary['graded']}\nsummary -> {summary['summary']}")
    return 0


def cmd_serve(args) -> int:
    from ossbatch.flows.schedules import default_prefect_file, serve

    return serve(args.prefect_file or default_prefect_file(), args.deployment or None, limit=args.limit)


def cmd_deploy(args) -> int:
    from ossbatch.flows.schedules import default_prefect_file, deploy

    return deploy(args.prefect_file or default_prefect_file(), args.pool)


def cmd_plan(args) -> int:
    from ossbatch.engine.config import read_config
    from ossbatch.engine.memory_plan import format_plan, parse_bytes, plan_memory

    config = read_config(args.model)
    try:
        plan = plan_memory(config, parse_bytes(args.gpu_memory), args.max_context, shared_prefix_tokens=args.shared_prefix_tokens)
    except ValueError as err:
        raise SystemExit(f"ossbatch plan: {err}") from None
    print(format_plan(plan))
    return 0


def cmd_inspect(args) -> int:
    from ossbatch.pipeline.inspect import format_manifest

    print(format_manifest(args.output, args.storage, max_failures=args.failures))
    return 0


def _default(part, field: str):
    return part.model_fields[field].default


def _choices(part, field: str) -> list[str]:
    return list(typing.get_args(part.model_fields[field].annotation))


def _job_flags(p: argparse.ArgumentParser, output_help: str) -> None:
    """The flags every batch job takes (run, label, synth, eval)."""
    p.add_argument("--model", required=True, help="checkpoint directory (Hugging Face or original/ layout)")
    p.add_argument("--input", required=True, nargs="+", help="paths, URIs or globs: JSONL(.gz), Parquet, OpenAI Batch files")
    p.add_argument("--output", required=True, help=output_help)
    sampling, engine, pipeline, runner = SamplingOptions, EngineOptions, PipelineOptions, RunnerOptions
    p.add_argument("--temperature", type=float, default=_default(sampling, "temperature"))
    p.add_argument("--top-p", type=float, default=_default(sampling, "top_p"))
    p.add_argument("--seed", type=int, default=_default(sampling, "seed"))
    p.add_argument("--max-tokens", type=_positive_int("--max-tokens"), default=_default(sampling, "max_tokens"))
    p.add_argument("--max-reasoning-tokens", type=_positive_int("--max-reasoning-tokens"))
    p.add_argument("--reasoning-effort", choices=_choices(sampling, "reasoning_effort"),
                   default=_default(sampling, "reasoning_effort"))
    p.add_argument("--dtype", choices=_choices(engine, "dtype"), default=_default(engine, "dtype"))
    p.add_argument("--backend", choices=_choices(engine, "backend"), default=_default(engine, "backend"))
    p.add_argument("--device", choices=_choices(engine, "device"), default=_default(engine, "device"),
                   help="auto: the GPU for the triton backend when there is one, else the CPU")
    p.add_argument("--fp32-matmul", choices=_choices(engine, "fp32_matmul"), default=_default(engine, "fp32_matmul"),
                   help="float32 CPU matmuls: auto uses oneDNN's bf16 mode (~2.5x faster) where a start-up probe shows it "
                        "keeps float32-level error, else ieee; bf16 forces it")
    p.add_argument("--shard-rows", type=_positive_int("--shard-rows"), default=_default(pipeline, "shard_rows"))
    p.add_argument("--batch-tokens", type=_positive_int("--batch-tokens"), default=_default(pipeline, "batch_tokens"))
    p.add_argument("--max-batch-rows", type=_positive_int("--max-batch-rows"), default=_default(pipeline, "max_batch_rows"))
    p.add_argument("--no-prefix-sharing", dest="prefix_sharing", action="store_false",
                   help="prefill and store every row's whole prompt, even where rows share a prefix (for comparison)")
    p.add_argument("--storage-options", dest="storage", type=_storage_flag, default=LOCAL,
                   help="fsspec options as JSON, flat or keyed by protocol ({\"s3\": {...}}); never written to the output")
    p.add_argument("--overwrite", action="store_true", help="replace an output written by a different job")
    p.add_argument("--runner", choices=_choices(runner, "runner"), default=_default(runner, "runner"))
    p.add_argument("--ray-address", help="a Ray cluster to run on (default: start a local one)")
    p.add_argument("--ray-workers", type=_positive_int("--ray-workers"),
                   help="Ray actors, each loading the model once (default: one per GPU, else one per node)")
    p.add_argument("--quiet", action="store_true", help="print nothing but warnings and errors (for cron)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ossbatch", description="Offline batch inference for gpt-oss models.")
    sub = parser.add_subparsers(dest="command", required=True)

    tiny = sub.add_parser("make-tiny-model", help="write a random checkpoint in the released layout")
    tiny.add_argument("dir")
    tiny.add_argument("--preset", choices=["tiny", "gpt-oss-20b", "gpt-oss-120b"], default="tiny")
    for flag, name in [("--layers", "layers"), ("--experts", "experts"), ("--topk", "topk"), ("--hidden", "hidden"),
                       ("--intermediate", "intermediate"), ("--heads", "heads"), ("--kv-heads", "kv_heads"),
                       ("--head-dim", "head_dim"), ("--sliding-window", "sliding_window")]:
        tiny.add_argument(flag, dest=name, type=_positive_int(flag))
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--layout", choices=["hf", "original", "both"], default="hf")
    tiny.add_argument("--layers-per-shard", type=int, default=0, help="split into indexed safetensors shards")
    tiny.set_defaults(func=cmd_make_tiny_model)

    run = sub.add_parser("run", help="run a batch job")
    _job_flags(run, output_help="output directory (Parquet + manifest.json) or a .jsonl (Batch output)")
    run.add_argument("--schema", help="a JSON Schema file every row's final answer must follow")
    run.add_argument("--keep-token-ids", action="store_true")
    run.add_argument("--logprobs", action="store_true")
    run.add_argument("--orchestrator", choices=["prefect", "none"], default="prefect")
    run.set_defaults(func=cmd_run)

    derived = "output root: job/ holds the batch job, {what} beside it; {{date}} becomes the run's date"
    label = sub.add_parser("label", help="bulk classification: every row answers with one of --labels")
    _job_flags(label, output_help=derived.format(what="labels.parquet and confusion.parquet"))
    given = label.add_mutually_exclusive_group(required=True)
    given.add_argument("--labels", nargs="+", help="the labels (an enum JSON Schema is built from them)")
    given.add_argument("--labels-file", help="a JSON file: a list of labels, or a JSON Schema with a label property")
    label.add_argument("--label-field", default="label", help="the answer's property that holds the label")
    label.add_argument("--gold-column", help="input column with the true label: adds correct and a confusion table")
    label.add_argument("--name", help="name of the job's Prefect artifact (default: the input's file name)")
    label.set_defaults(func=cmd_label)

    synth = sub.add_parser("synth", help="synthetic data: --n samples per input row, each with its own seed")
    _job_flags(synth, output_help=derived.format(what="requests.jsonl and samples.parquet"))
    synth.add_argument("--n", type=_positive_int("--n"), default=4, help="samples per input row")
    synth.add_argument("--dedupe", action="store_true", help="keep one sample per distinct answer of a row")
    synth.add_argument("--schema", help="a JSON Schema file the samples' answers follow (structured synthetic data)")
    synth.set_defaults(func=cmd_synth)

    evaluate = sub.add_parser("eval", help="benchmark evaluation: accuracy, Wilson 95%% CI, per category, history")
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
    evaluate.add_argument("--price-per-million-tokens", nargs=2, type=float, default=[0.0, 0.0],
                          metavar=("INPUT", "OUTPUT"), help="prices per million prompt and completion tokens")
    evaluate.set_defaults(func=cmd_eval)

    serve = sub.add_parser("serve", help="run prefect.yaml's nightly deployments on their schedules, on this machine")
    serve.add_argument("--prefect-file", help="default: ./prefect.yaml, else the repository's")
    serve.add_argument("--deployment", action="append", help="serve only this deployment (repeatable)")
    serve.add_argument("--limit", type=_positive_int("--limit"), default=1, help="flow runs at once")
    serve.set_defaults(func=cmd_serve)

    deploy = sub.add_parser("deploy", help="register prefect.yaml's deployments with a work pool (prefect deploy --all)")
    deploy.add_argument("--prefect-file", help="default: ./prefect.yaml, else the repository's")
    deploy.add_argument("--pool", help="work pool for every deployment (default: each deployment's own)")
    deploy.set_defaults(func=cmd_deploy)

    plan = sub.add_parser("plan", help="memory arithmetic: weights, KV per token, largest batch")
    plan.add_argument("--model", required=True)
    plan.add_argument("--gpu-memory", default="80GiB")
    plan.add_argument("--max-context", type=_positive_int("--max-context"), default=8192)
    plan.add_argument("--shared-prefix-tokens", type=int, default=0,
                      help="prompt tokens every row shares (e.g. the system + developer message), stored once")
    plan.set_defaults(func=cmd_plan)

    inspect = sub.add_parser("inspect", help="show a job's manifest and first failing rows")
    inspect.add_argument("output")
    inspect.add_argument("--storage-options", dest="storage", type=_storage_flag, default=LOCAL)
    inspect.add_argument("--failures", type=int, default=5)
    inspect.set_defaults(func=cmd_inspect)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    prepare_environment(backend=getattr(args, "backend", None), device=getattr(args, "device", None),
                        quiet=getattr(args, "quiet", False))
    try:
        return args.func(args)
    except (CheckpointError, InputError) as err:
        # A user's input that cannot run: one line, exit 2. Anything else is a bug and keeps its traceback.
        print(f"ossbatch {args.command}: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
