#!/usr/bin/env python3
"""Costs that grow with the data: the data path timed and weighed at NIH-like sizes, up to the
full 112,120 images, in one run.

    .venv/bin/python bench/bench_scale.py [--sizes 10000 30000 112120] [--out docs/bench_scale.json]
    .venv/bin/python bench/bench_scale.py --quick      # 1,000 and 3,000 images, a smoke run

Per size, a synthetic set (`chexnet_hvd.synthetic`, 32 px images: the costs measured here are
per image and per record, not per pixel) with NIH's patient structure (3.64 images per patient
on average: 112,120 of 30,805) and NIH's official split sizes (test_list.txt holds 25,596 of
the 112,120 images, whole patients; validation carved from the rest by patient), then:

- records: `python -m chexnet_hvd.records --split official --image-size 32 --workers 2` end to
  end, with the peak RSS of its main process and of its largest worker process (records of one
  size, as the README's NIH commands write them, so the pipeline below is the one that ships
  uint8 batches to the model's graph);
- table and manifest: the listing, split and leak guard (`sources.load`), the file check and
  shard plan, and `records.manifest.build_manifest` over the written shards' sidecars;
- input pipeline at 16 ranks: `data.train_dataset(..., rank=r, world_size=16)` for ranks 0 and
  15, each in a fresh process: seconds to the first batch (TensorFlow imported and started
  first, as in the trainer), then the steady rate per rank in images per CPU-second and per
  wall second (32 px, batch 16, 2 threads);
- the test split's patient bootstrap: `metrics.bootstrap_ci` on predictions of the test split's
  size with its patients (--resamples; its cost is linear in them);
- `tools/scaling_report.py` over the run log of a 16-rank, 100-epoch run (three attempts,
  written with `chexnet_hvd.runlog`'s writer from a real small run's records).
At the largest size also `python -m chexnet_hvd.evaluate` end to end on the test split (a small
CNN trained briefly on the smallest set; evaluate's default 1,000 bootstrap resamples).
Each set is deleted before the next is made; the full size at 32 px takes about 0.6 GB of disk.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import ROOT, machine, measure, today  # noqa: E402

PY = sys.executable
NIH_IMAGES, NIH_PATIENTS, NIH_TEST = 112_120, 30_805, 25_596
WORLD = 16  # the ranks whose shards the input pipeline is measured at
EPOCHS = 100  # of the synthetic 16-rank run log
PX = 32


# ---------------------------------------------------------------- the synthetic sets ---------
def nih_lists(csv: Path, seed: int = 0) -> int:
    """train_val_list.txt and test_list.txt beside `csv`: whole patients drawn in a seeded order
    into test until it holds NIH's share of the images (25,596 of 112,120); returns its size."""
    frame = pd.read_csv(csv, usecols=["Image Index", "Patient ID"], dtype=str)
    target = round(len(frame) * NIH_TEST / NIH_IMAGES)
    groups = frame.groupby("Patient ID", sort=True)["Image Index"].apply(list)
    test, n = [], 0
    for i in np.random.default_rng(seed).permutation(len(groups)):
        if n + len(groups.iloc[i]) <= target:
            test += groups.iloc[i]
            n += len(groups.iloc[i])
    in_test = set(test)
    (csv.parent / "test_list.txt").write_text("\n".join(test) + "\n")
    (csv.parent / "train_val_list.txt").write_text(
        "\n".join(x for x in frame["Image Index"] if x not in in_test) + "\n")
    return n


def make_set(folder: Path, n: int) -> dict:
    """A synthetic NIH-like set of n images, with the official-split lists."""
    gen = measure([PY, "-m", "chexnet_hvd.synthetic", "--out", str(folder), "--images", str(n),
                   "--size", str(PX), "--seed", "0", "--mean-images-per-patient",
                   f"{NIH_IMAGES / NIH_PATIENTS:.4f}"])
    csv = folder / "Data_Entry_2017.csv"
    patients = pd.read_csv(csv, usecols=["Patient ID"])["Patient ID"].nunique()
    return {"images": n, "patients": int(patients), "test_images": nih_lists(csv),
            "generate_seconds": gen["seconds"]}


def table_config(folder: Path, records_dir: Path):
    from chexnet_hvd.records import writer

    return writer.RecordsConfig(csv=[str(folder / "Data_Entry_2017.csv")], images=[str(folder / "images")],
                                dataset=["nih"], split="official", image_size=PX, out=str(records_dir))


# ---------------------------------------------------------------- stages (own processes) -----
def stage_table(folder: str, records_dir: str) -> dict:
    """The listing (CSV, labels, official split, leak guard), file check and shard plan, and the
    manifest from the written shards' sidecars: what `records` does besides converting images."""
    from chexnet_hvd import sources
    from chexnet_hvd.records import manifest, writer

    cfg = table_config(Path(folder), Path(records_dir))
    t0 = time.perf_counter()
    listing = sources.load(cfg)
    t1 = time.perf_counter()
    present = writer.existing(listing.table["path"])
    jobs = writer.plan_shards(listing.table[present], cfg.shard_size, cfg.image_size, cfg.seed)
    t2 = time.perf_counter()
    results = [json.loads((Path(records_dir) / job.file).with_suffix(".json").read_text()) for job in jobs]
    t3 = time.perf_counter()
    built = manifest.build_manifest(listing, results, present, cfg)
    t4 = time.perf_counter()
    assert sum(s["count"] for s in built["splits"].values()) == len(listing.table)
    return {"listing_seconds": t1 - t0, "plan_seconds": t2 - t1, "manifest_seconds": t4 - t3,
            "seconds": (t2 - t0) + (t4 - t3), "shards": len(jobs)}


def stage_pipeline(records_dir: str, rank: int, batches: int, threads: int) -> dict:
    """Rank `rank` of 16's training input: seconds to the first batch, then the steady rate."""
    import tensorflow as tf

    from chexnet_hvd import data

    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(threads)
    (tf.constant(1) + 1).numpy()  # the runtime is up, as in a trainer that has built its model
    t0 = time.perf_counter()
    it = iter(data.train_dataset(records_dir, "train", PX, 16, rank=rank, world_size=WORLD, seed=0,
                                 threads=threads))
    next(it)
    first = time.perf_counter() - t0
    t1, c1 = time.perf_counter(), time.process_time()
    for _ in range(batches):
        next(it)
    wall, cpu = time.perf_counter() - t1, time.process_time() - c1
    return {"first_batch_seconds": first, "images_per_sec": batches * 16 / wall,
            "images_per_cpu_second": batches * 16 / cpu}


def stage_bootstrap(arrays: str, resamples: int) -> dict:
    """`metrics.bootstrap_ci` over the test split's labels and patients, on scores that
    separate the classes about as well as CheXNet (mean AUROC ~0.8)."""
    from chexnet_hvd import metrics

    split = np.load(arrays, allow_pickle=False)
    label, mask, patient = split["label"], split["mask"], split["patient"]
    noise = np.random.default_rng(0).normal(0, 1.2, label.shape)
    prob = (1 / (1 + np.exp(-(2 * label - 1 + noise)))).astype(np.float32)
    t0, c0 = time.perf_counter(), time.process_time()
    ci = metrics.bootstrap_ci(label, prob, mask, patient, resamples)
    return {"seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0,
            "images": int(len(label)), "patients": ci["patients"], "resamples": resamples}


STAGES = {"table": stage_table, "pipeline": stage_pipeline, "bootstrap": stage_bootstrap}


def median_of_3(run, key: str) -> dict:
    """Of three runs of a short measurement (a second or less: one run is noise), the one with
    the median `key`."""
    return sorted((run() for _ in range(3)), key=lambda m: m[key])[1]


def stage(name: str, *args) -> dict:
    """Run a stage in a fresh process: its own numbers, plus its process's peak RSS and times."""
    run = measure([PY, __file__, "--stage", name, json.dumps(args)])
    return json.loads(run.pop("stdout").strip().splitlines()[-1]) | {
        "process_seconds": run["seconds"], "process_cpu_seconds": run["cpu_seconds"],
        "peak_rss_mb": run["peak_rss_mb"]}


# ---------------------------------------------------------------- run logs -------------------
def small_run(records_dir: Path, run_dir: Path, train_images: int) -> dict:
    """A brief real run (small CNN, 1 rank): a checkpoint for evaluate, records for the log."""
    steps = min(40, train_images // 64)
    measure([PY, "-m", "chexnet_hvd.train", "--data", str(records_dir), "--run-dir", str(run_dir),
             "--model", "small_cnn", "--image-size", str(PX), "--batch-size", "64", "--epochs", "2",
             "--steps-per-epoch", str(steps), "--weights", "none", "--threads", "2", "--verbose", "0"])
    from chexnet_hvd.runlog import read_runlog

    log = read_runlog(run_dir)
    return {"start": next(r for r in log if r["event"] == "start"),
            "epoch": [r for r in log if r["event"] == "epoch"][-1]}


def write_16_rank_log(run_dir: Path, real: dict, train_images: int) -> int:
    """A 16-rank (4 nodes x 4 GPUs), 100-epoch run of `train_images` training images, preempted
    twice and resumed, in the trainer's records (a real run's, rescaled); returns its lines."""
    from chexnet_hvd.runlog import RunLogWriter

    rng = np.random.default_rng(0)
    local = 64
    steps = max(1, train_images // (WORLD * local))
    ranks = [{"rank": r, "host": f"gpu{r // 4:03d}", "local_rank": r % 4, "cpus": 8, "threads": 8,
              "cuda_visible_devices": "0,1,2,3", "gpu": r % 4} for r in range(WORLD)]
    start = {k: v for k, v in real["start"].items() if k not in ("schema", "event", "time")}
    start |= {"world_size": WORLD, "local_batch": local, "global_batch": WORLD * local,
              "steps_per_epoch": steps, "model": "densenet121", "image_size": 224,
              "precision": "mixed_float16", "backend": "nccl", "engine": "horovod",
              "hostnames": sorted({r["host"] for r in ranks}), "ranks": ranks}
    epoch = {k: v for k, v in real["epoch"].items() if k not in ("schema", "event", "time")}
    writer = RunLogWriter(run_dir)
    lines = 0
    for first, last in ((0, 34), (34, 67), (67, EPOCHS)):
        writer.write("start", **start | {"initial_epoch": first, "resumed_from": first or None})
        for e in range(first, last):
            per_rank = rng.normal(120, 4, WORLD)
            writer.write("epoch", **epoch | {
                "epoch": e + 1, "steps": steps, "timed_steps": steps - 1,
                "images_per_sec": float(per_rank.sum()), "images_per_sec_per_rank": per_rank.round(2).tolist(),
                "seconds": steps * WORLD * local / float(per_rank.sum())})
        writer.write("end", status="preempted" if last < EPOCHS else "completed",
                     **({"epoch": last, "step": 0} if last < EPOCHS else {}))
        lines += last - first + 2
    writer.close()
    return lines


# ---------------------------------------------------------------- one size -------------------
def test_arrays(folder: Path, records_dir: Path, out: Path) -> None:
    """The test split's labels, masks and patients (what evaluate gathers), as an .npz."""
    from chexnet_hvd import metadata, sources

    table = sources.load(table_config(folder, records_dir)).table
    test = table[table["split"] == "test"]
    names = metadata.class_names(test)
    np.savez(out, label=test[metadata.label_columns(names)].to_numpy(np.float32),
             mask=test[metadata.mask_columns(names)].to_numpy(np.float32),
             patient=test["patient"].to_numpy(str))


def one_size(work: Path, n: int, args, real: dict | None,
             checkpoint: Path | None) -> tuple[dict, dict, Path]:
    """Every measurement at n images; the set is deleted afterwards. Returns the results and
    (the first time) the small real run's records and checkpoint for the later sizes."""
    folder, records_dir = work / f"set{n}", work / f"records{n}"
    result = make_set(folder, n)
    print(f"{n}: set made ({result['generate_seconds']:.0f} s)", flush=True)
    conv = measure([PY, "-m", "chexnet_hvd.records", "--dataset", "nih", "--csv",
                    str(folder / "Data_Entry_2017.csv"), "--images", str(folder / "images"), "--out",
                    str(records_dir), "--split", "official", "--image-size", str(PX), "--workers", str(args.workers),
                    "--no-progress"])
    manifest = json.loads((records_dir / "manifest.json").read_text())
    result["splits"] = {s: v["count"] for s, v in manifest["splits"].items()}
    result["records_bytes"] = sum(sh["bytes"] for v in manifest["splits"].values() for sh in v["shards"])
    result["convert"] = {k: v for k, v in conv.items() if k != "stdout"} | {"workers": args.workers}
    print(f"{n}: converted ({conv['seconds']:.0f} s)", flush=True)
    result["table"] = median_of_3(lambda: stage("table", str(folder), str(records_dir)), "seconds")
    result["pipeline"] = {str(r): stage("pipeline", str(records_dir), r, args.batches, 2) for r in (0, WORLD - 1)}
    test_arrays(folder, records_dir, work / "test.npz")
    result["bootstrap"] = stage("bootstrap", str(work / "test.npz"), args.resamples)
    print(f"{n}: bootstrap ({result['bootstrap']['seconds']:.0f} s)", flush=True)
    if real is None:
        real = small_run(records_dir, work / "small_run", result["splits"]["train"])
        checkpoint = work / "small_run" / "checkpoints" / "best"
    run_dir = work / f"run16_{n}"
    lines = write_16_rank_log(run_dir, real, result["splits"]["train"])
    report = median_of_3(lambda: measure([PY, str(ROOT / "tools" / "scaling_report.py"), str(run_dir),
                                          "--csv", str(work / "s.csv")]), "cpu_seconds")
    result["report"] = {k: v for k, v in report.items() if k != "stdout"} | {"epochs": EPOCHS, "lines": lines}
    if n == max(args.sizes):
        ev = measure([PY, "-m", "chexnet_hvd.evaluate", "--checkpoint", str(checkpoint), "--data",
                      str(records_dir), "--split", "test", "--out", str(work / "eval")])
        result["evaluate"] = {k: v for k, v in ev.items() if k != "stdout"} | {"resamples": 1000}
        print(f"{n}: evaluate ({ev['seconds']:.0f} s)", flush=True)
    shutil.rmtree(folder)
    shutil.rmtree(records_dir)
    shutil.rmtree(run_dir)
    return result, real, checkpoint


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--stage":
        print(json.dumps(STAGES[sys.argv[2]](*json.loads(sys.argv[3]))))
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 30_000, NIH_IMAGES])
    ap.add_argument("--quick", action="store_true", help="a smoke run: sizes 1,000 and 3,000, "
                    "40 resamples, 30 batches")
    ap.add_argument("--workers", type=int, default=2, help="records writer processes")
    ap.add_argument("--batches", type=int, default=300, help="timed batches of 16 per pipeline run")
    ap.add_argument("--resamples", type=int, default=200, help="bootstrap resamples per size")
    ap.add_argument("--work", default=None, help="scratch directory (default: a temporary one)")
    ap.add_argument("--out", default=str(ROOT / "docs" / "bench_scale.json"))
    args = ap.parse_args()
    if args.quick:
        args.sizes, args.resamples, args.batches = [1_000, 3_000], 40, 30
    args.sizes = sorted(args.sizes)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        sizes, real, checkpoint = {}, None, None
        for n in args.sizes:
            sizes[str(n)], real, checkpoint = one_size(Path(tmp), n, args, real, checkpoint)
    result = {"machine": machine(), "date": today(), "image_px": PX, "world_size": WORLD,
              "batches": args.batches, "sizes": sizes, "seconds": time.perf_counter() - started}
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
