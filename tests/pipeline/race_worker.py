"""`ossbatch run` in its own process for test_output_races, with a fake engine that takes a while
per shard. Usage: race_worker.py GO_FILE ARGS... (waits for GO_FILE, then runs ``ossbatch ARGS``)."""

import os
import sys
import time

from pipeline_fakes import FakeEngine

from ossbatch.flows.cli import main
from ossbatch.pipeline import infer

SHARD_SECONDS = 0.05


class SlowEngine(FakeEngine):
    def __call__(self, requests):
        time.sleep(SHARD_SECONDS)
        return super().__call__(requests)


infer.ShardInferencer = lambda job: SlowEngine()  # what `ossbatch run` looks up when it runs

if __name__ == "__main__":
    go = sys.argv[1]
    while not os.path.exists(go):  # every contender is imported and waiting: the race is the run itself
        time.sleep(0.002)
    sys.exit(main(sys.argv[2:]))
