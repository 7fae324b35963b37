"""`ossbatch` with a memory report: runs the command line's own `main` in this process, samples this
process's anonymous and file-backed memory while it runs, and writes the engine's breakdown
(`Transformer.memory_report()`) with the peaks to REPORT.json, and ``host_budget``: how the last shard
spent its --memory-budget (engine.memory_plan.HostBudget; the default budget when none was given).

    python benchmarks/cli_memory.py REPORT.json run --model M --input I --output O ...

Used by run_all.py's 20b row and by tests/test_memory_budget.py.
"""

import dataclasses
import gc
import json
import sys
import threading
import time
from pathlib import Path


def record_host_budgets() -> list:
    """Every HostBudget the run's shards fit their expert cache to, in order: pipeline.infer's
    ``fit_expert_cache`` is wrapped for this process. (The plan's other copy, the ShardInferencer's
    ``host_budget``, is garbage once the flow returns: gc finds it only until the collector next
    runs, which is left to chance; the 20b run outside a cgroup reported no budget, read as 0.00 GiB.)"""
    import ossbatch.pipeline.infer as infer

    plans = []
    fit = infer.fit_expert_cache

    def fit_and_record(*args, **kwargs):
        plans.append(fit(*args, **kwargs))
        return plans[-1]

    infer.fit_expert_cache = fit_and_record
    return plans


def main(argv: list[str]) -> int:
    report_path, args = Path(argv[0]), argv[1:]
    from ossbatch.engine.host_memory import process_memory

    peak = {"anonymous": 0, "file": 0, "rss": 0}
    done = threading.Event()

    def sample():
        while not done.is_set():
            now = process_memory()
            for key in peak:
                peak[key] = max(peak[key], now[key])
            time.sleep(0.01)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    from ossbatch.flows.cli import main as cli

    plans = record_host_budgets()
    started = time.perf_counter()
    rc = cli(args)
    seconds = time.perf_counter() - started
    done.set()
    sampler.join()

    from ossbatch.engine.model import Transformer

    models = [o for o in gc.get_objects() if isinstance(o, Transformer)]  # kept alive by pipeline.infer.load_engine's cache
    report = models[0].memory_report() if models else {}
    budget = next((plan for plan in reversed(plans) if plan is not None), None)  # None: no expert cache, or no rows ran
    report |= {"peak_anonymous": peak["anonymous"], "peak_file": peak["file"], "peak_rss_sampled": peak["rss"],
               "peak_rss": process_memory()["peak_rss"], "seconds": seconds, "rc": rc,
               "host_budget": dataclasses.asdict(budget) if budget else None}
    report_path.write_text(json.dumps(report, indent=2))
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
