#!/usr/bin/env python3
"""Data-path throughput on this CPU, in one run: records conversion with 1 vs 2 worker processes,
and the training input pipeline's images/s per core at 224 px over PNG records, uint8 records
and a raw-PNG index (and over PNG and uint8 records on 2 cores), with each encoding's bytes per
image.

    .venv/bin/python bench/bench_data.py [--copies 10] [--out docs/bench_data.json]

Input: the 121 real 1024 px NIH PNGs of ../shared/data/real/images/nih, each listed --copies
times under new names (symlinks; new patient ids). Conversion resizes to 256 px offline, as for
224-px training. Each conversion is timed end to end at two sizes (all rows and a third of them),
so that the steady-state rate, (n_all - n_third) / (t_all - t_third), leaves out the fixed start
cost (Python, pandas and TensorFlow imports, about 2-3 s per process) that a 112,120-image run
hardly notices. The pipelines are `chexnet_hvd.data.train_dataset` over those records and over
a raw index of the same files, with tf.data and TF ops held to N threads (1, then 2). Over uint8
records the pipeline ships the flipped uint8 pixels: the float work (resize to 224, scale, 3
channels, ImageNet mean/std) runs in the model's graph, on the GPU when there is one, so it is
not the CPU's cost here.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
REAL = ROOT.parent / "shared" / "data" / "real"
PY = sys.executable

PIPELINE = r"""
import json, sys, time
import tensorflow as tf
data_dir, batches, warm, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
tf.config.threading.set_intra_op_parallelism_threads(threads)
tf.config.threading.set_inter_op_parallelism_threads(threads)
from chexnet_hvd import data
# `threads` cores for the whole input pipeline: its private thread pool (as the trainer sizes it)
it = iter(data.train_dataset(data_dir, "train", 224, 16, shuffle_buffer=256, threads=threads))
for _ in range(warm):
    next(it)
t0 = time.perf_counter()
for _ in range(batches):
    next(it)
print(json.dumps({"images_per_sec": batches * 16 / (time.perf_counter() - t0)}))
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


def convert(csv: Path, out: Path, workers: int, fmt: str = "tfrecord", encoding: str = "png") -> float:
    args = [PY, "-m", "chexnet_hvd.records", "--csv", str(csv), "--images", str(csv.parent.parent / "images"),
            "--out", str(out), "--workers", str(workers), "--shard-size", "128", "--no-progress",
            "--format", fmt] + (["--image-size", "256", "--encoding", encoding] if fmt == "tfrecord" else [])
    t0 = time.perf_counter()
    subprocess.run(args, cwd=ROOT, check=True, capture_output=True)
    return time.perf_counter() - t0


def pipeline(data_dir: Path, batches: int, threads: int = 1) -> float:
    proc = subprocess.run([PY, "-c", PIPELINE, str(data_dir), str(batches), "3", str(threads)], cwd=ROOT,
                          check=True, capture_output=True, text=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])["images_per_sec"]


def bytes_per_image(records_dir: Path) -> float:
    manifest = json.loads((records_dir / "manifest.json").read_text())
    shards = [s for split in manifest["splits"].values() for s in split["shards"]]
    return sum(s["bytes"] for s in shards) / sum(s["count"] for s in shards)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--copies", type=int, default=10, help="times each real image is listed")
    ap.add_argument("--repeats", type=int, default=2, help="runs of each measurement (median)")
    ap.add_argument("--batches", type=int, default=30, help="timed batches of 16 per pipeline run")
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
        records_dir = tmp / "rec2all0"
        sizes = {"png": bytes_per_image(records_dir), "uint8": bytes_per_image(tmp / "uint8")}
        ips = {"tfrecord": [], "raw": [], "uint8": [], "tfrecord_2_cores": [], "uint8_2_cores": []}
        for _ in range(args.repeats):
            ips["tfrecord"].append(pipeline(records_dir, args.batches))
            ips["raw"].append(pipeline(tmp / "raw", args.batches))
            ips["uint8"].append(pipeline(tmp / "uint8", args.batches * 10))
            ips["tfrecord_2_cores"].append(pipeline(records_dir, args.batches, threads=2))
            ips["uint8_2_cores"].append(pipeline(tmp / "uint8", args.batches * 10, threads=2))
    t = {key: statistics.median(v) for key, v in seconds.items()}
    steady = {w: (n - n3) / (t[w, "all"] - t[w, "third"]) for w in (1, 2)}
    med = {key: statistics.median(v) for key, v in ips.items()}
    rec, raw = med["tfrecord"], med["raw"]
    result = {
        "machine": f"{platform.node()}, {os.cpu_count()} cores", "date": time.strftime("%Y-%m-%d"),
        "images": n, "images_third": n3, "source": "121 real NIH PNGs (1024 px; 117 L, 4 RGBA), "
        f"each listed {args.copies}x", "records_image_size": 256,
        "convert_seconds_1_worker": round(t[1, "all"], 2), "convert_seconds_2_workers": round(t[2, "all"], 2),
        "convert_end_to_end_speedup": round(t[1, "all"] / t[2, "all"], 3),
        "convert_steady_images_per_sec_1_worker": round(steady[1], 2),
        "convert_steady_images_per_sec_2_workers": round(steady[2], 2),
        "convert_steady_speedup": round(steady[2] / steady[1], 3),
        "convert_start_seconds_1_worker": round(t[1, "all"] - n / steady[1], 2),
        "convert_start_seconds_2_workers": round(t[2, "all"] - n / steady[2], 2),
        "pipeline_images_per_sec_per_core_tfrecord": round(rec, 2),
        "pipeline_images_per_sec_per_core_raw": round(raw, 2),
        "pipeline_tfrecord_over_raw": round(rec / raw, 3),
        "pipeline_images_per_sec_per_core_uint8": round(med["uint8"], 2),
        "pipeline_uint8_over_png": round(med["uint8"] / rec, 3),
        "pipeline_images_per_sec_2_cores_tfrecord": round(med["tfrecord_2_cores"], 2),
        "pipeline_images_per_sec_2_cores_uint8": round(med["uint8_2_cores"], 2),
        # a DenseNet-121 GPU at ~2,000 img/s (mixed precision; derived, not measured here)
        "cores_per_gpu_at_2000_png": round(2000 / rec, 2),
        "cores_per_gpu_at_2000_uint8": round(2000 / med["uint8"], 2),
        "bytes_per_image_png_256": round(sizes["png"]),
        "bytes_per_image_uint8_256": round(sizes["uint8"]),
        "nih_112120_gb_png_256": round(sizes["png"] * 112_120 / 1e9, 2),
        "nih_112120_gb_uint8_256": round(sizes["uint8"] * 112_120 / 1e9, 2),
        "runs": {"convert_seconds": {f"{w} worker(s), {part}": v for (w, part), v in seconds.items()},
                 "pipeline_images_per_sec": ips},
    }
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
