#!/usr/bin/env python3
"""The optimizer's update alone, for bench/bench_comm.py: seconds of one Adam step (the trainer's
default optimizer) over the trainable weights of a model at 32 px, on one thread, given
gradients already computed; one JSON line {"model", "seconds" (median of 5 windows)}. The
trainer's compute probe leaves the update out (it would change the weights), while a measured
single-GPU step time, which the projection starts from, includes it.

    python bench/update_worker.py --model densenet121
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import tensorflow as tf  # noqa: E402

from chexnet_hvd import models  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="densenet121", choices=["densenet121", "resnet50", "small_cnn"])
    ap.add_argument("--steps", type=int, default=5, help="updates per timed window")
    args = ap.parse_args()
    tf.config.threading.set_intra_op_parallelism_threads(1)  # as the benchmark's ranks (--threads 1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    weights = models.build_model(args.model, 32, 14, None).trainable_variables
    grads = [tf.random.normal(w.shape) * 1e-3 for w in weights]
    optimizer = tf.keras.optimizers.Adam(1e-3)

    @tf.function
    def update():
        optimizer.apply_gradients(zip(grads, weights, strict=True))

    update()  # traced, slots made
    windows = []
    for _ in range(5):
        began = time.perf_counter()
        for _ in range(args.steps):
            update()
        float(weights[0][(0,) * len(weights[0].shape)])  # wait for it
        windows.append((time.perf_counter() - began) / args.steps)
    print(json.dumps({"model": args.model, "seconds": statistics.median(windows)}))


if __name__ == "__main__":
    main()
