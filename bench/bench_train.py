#!/usr/bin/env python3
"""Trainer throughput on this CPU: DenseNet-121, 224 px, batch 16, 1 rank, in one run.

    .venv/bin/python bench/bench_train.py [--steps 20] [--out docs/bench_train.json]

Measures (each in a fresh process, same machine, same run): our trainer on TFRecords in fp32 and
in mixed_bfloat16, and a bare Horovod loop on in-memory random data (the shape of Horovod's
tensorflow2_synthetic_benchmark.py: DistributedGradientTape in a tf.function). Goal: trainer
>= 0.97x the bare loop. Warm-up steps are left out of every number.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable

BARE = r"""
import sys, time, json
import tensorflow as tf, horovod.tensorflow as hvd
hvd.init()
from chexnet_hvd import models
from chexnet_hvd.train import make_loss
size, batch, steps, warm = map(int, sys.argv[1:5])
tf.keras.utils.set_random_seed(0)
model = models.build_model("densenet121", size)
opt = tf.keras.optimizers.Adam(1e-3)
loss_fn = make_loss()
x = tf.random.uniform((batch, size, size, 3))
y = tf.stack([tf.cast(tf.random.uniform((batch, 14)) < 0.1, tf.float32), tf.ones((batch, 14))], 1)
@tf.function
def step():
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(loss_fn(y, model(x, training=True)))
    tape = hvd.DistributedGradientTape(tape)
    opt.apply_gradients(zip(tape.gradient(loss, model.trainable_variables), model.trainable_variables))
    return loss
for _ in range(warm):
    step().numpy()
t0 = time.perf_counter()
for _ in range(steps):
    step().numpy()
print(json.dumps({"images_per_sec": steps * batch / (time.perf_counter() - t0)}))
"""


def trainer(records: Path, run_dir: Path, precision: str, size: int, batch: int, steps: int, warm: int) -> float:
    subprocess.run([PY, "-m", "chexnet_hvd.train", "--data", str(records), "--run-dir", str(run_dir),
                    "--model", "densenet121", "--image-size", str(size), "--batch-size", str(batch),
                    "--epochs", "1", "--steps-per-epoch", str(steps + warm), "--timing-warmup-steps",
                    str(warm), "--precision", precision, "--verbose", "0", "--val-batch-size", "16"],
                   cwd=ROOT, check=True)
    from chexnet_hvd.runlog import read_runlog

    return [r for r in read_runlog(run_dir) if r["event"] == "epoch"][-1]["images_per_sec"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20, help="timed steps per measurement")
    ap.add_argument("--warmup", type=int, default=3, help="steps left out")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--out", default=str(ROOT / "docs" / "bench_train.json"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        n = (args.steps + args.warmup) * args.batch * 2  # enough training records for one pass
        subprocess.run([PY, "-m", "chexnet_hvd.synthetic", "--out", str(tmp / "raw"), "--images", str(n),
                        "--size", str(args.size)], check=True, cwd=ROOT)
        subprocess.run([PY, "-m", "chexnet_hvd.records", "--csv", str(tmp / "raw/Data_Entry_2017.csv"),
                        "--images", str(tmp / "raw/images"), "--out", str(tmp / "rec"), "--fractions",
                        "0.9", "0.05", "0.05", "--no-progress"], check=True, cwd=ROOT)
        result = {"machine": f"{__import__('os').cpu_count()} cores", "date": time.strftime("%Y-%m-%d"),
                  "model": "densenet121", "image_size": args.size, "batch": args.batch, "steps": args.steps}
        for precision in ("fp32", "mixed_bfloat16"):
            result[f"trainer_{precision}"] = trainer(tmp / "rec", tmp / precision, precision, args.size,
                                                     args.batch, args.steps, args.warmup)
        out = subprocess.run([PY, "-c", BARE, str(args.size), str(args.batch), str(args.steps), str(args.warmup)],
                             cwd=ROOT, check=True, capture_output=True, text=True).stdout
        result["bare_loop_fp32"] = json.loads(out.strip().splitlines()[-1])["images_per_sec"]
    result["bf16_over_fp32"] = result["trainer_mixed_bfloat16"] / result["trainer_fp32"]
    result["trainer_over_bare"] = result["trainer_fp32"] / result["bare_loop_fp32"]
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
