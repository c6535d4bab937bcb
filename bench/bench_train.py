#!/usr/bin/env python3
"""The trainer's cost per step on this CPU against a bare training loop, like with like, in one
run, each number from a fresh process.

    .venv/bin/python bench/bench_train.py [--out docs/bench_train.json]

Like with like: every loop trains the same model behind the same in-graph preprocessing
(`models.with_preprocessing`) on uint8 batches, in-memory or from uint8 records through
`chexnet_hvd.data.train_dataset`, with Adam under Horovod, 1 rank.

- small CNN, 64 px, batch 16 (about 10 ms a step here: the scale of a GPU step, at which a
  per-step cost of the trainer shows as it would beside a GPU; --small-size). The bare loop:
  Horovod's DistributedGradientTape in a tf.function that takes its batch from a dataset
  iterator, no callbacks, no host sync per step (the shape of Horovod's synthetic benchmark).
  Then, each a piece of the trainer's cost: the bare loop with its batches through the
  trainer's per-batch maps (targets packed, feed counters); plain Keras fit on the same model,
  data and distributed optimizer; the trainer on in-memory input with its per-step pieces switched off
  (stall watch: --stall-timeout 0; stop agreement: --stop-check-steps beyond the run) and on
  one at a time; the trainer on records; the bare loop on the same records (the input
  pipeline's share of these 2 shared cores, which a GPU node's spare cores would carry); Keras
  fit and the trainer on records at --steps-per-execution 8 (Python's cost per call of Keras'
  train function spread over 8 steps). Goal: trainer on records / bare loop >= 0.95.
- DenseNet-121, 224 px, batch 16 (compute-bound): the trainer on uint8 records against the
  bare loop on in-memory uint8 batches. Goal: >= 0.98.
- XLA (--xla: auto-clustering, Horovod's allreduce left outside the compiled clusters) against
  no XLA, trainer on in-memory input: small CNN, and DenseNet-121 at 128 px.
Warm-up steps are left out of every number; configurations alternate over --repeats rounds:
images/s are each configuration's median, ratios the median of the rounds' own ratios (one
round's configurations ran minutes apart, so a slow spell of the shared machine is in both).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import machine, today

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable

# The bare loop: `python -c BARE name size batch steps warm [records]`.
BARE = r"""
import sys, time, json
import tensorflow as tf, horovod.tensorflow as hvd
hvd.init()
from chexnet_hvd import data, models, views
from chexnet_hvd.train import make_loss, pack_targets
name, (size, batch, steps, warm, feed), records = sys.argv[1], map(int, sys.argv[2:7]), sys.argv[7:]
tf.keras.utils.set_random_seed(0)
model = models.build_model(name, size)
trained = models.with_preprocessing(model, size, models.input_scaling(name))
opt = tf.keras.optimizers.Adam(1e-3)
loss_fn = make_loss()
if records:
    ds = data.train_dataset(records[0], "train", views.View(size, models.input_scaling(name)), batch)
else:
    ds = data.synthetic_dataset(size, batch, 14, uint8_size=size)
ds = ds.map(lambda x, y, m: (x, pack_targets(y, m)))
if feed:  # the trainer's per-batch counters (chexnet_hvd.monitor.Feed)
    from chexnet_hvd import monitor
    ds = monitor.Feed().counted(ds)
it = iter(ds)
@tf.function
def step(it):
    x, y = next(it)
    with tf.GradientTape() as tape:
        loss = loss_fn(y, trained(x, training=True))
    tape = hvd.DistributedGradientTape(tape)
    opt.apply_gradients(zip(tape.gradient(loss, trained.trainable_variables), trained.trainable_variables))
    return loss
for _ in range(warm):
    step(it).numpy()
t0 = time.perf_counter()
for _ in range(steps):
    loss = step(it)
loss.numpy()
print(json.dumps({"images_per_sec": steps * batch / (time.perf_counter() - t0)}))
"""

# Plain Keras fit on BARE's model, in-memory data and distributed optimizer, with no callbacks
# but a clock: Keras' own loop, without the trainer's pieces; `... feed [steps per execution]`.
FIT = r"""
import sys, time, json
import tensorflow as tf, horovod.tensorflow.keras as hvd
hvd.init()
from chexnet_hvd import data, models
from chexnet_hvd.train import make_loss, pack_targets
name, (size, batch, steps, warm) = sys.argv[1], map(int, sys.argv[2:6])  # (and feed: 0)
calls = int((sys.argv[7:] or [1])[0])
tf.keras.utils.set_random_seed(0)
trained = models.with_preprocessing(models.build_model(name, size), size, models.input_scaling(name))
trained.compile(hvd.DistributedOptimizer(tf.keras.optimizers.Adam(1e-3)), make_loss(), steps_per_execution=calls)
ds = data.synthetic_dataset(size, batch, 14, uint8_size=size).map(lambda x, y, m: (x, pack_targets(y, m)))
class Clock(tf.keras.callbacks.Callback):
    _supports_tf_logs = True
    first = None  # the step the clock starts at: the first call's start at or past warm
    def on_train_batch_begin(self, b, logs=None):
        if self.first is None and b >= warm:
            self.first, self.t0 = b, time.perf_counter()
clock = Clock()
history = trained.fit(ds, steps_per_epoch=steps + warm, epochs=1, callbacks=[clock], verbose=0)
timed = steps + warm - clock.first
print(json.dumps({"images_per_sec": timed * batch / (time.perf_counter() - clock.t0)}))
"""


def trainer(records: Path, run_dir: Path, model: str, size: int, batch: int, steps: int, warm: int,
            **options) -> float:
    """The trainer's own img/s (its run log, warm-up steps left out) for one epoch."""
    from chexnet_hvd import config
    from chexnet_hvd.runlog import read_runlog

    cfg = config.TrainConfig(data=str(records), run_dir=str(run_dir), model=model, image_size=size,
                             batch_size=batch, epochs=1, steps_per_epoch=steps + warm,
                             timing_warmup_steps=warm, verbose=0, val_batch_size=64, **options)
    subprocess.run(config.command(cfg), cwd=ROOT, check=True)
    return [r for r in read_runlog(run_dir) if r["event"] == "epoch"][-1]["images_per_sec"]


def loop(script: str, model: str, size: int, batch: int, steps: int, warm: int, *extra,
         feed: bool = False) -> float:
    """img/s of the bare loop (or plain Keras fit) in a fresh process; `feed`: its batches through
    the trainer's feed counters; `extra`: the bare loop's records, Keras fit's steps per call."""
    args = [model, size, batch, steps, warm, int(feed), *extra]
    out = subprocess.run([PY, "-c", script, *map(str, args)], cwd=ROOT, check=True, capture_output=True,
                         text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["images_per_sec"]


def records(tmp: Path, name: str, images: int, size: int) -> Path:
    """Synthetic images as uint8 records at `size` px (the model's input size)."""
    subprocess.run([PY, "-m", "chexnet_hvd.synthetic", "--out", str(tmp / f"{name}_raw"), "--images",
                    str(images), "--size", str(size)], check=True, cwd=ROOT, capture_output=True)
    subprocess.run([PY, "-m", "chexnet_hvd.records", "--csv", str(tmp / f"{name}_raw/Data_Entry_2017.csv"),
                    "--images", str(tmp / f"{name}_raw/images"), "--out", str(tmp / name), "--fractions",
                    "0.95", "0.02", "0.03", "--no-progress", "--image-size", str(size), "--encoding", "uint8"],
                   check=True, cwd=ROOT)
    return tmp / name


def cpu_has_bf16() -> bool:
    """AVX512-BF16 or AMX: bf16 arithmetic in hardware."""
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    return "avx512_bf16" in flags or "amx_bf16" in flags


QUIET = {"stall_timeout": 0.0, "stop_check_steps": 10**9}  # the trainer's per-step pieces off
CALLS = 8  # --steps-per-execution of the configurations that measure it


def small_configs(rec: Path, tmp: Path, size: int, batch: int, steps: int, warm: int) -> dict:
    """name -> a function measuring img/s of one small-CNN configuration."""
    def run(name, **options):
        return lambda: trainer(rec, tmp / f"{name}-{time.monotonic_ns()}", "small_cnn", size, batch, steps, warm,
                               **options)

    return {
        "bare_loop": lambda: loop(BARE, "small_cnn", size, batch, steps, warm),
        "bare_loop_feed": lambda: loop(BARE, "small_cnn", size, batch, steps, warm, feed=True),
        "bare_loop_records": lambda: loop(BARE, "small_cnn", size, batch, steps, warm, rec),
        "keras_fit": lambda: loop(FIT, "small_cnn", size, batch, steps, warm),
        "keras_fit_calls": lambda: loop(FIT, "small_cnn", size, batch, steps, warm, CALLS),
        "trainer_synthetic_quiet": run("q", synthetic_input=True, **QUIET),
        "trainer_synthetic_stall_watch": run("w", synthetic_input=True, stop_check_steps=10**9),
        "trainer_synthetic_stop_agreement": run("a", synthetic_input=True, stall_timeout=0.0),
        "trainer_synthetic": run("s", synthetic_input=True),
        "trainer_records": run("r"),
        "trainer_records_quiet": run("rq", **QUIET),
        "trainer_records_calls": run("rc", steps_per_execution=CALLS),
    }


# The small CNN's ratios (name: numerator, denominator): the goal's, and the gap's pieces.
RATIOS = {
    "records_over_bare": ("trainer_records", "bare_loop"),
    "synthetic_over_bare": ("trainer_synthetic", "bare_loop"),
    "fit_over_bare": ("keras_fit", "bare_loop"),
    "fit_calls_over_bare": ("keras_fit_calls", "bare_loop"),
    "records_calls_over_bare": ("trainer_records_calls", "bare_loop"),
    "feed_over_bare": ("bare_loop_feed", "bare_loop"),
    "quiet_over_fit": ("trainer_synthetic_quiet", "keras_fit"),
    "stall_watch_over_quiet": ("trainer_synthetic_stall_watch", "trainer_synthetic_quiet"),
    "stop_agreement_over_quiet": ("trainer_synthetic_stop_agreement", "trainer_synthetic_quiet"),
    "records_over_synthetic": ("trainer_records", "trainer_synthetic"),
    "bare_records_over_bare": ("bare_loop_records", "bare_loop"),
    "records_over_bare_records": ("trainer_records", "bare_loop_records"),
}


def summary(runs: dict) -> dict:
    """Each configuration's median images/s and each ratio's median over the rounds."""
    return {name: statistics.median(v) for name, v in runs.items()} | {
        name: statistics.median(a / b for a, b in zip(runs[num], runs[den], strict=True))
        for name, (num, den) in RATIOS.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=20, help="timed DenseNet-121 steps per measurement")
    ap.add_argument("--small-steps", type=int, default=600, help="timed small-CNN steps")
    ap.add_argument("--small-size", type=int, default=64,
                    help="small-CNN input side: 64 px steps take about 10 ms here, a GPU step's scale")
    ap.add_argument("--warmup", type=int, default=2, help="steps left out (small CNN: 25x)")
    ap.add_argument("--repeats", type=int, default=5, help="rounds of the small-CNN configurations")
    ap.add_argument("--dense-repeats", type=int, default=3, help="rounds of DenseNet-121's trainer and bare loop")
    only = ap.add_mutually_exclusive_group()
    only.add_argument("--small-only", action="store_true",
                      help="the small CNN only (with its own date), beside the DenseNet-121 figures already in --out")
    only.add_argument("--dense-only", action="store_true",
                      help="DenseNet-121 only, beside the small-CNN figures already in --out")
    ap.add_argument("--out", default=str(ROOT / "docs" / "bench_train.json"))
    args = ap.parse_args()
    size, batch, s, w = args.small_size, 16, args.small_steps, args.warmup * 25
    d, dw = args.steps, args.warmup
    result = {"machine": machine(), "date": today(),
              "model": "densenet121", "image_size": 224, "batch": 16, "steps": d, "repeats": args.dense_repeats,
              "small": {"model": "small_cnn", "image_size": size, "batch": batch, "steps": s,
                        "repeats": args.repeats, "machine": machine(), "date": today()}}
    kept = json.loads(Path(args.out).read_text()) if args.small_only or args.dense_only else {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.dense_only:
            result["small"] = kept["small"]
        else:
            small = records(tmp, "small", int((s + w) * batch * 1.2), size)
            configs = small_configs(small, tmp, size, batch, s, w)
            runs = {name: [] for name in configs}
            for _ in range(args.repeats):
                for name, measure in configs.items():
                    runs[name].append(measure())
            r = result["small"]
            r |= summary(runs)
            r["runs"] = runs
            r["step_ms_bare"] = 1000 * batch / r["bare_loop"]
            r["trainer_xla"] = trainer(small, tmp / "s_xla", "small_cnn", size, batch, s, w, synthetic_input=True,
                                       xla=True)
            r["xla_over_no_xla"] = r["trainer_xla"] / r["trainer_synthetic"]
        if args.small_only:
            result = kept | {"small": r}
        else:
            dense = records(tmp, "dense", (d + dw) * 16 * 2, 224)
            # in rounds, alternating, as the small CNN's: one pair of 10-step runs differed by
            # more than the goal's margin from the next
            runs = {"trainer_fp32": [], "bare_loop_fp32": []}
            for i in range(args.dense_repeats):
                runs["trainer_fp32"].append(trainer(dense, tmp / f"fp32-{i}", "densenet121", 224, 16, d, dw))
                runs["bare_loop_fp32"].append(loop(BARE, "densenet121", 224, 16, d, dw))
            ratios = [a / b for a, b in zip(runs["trainer_fp32"], runs["bare_loop_fp32"], strict=True)]
            result |= {name: statistics.median(v) for name, v in runs.items()}
            result |= {"dense_runs": runs, "trainer_over_bare": statistics.median(ratios),
                       "trainer_over_bare_range": [min(ratios), max(ratios)]}
            # bf16 without bf16 instructions is emulated (over 4x slower than fp32 on an AMD
            # EPYC without AVX-512): measured only where the CPU has them
            result["cpu_bf16"] = cpu_has_bf16()
            if result["cpu_bf16"]:
                result["trainer_mixed_bfloat16"] = trainer(dense, tmp / "bf16", "densenet121", 224, 16, d, dw,
                                                           precision="mixed_bfloat16")
                result["bf16_over_fp32"] = result["trainer_mixed_bfloat16"] / result["trainer_fp32"]
            result["trainer_128_no_xla"] = trainer(dense, tmp / "d128", "densenet121", 128, 16, d, dw,
                                                   synthetic_input=True)
            result["trainer_128_xla"] = trainer(dense, tmp / "d128x", "densenet121", 128, 16, d, dw,
                                                synthetic_input=True, xla=True)
            result["xla_over_no_xla_128"] = result["trainer_128_xla"] / result["trainer_128_no_xla"]
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
