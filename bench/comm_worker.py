#!/usr/bin/env python3
"""One rank of bench/bench_comm.py: times allreduces of float32 buffers of the given sizes
through the suite's engine seam (chexnet_hvd.distributed.start) and prints, from rank 0, one
JSON line per size: {"bytes", "seconds" (median), "all" (every repeat), "cores_busy" (the CPU
time every rank spent in the timed allreduces over their wall time times this machine's cores,
meaningful where every rank runs on this one machine, as on the rehearsal: near 1, its shared
CPU rather than its links paced them)}.

    srun --mpi=pmix -N4 --ntasks-per-node=1 python bench/comm_worker.py --engine horovod
    srun --mpi=none -N2 --ntasks-per-node=1 python bench/comm_worker.py --engine tf
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from chexnet_hvd import distributed  # noqa: E402


def allreduce_fn(engine):
    """buffer -> its sum over the ranks, forced to completion, by the engine's own collective."""

    if engine.name == "horovod":
        import horovod.tensorflow as hvd

        return lambda x, name: hvd.allreduce(x, op=hvd.Sum, name=name).numpy()  # Horovod: allreduce
    return lambda x, name: engine.sum(x)  # the tf engine: a ring all-reduce over the workers


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--engine", default="horovod", choices=sorted(distributed.ENGINES))
    ap.add_argument("--sizes", default="1e3,1.6e4,2.56e5,1e6,4e6,1.6e7,2.8e7", help="bytes, comma-separated")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    # a watched job's timeouts (the trainer's default --stall-timeout): at TF's 10 s heartbeat a
    # worker slowed by a shaped link or a loaded node ends the measurement
    engine, _ = distributed.start(args.engine, threads=1, stall_timeout=600)
    import numpy as np
    import tensorflow as tf

    reduce = allreduce_fn(engine)
    sizes = [int(float(s)) for s in args.sizes.split(",")]
    for size in sizes:
        # tf engine: numpy in (its sum takes arrays); Horovod: a tensor
        x = np.ones(size // 4, np.float32) if engine.name == "tf" else tf.ones(size // 4, tf.float32)
        reduce(x, f"warm{size}")
        times, cpu = [], 0.0
        for i in range(args.repeats):
            reduce(np.ones(1, np.float32) if engine.name == "tf" else tf.ones(1), f"sync{size}_{i}")  # line up
            start, start_cpu = time.perf_counter(), time.process_time()
            reduce(x, f"t{size}_{i}")
            times.append(time.perf_counter() - start)
            cpu += time.process_time() - start_cpu
        busy = sum(engine.allgather_object(cpu)) / (sum(times) * os.cpu_count())
        if engine.rank == 0:
            print(json.dumps({"bytes": size, "ranks": engine.size, "seconds": statistics.median(times),
                              "all": [round(t, 6) for t in times], "cores_busy": round(busy, 3)}), flush=True)


if __name__ == "__main__":
    main()
