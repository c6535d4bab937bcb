#!/usr/bin/env python3
"""The trainer's cost per step on this CPU, in one run, each number from a fresh process:

    .venv/bin/python bench/bench_train.py [--out docs/bench_train.json]

- small CNN, 32 px, batch 64 (~10 ms a step here, the scale of a GPU step): the trainer on
  in-memory synthetic input and on uint8 records, against a bare Horovod loop on the same model
  (the shape of Horovod's tensorflow2_synthetic_benchmark.py: DistributedGradientTape in a
  tf.function, in-memory data). Goals: >= 0.95 and >= 0.90. Plain Keras fit on the same data
  and optimizer, with no callbacks, splits the gap into Keras' share and the trainer's.
- DenseNet-121, 224 px, batch 16 (compute-bound): the trainer on PNG records in fp32 (and in
  mixed_bfloat16 where the CPU has bf16 instructions) against the bare loop. Goal: >= 0.97.
- XLA (--xla: auto-clustering, Horovod's allreduce left outside the compiled clusters) against
  no XLA, on the small CNN and on DenseNet-121 at 128 px, trainer on synthetic input.
Warm-up steps are left out of every number.
"""

from __future__ import annotations

import argparse
import json
import os
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
from chexnet_hvd.train import make_loss, pack_targets
name, size, batch, steps, warm = sys.argv[1], *map(int, sys.argv[2:6])
tf.keras.utils.set_random_seed(0)
model = models.build_model(name, size)
opt = tf.keras.optimizers.Adam(1e-3)
loss_fn = make_loss()
x = tf.random.uniform((batch, size, size, 3))
y = pack_targets(tf.cast(tf.random.uniform((batch, 14)) < 0.1, tf.float32), tf.ones((batch, 14)))
@tf.function
def step():
    with tf.GradientTape() as tape:
        loss = loss_fn(y, model(x, training=True))
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

# Plain Keras fit on the same model, data and distributed optimizer as BARE, with no callbacks
# but a clock: separates the Keras fit loop's cost per step from the trainer's own.
FIT = r"""
import sys, time, json
import tensorflow as tf, horovod.tensorflow.keras as hvd
hvd.init()
from chexnet_hvd import models
from chexnet_hvd.train import make_loss, pack_targets
name, size, batch, steps, warm = sys.argv[1], *map(int, sys.argv[2:6])
tf.keras.utils.set_random_seed(0)
model = models.build_model(name, size)
model.compile(hvd.DistributedOptimizer(tf.keras.optimizers.Adam(1e-3)), make_loss())
x = tf.random.uniform((batch, size, size, 3))
y = pack_targets(tf.cast(tf.random.uniform((batch, 14)) < 0.1, tf.float32), tf.ones((batch, 14)))
class Clock(tf.keras.callbacks.Callback):
    def on_train_batch_begin(self, b, logs=None):
        if b == warm:
            self.t0 = time.perf_counter()
    def on_train_end(self, logs=None):
        self.seconds = time.perf_counter() - self.t0
clock = Clock()
model.fit(tf.data.Dataset.from_tensors((x, y)).repeat(), steps_per_epoch=steps + warm, epochs=1,
          callbacks=[clock], verbose=0)
print(json.dumps({"images_per_sec": steps * batch / clock.seconds}))
"""


def trainer(records: Path, run_dir: Path, model: str, size: int, batch: int, steps: int, warm: int,
            **options) -> float:
    from chexnet_hvd import config
    from chexnet_hvd.runlog import read_runlog

    cfg = config.TrainConfig(data=str(records), run_dir=str(run_dir), model=model, image_size=size,
                             batch_size=batch, epochs=1, steps_per_epoch=steps + warm,
                             timing_warmup_steps=warm, verbose=0, val_batch_size=16, **options)
    subprocess.run(config.command(cfg), cwd=ROOT, check=True)

    return [r for r in read_runlog(run_dir) if r["event"] == "epoch"][-1]["images_per_sec"]


def bare(model: str, size: int, batch: int, steps: int, warm: int, script: str = BARE) -> float:
    out = subprocess.run([PY, "-c", script, model, str(size), str(batch), str(steps), str(warm)], cwd=ROOT,
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["images_per_sec"]


def records(tmp: Path, name: str, images: int, size: int, *flags: str) -> Path:
    subprocess.run([PY, "-m", "chexnet_hvd.synthetic", "--out", str(tmp / f"{name}_raw"), "--images",
                    str(images), "--size", str(size)], check=True, cwd=ROOT, capture_output=True)
    subprocess.run([PY, "-m", "chexnet_hvd.records", "--csv", str(tmp / f"{name}_raw/Data_Entry_2017.csv"),
                    "--images", str(tmp / f"{name}_raw/images"), "--out", str(tmp / name), "--fractions",
                    "0.95", "0.02", "0.03", "--no-progress", *flags], check=True, cwd=ROOT)
    return tmp / name


def cpu_has_bf16() -> bool:
    """AVX512-BF16 or AMX: bf16 arithmetic in hardware."""
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    return "avx512_bf16" in flags or "amx_bf16" in flags


def cpu_model() -> str:
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    return next((line.split(":", 1)[1].strip() for line in info.splitlines()
                 if line.startswith("model name")), "unknown CPU")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20, help="timed DenseNet-121 steps per measurement")
    ap.add_argument("--small-steps", type=int, default=200, help="timed small-CNN steps")
    ap.add_argument("--warmup", type=int, default=3, help="steps left out (small CNN: 10x)")
    ap.add_argument("--out", default=str(ROOT / "docs" / "bench_train.json"))
    args = ap.parse_args()
    s, w = args.small_steps, args.warmup * 10
    d, dw = args.steps, args.warmup
    result = {"machine": f"{os.cpu_count()} cores, {cpu_model()}", "date": time.strftime("%Y-%m-%d"),
              "model": "densenet121", "image_size": 224, "batch": 16, "steps": d,
              "small": {"model": "small_cnn", "image_size": 32, "batch": 64, "steps": s}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        small = records(tmp, "small", int((s + w) * 64 * 1.1), 32, "--image-size", "32",
                        "--encoding", "uint8")
        dense = records(tmp, "dense", (d + dw) * 16 * 2, 224)
        r = result["small"]
        r["trainer_synthetic"] = trainer(small, tmp / "s_syn", "small_cnn", 32, 64, s, w, synthetic_input=True)
        r["trainer_records"] = trainer(small, tmp / "s_rec", "small_cnn", 32, 64, s, w)
        r["bare_loop"] = bare("small_cnn", 32, 64, s, w)
        r["keras_fit"] = bare("small_cnn", 32, 64, s, w, FIT)
        r["trainer_xla"] = trainer(small, tmp / "s_xla", "small_cnn", 32, 64, s, w, synthetic_input=True, xla=True)
        r["synthetic_over_bare"] = r["trainer_synthetic"] / r["bare_loop"]
        r["records_over_bare"] = r["trainer_records"] / r["bare_loop"]
        # the gap, split: Keras' fit loop against the bare loop, the trainer against Keras' fit
        r["fit_over_bare"] = r["keras_fit"] / r["bare_loop"]
        r["synthetic_over_fit"] = r["trainer_synthetic"] / r["keras_fit"]
        r["xla_over_no_xla"] = r["trainer_xla"] / r["trainer_synthetic"]
        # bf16 without bf16 instructions is emulated (over 4x slower than fp32 on an AMD
        # EPYC without AVX-512): measured only where the CPU has them
        result["cpu_bf16"] = cpu_has_bf16()
        for precision in ("fp32", "mixed_bfloat16")[:2 if result["cpu_bf16"] else 1]:
            result[f"trainer_{precision}"] = trainer(dense, tmp / precision, "densenet121", 224, 16, d, dw,
                                                     precision=precision)
        result["bare_loop_fp32"] = bare("densenet121", 224, 16, d, dw)
        result["trainer_128_no_xla"] = trainer(dense, tmp / "d128", "densenet121", 128, 16, d, dw,
                                               synthetic_input=True)
        result["trainer_128_xla"] = trainer(dense, tmp / "d128x", "densenet121", 128, 16, d, dw,
                                            synthetic_input=True, xla=True)
    if result["cpu_bf16"]:
        result["bf16_over_fp32"] = result["trainer_mixed_bfloat16"] / result["trainer_fp32"]
    result["trainer_over_bare"] = result["trainer_fp32"] / result["bare_loop_fp32"]
    result["xla_over_no_xla_128"] = result["trainer_128_xla"] / result["trainer_128_no_xla"]
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
