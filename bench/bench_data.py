#!/usr/bin/env python3
"""Data-path cost on this CPU, in one run: records conversion with 1 vs 2 worker processes, and
the training input pipeline per CPU-second at 224 px, batch 16, over PNG and uint8 records
(256 px, and PNG at the model's 224 px) and a raw-PNG index, step by step, with each
encoding's bytes per image.

    .venv/bin/python bench/bench_data.py [--copies 10] [--out docs/bench_data.json]

Input: the 121 real 1024 px NIH PNGs of ../shared/data/real/images/nih, each listed --copies
times under new names (symlinks; new patient ids). Conversion resizes to 256 px offline, as for
224-px training. Each conversion is timed end to end at two sizes (all rows and a third of them),
so that the steady-state rate, (n_all - n_third) / (t_all - t_third), leaves out the fixed start
cost (Python, pandas and TensorFlow imports, about 2-3 s per process) that a 112,120-image run
hardly notices.

Input pipelines: each measurement is a fresh process running only the pipeline on one thread
(tf.data's private pool and TF's op pools of size 1), timed in process CPU time
(time.process_time: every thread of the process) after warm-up batches, so the figure is images
per CPU-second whatever else runs on the machine; wall-clock images/s on 2 threads too. The
project pipeline is `chexnet_hvd.data.train_dataset`: fixed-size records leave it as uint8
batches (the float work, resize to 224, scale, 3 channels, ImageNet mean/std, runs in the
model's graph, on the GPU when there is one), and it is measured without and with --crop, and
with --shuffle-buffer 256 beside the default 2048 (the shuffle buffer's working set). The
steps are measured cumulatively, each a pipeline built from the same functions of
chexnet_hvd.data, one step longer than the one before: read (interleave of the shards) ->
shuffle buffer -> zip with the random draws -> batch + parse (tf.io.parse_example) ->
decode -> crop + flip; a step's cost is the difference of CPU time per image. Two more rows for
comparison: the same steps plus the float work on the CPU (what a CPU-only run pays in the
model's graph), and the per-record path (parse, decode and flip one record at a time, then the
float work), which images of source sizes still take and all PNG records took before. PNG
records stored at the model's 224 px (`--image-size 224`: no resize left, fewer pixels to
inflate) get the project pipeline and its parse and decode steps.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
from common import machine, today

ROOT = Path(__file__).resolve().parents[1]
REAL = ROOT.parent / "shared" / "data" / "real"
PY = sys.executable
STEPS = ["read", "shuffle", "draws", "parse", "decode", "augment"]  # cumulative, in order
AT_MODEL_SIZE = ["parse", "decode", "pipeline"]  # PNG records stored at the model's 224 px
EXTRA = ["cpu_float", "per_record_cpu_float", "per_record_uint8", "pipeline", "pipeline_crop", "pipeline_shuffle256"]

PIPELINE = r"""
import json, sys, time
import tensorflow as tf
data_dir, variant, budget, warm, threads = sys.argv[1], sys.argv[2], float(sys.argv[3]), *map(int, sys.argv[4:6])
tf.config.threading.set_intra_op_parallelism_threads(threads)
tf.config.threading.set_inter_op_parallelism_threads(threads)
from chexnet_hvd import data, sharding, views
S, B, steps = 224, 16, ["read", "shuffle", "draws", "parse", "decode", "augment"]

def upto(last, per_record=False, cpu_float=False):
    # rank 0's first epoch, repeated, through the steps up to `last` (data.train_dataset's order)
    source = data.Source(data_dir, "train")
    (_, layout), = sharding.epoch_layouts(source.counts, [(0, 1, B)], 0, range(1))
    seed, n = tf.constant(7, tf.int64), steps.index(last)
    ds = source.read(data.as_tensor(layout.ranks[0])).repeat()
    if n >= 1:
        ds = data.shuffled(ds, 2048, seed)
    if n >= 2:
        ds = tf.data.Dataset.zip((ds, data.draws(seed)))
    if per_record:  # one record at a time, as images of source sizes are
        def one(item, draw):  # noqa: E306
            image = source.example(item)["image"]
            image = tf.where(draw[0] < 0.5, tf.reverse(image, [1]), image)
            return views.preprocess(image, S) if cpu_float else image
        ds = ds.map(one, num_parallel_calls=data.AUTOTUNE)
    ds = ds.batch(B, drop_remainder=True)  # also before parsing: Python iterates per batch
    def batch(serialized, draw):
        example = data.records.parse_batch(serialized, source.num_classes, source.encoding)
        if n < 4:
            return example["label"]
        image = data.decode_batch(example, source.encoding, source.stored_size)
        if n >= 5:
            image = data.augment_batch(image, draw, source.stored_size, True, False)
        return views.preprocess(image, S) if cpu_float else image
    if n >= 3 and not per_record:
        ds = ds.map(batch, num_parallel_calls=data.AUTOTUNE)
    return data.sized(ds.prefetch(data.AUTOTUNE), threads)

if variant in steps:
    ds = upto(variant)
elif variant == "cpu_float":
    ds = upto("augment", cpu_float=True)
elif variant.startswith("per_record"):
    ds = upto("draws", per_record=True, cpu_float=variant.endswith("cpu_float"))
else:  # the project pipeline itself
    view = views.View(S, crop=variant.endswith("crop"))
    buffer = 256 if variant.endswith("shuffle256") else 2048
    ds = data.train_dataset(data_dir, "train", view, B, shuffle_buffer=buffer, threads=threads)
it = iter(ds)
for _ in range(warm):
    next(it)
c0, t0, images = time.process_time(), time.perf_counter(), 0
while time.process_time() - c0 < budget:  # CPU seconds, in rounds of 4 batches
    for _ in range(4):
        next(it)
    images += 4 * B
cpu, wall = time.process_time() - c0, time.perf_counter() - t0
print(json.dumps({"images_per_cpu_second": images / cpu, "images_per_sec": images / wall}))
"""


def make_input(tmp: Path, copies: int) -> Path:
    """A Data_Entry CSV listing each real image `copies` times (symlinks, distinct patients)."""
    images = tmp / "images"
    images.mkdir()
    entries = pd.read_csv(REAL / "nih" / "Data_Entry_2017_v2020.csv", dtype=str)
    real = {p.name: p for p in (REAL / "images" / "nih").glob("*.png")}
    entries = entries[entries["Image Index"].isin(real)]
    rows = []
    for copy in range(copies):
        for _, row in entries.iterrows():
            name = f"c{copy:02d}_{row['Image Index']}"
            os.symlink(real[row["Image Index"]], images / name)
            rows.append(row.to_dict() | {"Image Index": name,
                                         "Patient ID": str(copy * 100_000 + int(row["Patient ID"]))})
    (tmp / "all").mkdir()
    (tmp / "third").mkdir()
    pd.DataFrame(rows).to_csv(tmp / "all" / "Data_Entry_2017.csv", index=False)
    pd.DataFrame(rows[: len(rows) // 3]).to_csv(tmp / "third" / "Data_Entry_2017.csv", index=False)
    return tmp / "all" / "Data_Entry_2017.csv"


def convert(csv: Path, out: Path, workers: int, fmt: str = "tfrecord", encoding: str = "png", size: int = 256) -> float:
    args = [PY, "-m", "chexnet_hvd.records", "--csv", str(csv), "--images", str(csv.parent.parent / "images"),
            "--out", str(out), "--workers", str(workers), "--shard-size", "128", "--no-progress",
            "--format", fmt] + (["--image-size", str(size), "--encoding", encoding] if fmt == "tfrecord" else [])
    t0 = time.perf_counter()
    subprocess.run(args, cwd=ROOT, check=True, capture_output=True)
    return time.perf_counter() - t0


def pipeline(data_dir: Path, variant: str, threads: int = 1, budget: float = 3.0) -> dict:
    """One pipeline `variant` over `data_dir` in a fresh process: images per CPU-second and per
    second of wall time, over `budget` CPU-seconds after 10 warm-up batches."""
    proc = subprocess.run([PY, "-c", PIPELINE, str(data_dir), variant, str(budget), "10", str(threads)],
                          cwd=ROOT, check=True, capture_output=True, text=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure_pipelines(dirs: dict[str, Path], repeats: int, budget: float) -> dict:
    """{encoding: {variant: [images per CPU-second per run]}}, and the 2-thread wall rates of
    the project pipeline, each over `budget` CPU-seconds; runs interleaved, so drift in machine
    load hits all alike."""
    cpu: dict = {enc: {v: [] for v in STEPS + EXTRA} for enc in ("png", "uint8")}
    cpu["raw"] = {"per_record_cpu_float": []}
    cpu["png_224"] = {v: [] for v in AT_MODEL_SIZE}
    wall: dict = {enc: [] for enc in ("png", "uint8")}
    for _ in range(repeats):
        for enc in ("png", "uint8"):
            for variant in STEPS + EXTRA:
                cpu[enc][variant].append(pipeline(dirs[enc], variant, 1, budget)["images_per_cpu_second"])
            wall[enc].append(pipeline(dirs[enc], "pipeline", 2, budget)["images_per_sec"])
        cpu["raw"]["per_record_cpu_float"].append(pipeline(dirs["raw"], "pipeline", 1, budget)["images_per_cpu_second"])
        for variant in AT_MODEL_SIZE:
            cpu["png_224"][variant].append(pipeline(dirs["png_224"], variant, 1, budget)["images_per_cpu_second"])
    return {"cpu": cpu, "wall_2_threads": wall}


def step_costs(rates: dict) -> dict:
    """Microseconds of CPU per image of each step: the difference between the cumulative
    pipelines up to it and up to the step before."""
    micro = {v: 1e6 / statistics.median(r) for v, r in rates.items() if r}
    costs, before = {}, 0.0
    for step in STEPS:
        costs[step] = round(micro[step] - before, 1)
        before = micro[step]
    costs["float work on the CPU (in the model graph otherwise)"] = round(micro["cpu_float"] - micro["augment"], 1)
    return costs


def bytes_per_image(records_dir: Path) -> float:
    manifest = json.loads((records_dir / "manifest.json").read_text())
    shards = [s for split in manifest["splits"].values() for s in split["shards"]]
    return sum(s["bytes"] for s in shards) / sum(s["count"] for s in shards)


GOALS = {"png": 1200, "uint8": 6000}  # images per CPU-second of the project pipeline
GPU_RATES = (2000, 4000)  # img/s a GPU trains DenseNet-121 at in mixed precision (A100 and newer)


def pipeline_summary(measured: dict) -> dict:
    """Medians per encoding: the project pipeline (and with --crop), the per-record path with the
    float work on the CPU (before this pipeline), the step costs, and the cores a GPU needs; for
    PNG records at 224 px the pipeline and its decode step, for the raw index the pipeline."""
    out = {}
    for enc in ("png", "uint8"):
        med = {v: statistics.median(r) for v, r in measured["cpu"][enc].items()}
        out[enc] = {"images_per_cpu_second": round(med["pipeline"]),
                    "images_per_cpu_second_crop": round(med["pipeline_crop"]),
                    "images_per_cpu_second_shuffle_256": round(med["pipeline_shuffle256"]),
                    "goal": GOALS[enc],
                    "per_record_float_on_cpu": round(med["per_record_cpu_float"]),
                    "per_record_uint8": round(med["per_record_uint8"]),
                    "steps_with_float_on_cpu": round(med["cpu_float"]),
                    "step_us_per_image": step_costs(measured["cpu"][enc]),
                    "images_per_sec_2_threads": round(statistics.median(measured["wall_2_threads"][enc])),
                    **{f"cores_per_gpu_at_{rate}": round(rate / med["pipeline"], 2) for rate in GPU_RATES}}
    at_size = {v: statistics.median(r) for v, r in measured["cpu"]["png_224"].items()}
    out["png_224"] = {"images_per_cpu_second": round(at_size["pipeline"]), "goal": GOALS["png"],
                      "decode_us_per_image": round(1e6 / at_size["decode"] - 1e6 / at_size["parse"], 1),
                      **{f"cores_per_gpu_at_{rate}": round(rate / at_size["pipeline"], 2) for rate in GPU_RATES}}
    raw = statistics.median(measured["cpu"]["raw"]["per_record_cpu_float"])
    out["raw"] = {"images_per_cpu_second": round(raw),
                  **{f"cores_per_gpu_at_{rate}": round(rate / raw, 1) for rate in GPU_RATES}}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--copies", type=int, default=10, help="times each real image is listed")
    ap.add_argument("--repeats", type=int, default=3, help="runs of each measurement (median)")
    ap.add_argument("--cpu-seconds", type=float, default=3.0, help="CPU time each pipeline run is timed for")
    ap.add_argument("--out", default=str(ROOT / "docs" / "bench_data.json"))
    args = ap.parse_args()
    if not (REAL / "images" / "nih").is_dir():
        sys.exit(f"error: {REAL / 'images' / 'nih'}: no such directory (the real NIH sample images)")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        csv = make_input(tmp, args.copies)
        third = tmp / "third" / "Data_Entry_2017.csv"
        n, n3 = len(pd.read_csv(csv)), len(pd.read_csv(third))
        seconds = {(w, part): [] for w in (1, 2) for part in ("all", "third")}
        for r in range(args.repeats):  # interleaved, so drift in machine load hits all alike
            for workers in (1, 2):
                for part, source in (("all", csv), ("third", third)):
                    seconds[workers, part].append(convert(source, tmp / f"rec{workers}{part}{r}", workers))
        convert(csv, tmp / "raw", 1, "raw")
        convert(csv, tmp / "uint8", 2, encoding="uint8")
        convert(csv, tmp / "png224", 2, size=224)
        dirs = {"png": tmp / "rec2all0", "uint8": tmp / "uint8", "raw": tmp / "raw", "png_224": tmp / "png224"}
        sizes = {enc: bytes_per_image(dirs[enc]) for enc in ("png", "uint8", "png_224")}
        measured = measure_pipelines(dirs, args.repeats, args.cpu_seconds)
    t = {key: statistics.median(v) for key, v in seconds.items()}
    steady = {w: (n - n3) / (t[w, "all"] - t[w, "third"]) for w in (1, 2)}
    result = {
        "machine": machine(), "date": today(),
        "images": n, "images_third": n3, "source": "121 real NIH PNGs (1024 px; 117 L, 4 RGBA), "
        f"each listed {args.copies}x", "records_image_size": 256,
        "convert_seconds_1_worker": round(t[1, "all"], 2), "convert_seconds_2_workers": round(t[2, "all"], 2),
        "convert_end_to_end_speedup": round(t[1, "all"] / t[2, "all"], 3),
        "convert_steady_images_per_sec_1_worker": round(steady[1], 2),
        "convert_steady_images_per_sec_2_workers": round(steady[2], 2),
        "convert_steady_speedup": round(steady[2] / steady[1], 3),
        "convert_start_seconds_1_worker": round(t[1, "all"] - n / steady[1], 2),
        "convert_start_seconds_2_workers": round(t[2, "all"] - n / steady[2], 2),
        "pipeline": pipeline_summary(measured), "pipeline_image_size": 224, "pipeline_batch": 16,
        "bytes_per_image_png_256": round(sizes["png"]),
        "bytes_per_image_uint8_256": round(sizes["uint8"]),
        "nih_112120_gb_png_256": round(sizes["png"] * 112_120 / 1e9, 2),
        "nih_112120_gb_uint8_256": round(sizes["uint8"] * 112_120 / 1e9, 2),
        "bytes_per_image_png_224": round(sizes["png_224"]),
        "nih_112120_gb_png_224": round(sizes["png_224"] * 112_120 / 1e9, 2),
        "runs": {"convert_seconds": {f"{w} worker(s), {part}": v for (w, part), v in seconds.items()},
                 "pipeline_images_per_cpu_second": measured["cpu"],
                 "pipeline_images_per_sec_2_threads": measured["wall_2_threads"]},
    }
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
