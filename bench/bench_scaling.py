#!/usr/bin/env python3
"""Scaling on this 2-core machine, in one run: DenseNet-121 training (the real trainer) as
1 rank x 2 threads on TFRecords, the same on in-memory synthetic input, 2 ranks x 1 thread
(horovodrun --gloo), and 1 rank x 1 thread; a 2-rank allreduce of the model's gradient size;
and the two engines side by side: 1 x 2 and 2 x 1 on TFRecords under --engine tf
(MultiWorkerMirroredStrategy, chexnet_hvd.launch) beside the Horovod runs.

    .venv/bin/python bench/bench_scaling.py [--image-size 128] [--out docs/bench_scaling.json]

Writes docs/bench_scaling.json, and with tools/scaling_report.py itself docs/scaling.md,
docs/scaling.csv and docs/scaling.png from the 1x2 and 2x1 run logs of both engines. The projection check:
the 2-rank step time predicted from the 1 rank x 1 thread step time plus the measured allreduce
(chexnet_hvd.projection.project, overlap 0) against the measured 2 x 1 step time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PY = sys.executable
sys.path.insert(0, str(ROOT))

from common import machine, today  # noqa: E402

from chexnet_hvd import projection  # noqa: E402
from chexnet_hvd.runlog import read_runlog  # noqa: E402

ALLREDUCE = r"""
import json, sys, time
import numpy as np, tensorflow as tf, horovod.tensorflow as hvd
hvd.init()
tf.config.threading.set_intra_op_parallelism_threads(1)
n, repeats = int(sys.argv[1]), int(sys.argv[2])
x = tf.constant(np.ones(n, np.float32))
for _ in range(2):
    hvd.allreduce(x, name="warm").numpy()
times = []
for i in range(repeats):
    t0 = time.perf_counter()
    hvd.allreduce(x, name="bench").numpy()
    times.append(time.perf_counter() - t0)
if hvd.rank() == 0:
    print(json.dumps({"seconds": sorted(times)[len(times) // 2]}))
"""


LAUNCHERS = {"horovod": ["horovodrun", "--gloo", "-np"], "tf": [PY, "-m", "chexnet_hvd.launch", "-np"]}


def train(records: Path, run_dir: Path, ranks: int, threads: int, args, *extra: str,
          engine: str = "horovod") -> dict:
    from chexnet_hvd import config

    cfg = config.TrainConfig(data=str(records), run_dir=str(run_dir), model="densenet121",
                             image_size=args.image_size, batch_size=args.batch, epochs=args.epochs,
                             steps_per_epoch=args.steps, threads=threads, verbose=0, engine=engine)
    cmd = config.command(config.parse(config.argv_of(cfg) + list(extra)))
    if ranks > 1:
        cmd = [*LAUNCHERS[engine], str(ranks), *cmd]
    env = os.environ | {"PATH": f"{Path(PY).parent}:{os.environ['PATH']}"}
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True)
    log = read_runlog(run_dir)
    epochs = [r for r in log if r["event"] == "epoch"][1:]  # the first epoch is warm-up
    ips = statistics.median(r["images_per_sec"] for r in epochs)
    return {"images_per_sec": ips, "step_seconds": ranks * args.batch / ips,
            "trainable_params": log[0]["trainable_params"], "epochs": [r["images_per_sec"] for r in epochs]}


def allreduce(params: int, ranks: int = 2, repeats: int = 15) -> float:
    env = os.environ | {"PATH": f"{Path(PY).parent}:{os.environ['PATH']}"}
    proc = subprocess.run(["horovodrun", "--gloo", "-np", str(ranks), PY, "-c", ALLREDUCE, str(params),
                           str(repeats)], cwd=ROOT, env=env, check=True, capture_output=True, text=True)
    line = next(x for x in proc.stdout.splitlines() if '"seconds"' in x)
    return json.loads(line[line.index("{"):])["seconds"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=12, help="steps per epoch")
    ap.add_argument("--epochs", type=int, default=3, help="epochs per run (the first is left out)")
    ap.add_argument("--out", default=str(DOCS / "bench_scaling.json"))
    ap.add_argument("--docs", default=str(DOCS), help="folder for scaling.md, scaling.csv, scaling.png")
    args = ap.parse_args()
    docs = Path(args.docs)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        subprocess.run([PY, "-m", "chexnet_hvd.synthetic", "--out", str(tmp / "syn"), "--images", "900",
                        "--size", str(args.image_size), "--seed", "0"], cwd=ROOT, check=True, capture_output=True)
        records = tmp / "records"
        subprocess.run([PY, "-m", "chexnet_hvd.records", "--csv", str(tmp / "syn" / "Data_Entry_2017.csv"),
                        "--images", str(tmp / "syn" / "images"), "--out", str(records), "--shard-size", "64",
                        "--no-progress"], cwd=ROOT, check=True, capture_output=True)
        runs = {
            "1x2_records": train(records, tmp / "runs" / "np1", 1, 2, args),
            "1x2_in_memory": train(records, tmp / "mem", 1, 2, args, "--synthetic-input"),
            "2x1_records": train(records, tmp / "runs" / "np2", 2, 1, args),
            "1x1_records": train(records, tmp / "np1t1", 1, 1, args),
            "1x2_records_tf": train(records, tmp / "runs" / "tf_np1", 1, 2, args, engine="tf"),
            "2x1_records_tf": train(records, tmp / "runs" / "tf_np2", 2, 1, args, engine="tf"),
        }
        params = runs["1x2_records"]["trainable_params"]
        allreduce_s = allreduce(params)
        report = [PY, str(ROOT / "tools" / "scaling_report.py"), str(tmp / "runs"),
                  "--csv", str(docs / "scaling.csv"), "--plot", str(docs / "scaling.png")]
        table = subprocess.run(report, cwd=ROOT, check=True, capture_output=True, text=True).stdout
    (docs / "scaling.md").write_text(table)
    measured_2 = runs["2x1_records"]["step_seconds"]
    grad_bytes = 4 * params
    bandwidth = 2 * (2 - 1) / 2 * grad_bytes / allreduce_s / 1e9  # effective, latency folded in
    net = projection.Network(bandwidth_gbs=bandwidth, latency_us=0.0, overlap=0.0)
    predicted_2 = projection.project(runs["1x1_records"]["step_seconds"], grad_bytes, args.batch, [2], net)[0]
    result = {
        "machine": machine(), "date": today(),
        "model": "densenet121", "image_size": args.image_size, "batch": args.batch, "steps": args.steps,
        "epochs_timed": args.epochs - 1, "runs": runs,
        "records_over_in_memory": runs["1x2_records"]["images_per_sec"] / runs["1x2_in_memory"]["images_per_sec"],
        "two_ranks_over_two_threads": runs["2x1_records"]["images_per_sec"] / runs["1x2_records"]["images_per_sec"],
        "allreduce_seconds_2_ranks": allreduce_s, "gradient_bytes": grad_bytes,
        "effective_bandwidth_gbs": bandwidth,
        "projected_step_seconds_2x1": predicted_2["step_seconds"], "measured_step_seconds_2x1": measured_2,
        "projection_error": (predicted_2["step_seconds"] - measured_2) / measured_2,
        "tf_over_horovod_1_rank": runs["1x2_records_tf"]["images_per_sec"] / runs["1x2_records"]["images_per_sec"],
        "tf_over_horovod_2_ranks": runs["2x1_records_tf"]["images_per_sec"] / runs["2x1_records"]["images_per_sec"],
    }
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
