"""One rank of the last-barrier test (tests/test_resume_preemption.py runs it on 2 ranks of each
engine: `barrier_worker.py ENGINE RUN`, RUN completed or preempted).

Rank 1 leaves once both ranks are up (as a rank that the tf engine's ring let through its part of
the last barrier first does); rank 0 then ends a RUN run with the trainer's own ending
(`train.end_completed` or `train.end_preempted`, with a checkpoint writer that writes nothing),
its peer gone.
"""

import sys
import time

from chexnet_hvd import checkpoints, cli, distributed, train


def main(engine_name: str, run: str) -> int:
    engine, _ = distributed.start(engine_name, threads=1, stall_timeout=0)  # no watch: TF's own heartbeat timeout (10 s) tells rank 0
    engine.barrier()  # Horovod/TF: both ranks up
    if engine.rank == 1:
        return 0
    time.sleep(3)  # rank 1 gone
    if run == "completed":
        return train.end_completed(engine)
    state = checkpoints.RunState(plateau={}, epoch=1, step=7)
    return train.end_preempted(engine, state, lambda name, epoch: None, None)


if __name__ == "__main__":
    cli.run(lambda: main(*sys.argv[1:]), leave=(cli.EXIT_PREEMPTED,))
