"""A job run in its own process by test_pipeline_kill: a fake engine that logs what it computed.

Usage: kill_worker.py INPUT OUTPUT LOG [DIE_AT], DIE_AT being "marker:N" (SIGKILL itself after
shard N's part is committed, before its marker) or "part:N" (SIGKILL itself halfway through
writing shard N's part). Without DIE_AT it runs until done, or until the test kills it.
"""

import json
import os
import signal
import sys
import time

from pipeline_fakes import FakeEngine

from ossbatch.pipeline import job, write
from ossbatch.pipeline.driver import run_job
from ossbatch.pipeline.job import JobSpec

SHARD_SECONDS = 0.03


def die():
    os.kill(os.getpid(), signal.SIGKILL)


def arm(die_at: str) -> None:
    where, shard = die_at.split(":")
    target = f"{int(shard):05d}"
    if where == "marker":
        real = job.write_json_atomic

        def write_json_atomic(fs, path, obj):
            if f"shard-{target}.json" in path:
                die()
            real(fs, path, obj)

        job.write_json_atomic = write_json_atomic
    else:
        real_parquet = write.write_parquet

        def write_parquet(table, sink):
            if table.column("id")[0].as_py() == f"r{int(shard) * 5:05d}":
                sink.write(b"PAR1" + b"\0" * 4096)
                sink.flush()
                die()
            real_parquet(table, sink)

        write.write_parquet = write_parquet


def main():
    source, output, log_path, *rest = sys.argv[1:]
    if rest:
        arm(rest[0])
    engine = FakeEngine()

    def infer_shard(requests):
        time.sleep(SHARD_SECONDS)
        results, stats = engine(requests)
        with open(log_path, "a") as log:
            log.write(json.dumps({"pid": os.getpid(), "ids": [r["id"] for r in requests]}) + "\n")
            log.flush()
            os.fsync(log.fileno())
        return results, stats

    run_job(JobSpec(inputs=source, output=output, shard_rows=5), infer_shard)


if __name__ == "__main__":
    main()
