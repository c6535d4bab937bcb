"""The parallel shard writer and its CLI: images and their metadata -> a records directory
(the schema and manifest: `chexnet_hvd.records`).

`python -m chexnet_hvd.records --dataset nih --csv CSV --images DIR --out DIR` converts every image
(PNG, JPEG or DICOM) listed in the CSV, or in each of several sources' CSVs merged into one set
(chexnet_hvd.sources), to 8-bit grayscale (PNG bytes, or with --encoding uint8 the raw pixels
of a fixed size) in sharded `<split>-NNNNN-of-NNNNN.tfrecord` files. Each shard is written under a
temporary name and renamed when complete, then a sidecar JSON holding its key and counts; a
re-run reuses a shard only when its key (everything its bytes depend on) is unchanged. Shards are
planned on the listed images that exist; the missing ones are listed in missing.csv, unreadable
ones in rejects.csv with the reason: written + rejected + missing = listed, always. manifest.json
is written last, so its presence means the directory is complete.

Across nodes: under `mpirun`/`srun` each MPI rank (mpi4py) writes every size-th shard of the
same plan with its own worker processes, and rank 0 gathers the results and writes rejects.csv,
missing.csv and the manifest; the output is the same as a single-process run's. A rank that fails
prints its error and ends the whole job (MPI_Abort).
"""

from __future__ import annotations

import concurrent.futures as futures
import dataclasses
import hashlib
import json
import multiprocessing
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pandas as pd
from tqdm import tqdm

from chexnet_hvd import cli, images, metadata, sources, splits
from chexnet_hvd.records import (
    MANIFEST,
    MISSING,
    REJECTS,
    SCHEMA_VERSION,
    serialize_example,
    write_errors,
)
from chexnet_hvd.records.manifest import build_manifest, manifest_warnings

T = TypeVar("T")


@dataclasses.dataclass
class ShardJob:
    split: str
    file: str
    rows: list  # (image, path, patient, labels, mask, source); labels and mask: sequences of floats
    image_size: int | None
    names: tuple = ()  # class names of labels and mask
    encoding: str = "png"

    def key(self) -> str:
        """Identity of everything the shard's bytes depend on: the records schema and the image
        conversion, the size, the class names, every row (image, path, patient, labels, mask,
        source) and each image file's size and modification time. A re-run reuses only an equal
        shard: relabelled rows, another uncertainty policy or a replaced image file rewrite it."""
        stats = []
        for row in self.rows:
            try:
                st = os.stat(row[1])
                stats.append([st.st_size, st.st_mtime_ns])
            except OSError:
                stats.append(None)
        text = json.dumps([SCHEMA_VERSION, images.CONVERSION, self.encoding, self.image_size, list(self.names),
                           [list(row[:3]) + [list(map(float, row[3])), list(map(float, row[4])), row[5]]
                            for row in self.rows],
                           stats])
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def reusable(final: Path, sidecar: Path, key: str) -> dict | None:
    """The sidecar of a complete shard with this key, else None."""
    try:
        done = json.loads(sidecar.read_text())
        return done if done.get("key") == key and final.stat().st_size == done.get("bytes") else None
    except (OSError, ValueError):
        return None


def write_shard(job: ShardJob, out_dir: str) -> dict:
    """Write one shard and its sidecar, or reuse an equal complete one. Commit order: the old
    sidecar goes first, then the shard is renamed into place, then the new sidecar: a sidecar
    only ever vouches for the shard beside it, whenever the writer is killed."""
    import tensorflow as tf

    final = Path(out_dir) / job.file
    sidecar = final.with_suffix(".json")
    key = job.key()
    if (done := reusable(final, sidecar, key)) is not None:
        return done | {"reused": True}
    tmp = final.with_name(final.name + f".tmp{os.getpid()}")
    n_classes = len(job.rows[0][3])
    written, rejects, bits = 0, [], {}
    positives, negatives = np.zeros(n_classes, np.int64), np.zeros(n_classes, np.int64)
    # a full disk: one line naming the shard, its partial file removed (the pool hands the error on)
    with cli.writing(tmp, final, "this shard", write_errors()), tf.io.TFRecordWriter(str(tmp)) as writer:
        for image, path, patient, labels, mask, source in job.rows:
            try:
                gray, depth = images.read_grayscale_bits(path, job.image_size)
                encoded = images.encode(gray, job.encoding)
            except FileNotFoundError:
                rejects.append((image, job.split, path, "missing file"))
                continue
            except Exception as err:  # PIL raises many types for corrupt files
                rejects.append((image, job.split, path, f"unreadable image: {type(err).__name__}: {err}"))
                continue
            writer.write(serialize_example(encoded, image, patient, labels, mask, job.encoding, source))
            written += 1
            bits[str(depth)] = bits.get(str(depth), 0) + 1
            labelled = np.asarray(mask) > 0  # masked (e.g. U-Ignore) labels count as neither
            positives += (labelled & (np.asarray(labels) >= 0.5)).astype(np.int64)
            negatives += (labelled & (np.asarray(labels) < 0.5)).astype(np.int64)
    sidecar.unlink(missing_ok=True)
    os.replace(tmp, final)
    result = {"file": job.file, "split": job.split, "key": key, "count": written,
              "bytes": final.stat().st_size, "positives": positives.tolist(),
              "negatives": negatives.tolist(), "source_bits": bits, "rejects": rejects}
    sidecar_tmp = sidecar.with_name(sidecar.name + ".tmp")
    with cli.writing(sidecar_tmp, sidecar, "this shard's sidecar"):
        sidecar_tmp.write_text(json.dumps(result))
    os.replace(sidecar_tmp, sidecar)  # the commit point: the shard is vouched for
    return result | {"reused": False}


def write_index(job: ShardJob, out_dir: str) -> dict:
    """--format raw: list the split's image files in a CSV index (temp name, then rename). Files
    missing or of a kind the raw pipeline cannot decode (judged from their headers) are rejected
    here; a file corrupt past its header only shows when training reads it."""
    y, m = metadata.label_columns(job.names), metadata.mask_columns(job.names)
    rows, rejects = [], []
    for image, path, patient, labels, mask, source in job.rows:
        if problem := images.raw_problem(path):
            rejects.append((image, job.split, path, problem))
        else:
            rows.append([image, str(Path(path).resolve()), patient, source, *map(float, labels), *map(float, mask)])
    frame = pd.DataFrame(rows, columns=["image", "path", "patient", "source", *y, *m])
    final = Path(out_dir) / job.file
    tmp = final.with_name(final.name + ".tmp")
    with cli.writing(tmp, final, "this index"):
        frame.to_csv(tmp, index=False)
    os.replace(tmp, final)
    labelled = frame[m].to_numpy() > 0
    positives = (labelled & (frame[y].to_numpy() >= 0.5)).sum(0)
    negatives = (labelled & (frame[y].to_numpy() < 0.5)).sum(0)
    return {"file": job.file, "split": job.split, "key": job.key(), "count": len(rows),
            "bytes": final.stat().st_size, "positives": positives.astype(np.int64).tolist(),
            "negatives": negatives.astype(np.int64).tolist(), "source_bits": {},
            "rejects": rejects, "reused": False}


def existing(paths) -> np.ndarray:
    """Whether each file exists, from one listing per folder: a stat per listed file is slow on
    a parallel file system, and NIH's 112,120 images share one folder. A folder that cannot be
    listed is asked file by file."""
    listings: dict[str, set[str] | None] = {}
    found = []
    for path in map(str, paths):
        folder, name = os.path.split(path)
        if folder not in listings:
            try:
                listings[folder] = set(os.listdir(folder or "."))
            except OSError:
                listings[folder] = None
        names = listings[folder]
        found.append(os.path.isfile(path) if names is None else name in names)
    return np.array(found, dtype=bool)


def plan_shards(table: pd.DataFrame, shard_size: int, image_size: int | None,
                seed: int, suffix: str = ".tfrecord", encoding: str = "png") -> list[ShardJob]:
    """Cut each split into ceil(n / shard_size) shards of near-equal size; nothing is dropped.
    `table` holds the rows to write (the records writer leaves out the missing images first)."""
    names = metadata.class_names(table)
    # The columns as arrays, taken once; rows point into them (copies of the table per split
    # held 0.4 kB a row at NIH's 112,120). labels and mask: each row a view of one float32
    # array (Python lists of floats held 1.3 kB a row).
    columns = [table[c].to_numpy() for c in ("image", "path", "patient")]
    labels = table[metadata.label_columns(names)].to_numpy(np.float32)
    mask = table[metadata.mask_columns(names)].to_numpy(np.float32)
    source, split_of = table["source"].to_numpy(), table["split"].to_numpy()
    jobs = []
    for split in splits.SPLITS:
        # Shuffled once (seeded) so each shard mixes patients and findings.
        where = np.flatnonzero(split_of == split)
        where = where[np.random.default_rng(seed).permutation(len(where))]
        if not len(where):
            continue
        n_shards = -(-len(where) // shard_size)
        for i, chunk in enumerate(np.array_split(where, n_shards)):
            rows = [(columns[0][j], columns[1][j], columns[2][j], labels[j], mask[j], source[j]) for j in chunk]
            jobs.append(ShardJob(split, f"{split}-{i:05d}-of-{n_shards:05d}{suffix}", rows, image_size, names,
                                 encoding))
    return jobs


def run_jobs(jobs: list[ShardJob], out_dir: str, workers: int, progress: bool = True,
             write=write_shard) -> list[dict]:
    """Write shards in `workers` processes (spawned: TensorFlow must not be forked)."""
    bar = tqdm(total=sum(len(j.rows) for j in jobs), unit="img", desc="records",
               disable=not progress or None)
    results = []
    if workers <= 1:
        for job in jobs:
            results.append(write(job, out_dir))
            bar.update(len(job.rows))
    else:
        ctx = multiprocessing.get_context("spawn")
        with futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
            pending = {pool.submit(write, job, out_dir): job for job in jobs}
            try:
                for done in futures.as_completed(pending):
                    results.append(done.result())
                    bar.update(len(pending[done].rows))
            except BaseException:
                pool.shutdown(cancel_futures=True)  # fail now, not after the queued shards
                raise
    bar.close()
    return sorted(results, key=lambda r: r["file"])


MPI_ENV = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "SLURM_STEP_NUM_TASKS")


def mpi_comm():
    """COMM_WORLD when started by an MPI launcher with more than one rank, else None. mpi4py is
    only imported then, so a plain run never initialises MPI."""
    if not any(v in os.environ for v in MPI_ENV):
        return None
    from mpi4py import MPI

    return MPI.COMM_WORLD if MPI.COMM_WORLD.Get_size() > 1 else None


def write_shards(cfg: RecordsConfig, table: pd.DataFrame, comm) -> tuple[list[dict] | None, np.ndarray]:
    """This rank's share of the shards (every size-th of one plan). Returns every rank's results
    on rank 0 (None elsewhere) and which of the table's files exist."""
    rank, size = (comm.Get_rank(), comm.Get_size()) if comm else (0, 1)
    out = cli.make_dir(cfg.out)
    if rank == 0:
        (out / MANIFEST).unlink(missing_ok=True)  # the directory is incomplete until we finish
    # Shards are planned on the images that exist (a partial folder against a full CSV gives
    # full shards, not one per listed thousand); rank 0 looks, so every rank plans the same.
    present = existing(table["path"]) if rank == 0 else None
    if comm:
        present = comm.bcast(present, root=0)
    raw = cfg.format == "raw"
    jobs = plan_shards(table[present], max(int(present.sum()), 1) if raw else cfg.shard_size,
                       cfg.image_size, cfg.seed, ".csv" if raw else ".tfrecord", cfg.encoding)
    results = run_jobs(jobs[rank::size], str(out), 1 if raw else cfg.workers,
                       cfg.progress and rank == 0, write_index if raw else write_shard)
    if comm:  # every rank planned the same shards; rank 0 alone reports on all of them
        gathered = comm.gather(results, root=0)
        results = sorted((r for part in gathered for r in part), key=lambda r: r["file"]) if rank == 0 else None
    return results, present


def error_line(err: BaseException) -> str:
    """What cli.run would print for an error: `where: what` for the suite's and the file
    system's errors, the type and message for anything else."""
    if isinstance(err, cli.InputError):
        return f"{err.where}: {err.what}"
    if isinstance(err, OSError):  # a rename names both files
        files = " -> ".join(str(f) for f in (err.filename, err.filename2) if f) or "a file"
        return f"{files}: {err.strerror or err}"
    return f"{type(err).__name__}: {err}"


def ending_the_job_on_failure(comm: Any, work: Callable[[], T]) -> T:
    """`work()`; under MPI a failure on any rank prints that rank's one-line error and ends the
    whole job (MPI_Abort). Otherwise the others would wait for it for ever: rank 0 in gather,
    the rest in MPI_Finalize, until the job's time limit."""
    if comm is None:
        return work()
    try:
        return work()
    except BaseException as err:  # any failure, an interrupt too, must end every rank
        print(f"error: {error_line(err)} (MPI rank {comm.Get_rank()} of {comm.Get_size()}; ending "
              "the job)", file=sys.stderr, flush=True)
        comm.Abort(cli.EXIT_USAGE if isinstance(err, cli.InputError | OSError) else 1)
        raise  # not reached: Abort ends this process too


@dataclasses.dataclass(kw_only=True)
class RecordsConfig(sources.TableConfig):
    out: str = cli.field(help="output records directory")
    format: str = cli.field("tfrecord", help="tfrecord: convert to sharded TFRecords; raw: no "
                            "conversion, a per-split CSV index of the image files for the "
                            "raw-image pipeline (train reads either)", choices=["tfrecord", "raw"])
    image_size: int | None = cli.field(None, help="resize offline to N x N (default: keep source "
                                       "size, e.g. 1024 for the large-input models)", minimum=1)
    encoding: str = cli.field("png", help="png: lossless PNG bytes (any size); uint8: the raw "
                              "pixels, needs --image-size; nearly free to read, the float work "
                              "then runs in the model's graph (on the GPU)", choices=["png", "uint8"])
    shard_size: int = cli.field(1024, help="records per shard (the last shard is never dropped)",
                                minimum=1)
    workers: int = cli.field(len(os.sched_getaffinity(0)), help="parallel worker processes (per MPI rank "
                             "under mpirun/srun)", minimum=1)
    max_rejects: int = cli.field(-1, help="unreadable and missing images tolerated (listed in "
                                 "rejects.csv with the reason, and in missing.csv); with more, no "
                                 "manifest is written and the exit code is 2 (-1: no limit)",
                                 minimum=-1)
    progress: bool = cli.field(True, help="show a progress bar")


def write_records(cfg: RecordsConfig) -> dict:
    """The whole conversion: table -> shards -> rejects.csv -> manifest.json (last)."""
    cli.check_values(cfg)  # the CLI checked them; a config built in code is checked here
    for folder in cfg.images:
        if not Path(folder).is_dir():
            raise cli.InputError(folder, "no such directory")
    if cfg.encoding == "uint8" and not cfg.image_size:
        raise cli.InputError("--encoding", "uint8 stores fixed-size pixels: give --image-size")
    if cfg.format == "raw" and cfg.image_size:
        raise cli.InputError("--image-size", "resizing offline needs --format tfrecord (the raw "
                             "pipeline resizes while training)")
    listing = sources.load(cfg)
    table = listing.table
    if cfg.format == "raw" and table["path"].map(images.is_dicom_name).any():
        raise cli.InputError(table["path"][table["path"].map(images.is_dicom_name)].iloc[0],
                             "DICOM needs --format tfrecord (the raw pipeline decodes PNG and JPEG)")
    comm = mpi_comm()
    size = comm.Get_size() if comm else 1
    out = Path(cfg.out)
    results, present = ending_the_job_on_failure(comm, lambda: write_shards(cfg, table, comm))
    if results is None:  # an MPI rank other than 0: rank 0 reports
        return None
    rejects = [r for res in results for r in res["rejects"]]
    with cli.output(out / REJECTS) as fh:
        pd.DataFrame(rejects, columns=["image", "split", "path", "reason"]).to_csv(fh, index=False)
    missing = table.loc[~present, ["image", "split"]]
    with cli.output(out / MISSING) as fh:
        missing.to_csv(fh, index=False)
    if not sum(res["count"] for res in results):  # nothing to train on
        if len(missing):  # a wrong --images, most likely
            why = (f"{len(missing)} missing, the first {table.loc[~present, 'path'].iloc[0]}, listed in "
                   f"{out / MISSING}; is --images the folder that holds them?")
        else:
            why = f"all unreadable, listed in {out / REJECTS}; the first {rejects[0][2]}: {rejects[0][3]}"
        raise cli.InputError(", ".join(map(str, cfg.images)), f"none of the {len(table)} listed "
                             f"images was written ({why}); no manifest written")
    if 0 <= cfg.max_rejects < len(rejects) + len(missing):
        bad = len(rejects) + len(missing)
        where, what = (rejects[0][2], rejects[0][3]) if rejects else (table.loc[~present, "path"].iloc[0],
                                                                       "missing file")
        raise cli.InputError(where, f"{what} ({len(rejects)} unreadable, listed in {out / REJECTS}, "
                             f"and {len(missing)} missing, listed in {out / MISSING}; no manifest "
                             f"written: fix them or pass --max-rejects {bad} to accept)")
    manifest = build_manifest(listing, results, present, cfg)
    manifest["rejected"] = len(rejects)
    manifest["missing"] = len(missing)
    manifest["listed"] = len(table)
    manifest["writer_ranks"] = size
    tmp = out / (MANIFEST + ".tmp")
    with cli.writing(tmp, out / MANIFEST, "the manifest"):
        tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, out / MANIFEST)
    return manifest


def main(argv: list[str] | None = None) -> int:
    cfg = cli.parse_config(RecordsConfig, "Convert chest X-ray images + metadata CSV to sharded "
                           "TFRecords with a manifest.", argv, prog="python -m chexnet_hvd.records")
    manifest = write_records(cfg)
    if manifest is None:  # an MPI rank other than 0: rank 0 reports
        return 0
    if cfg.views != "all":
        print(f"--views {cfg.views}: kept {manifest['listed']} rows, dropped "
              f"{manifest['dropped_by_views']} of other views")
    counts = ", ".join(f"{s} {v['count']}" for s, v in manifest["splits"].items())
    print(f"wrote {counts} records to {cfg.out}")
    for line in manifest_warnings(manifest):
        print(line, file=sys.stderr)
    if manifest["rejected"]:
        print(f"warning: {manifest['rejected']} of {manifest['listed']} images rejected as "
              f"unreadable, each with its reason in {Path(cfg.out) / REJECTS}", file=sys.stderr)
    if manifest["missing"]:
        print(f"warning: {manifest['missing']} of {manifest['listed']} images missing from the "
              f"image folders, listed in {Path(cfg.out) / MISSING}", file=sys.stderr)
    return 0

