"""The JSON-lines run-log schema: the writer the trainer uses and the reader the tools use.

`RUN_DIR/runlog.jsonl`, written by rank 0, one object per line, `schema` first, then `event`:
  start  config, world_size, local_batch, global_batch, steps_per_epoch, scaled_lr, model,
         image_size, precision, engine (horovod | tf), backend (its transport: mpi, gloo,
         ring, nccl; logs before the tf engine have horovod_backend), hostnames, ranks (per
         rank: host, local rank, CPUs, threads, CUDA_VISIBLE_DEVICES, the GPU it uses),
         slurm_job_id, versions,
         resumed_from, initial_epoch, initial_step, skipped_batches (a mid-epoch resume)
  epoch  epoch, steps, timed_steps, seconds, images_per_sec, images_per_sec_per_rank,
         train_loss, lr, val_loss, val_auroc (per class), val_mean_auroc, val_auprc, val_n,
         val_batches, val_seconds, peak_memory_mb (rank 0: GPU allocator peak, or peak RSS on CPU),
         bottleneck with step_seconds, compute_seconds and input_starved per rank and
         communication_seconds (chexnet_hvd.bottleneck); an epoch a resume left no step to
         train has steps 0 and images_per_sec, images_per_sec_per_rank and train_loss null
  Any NaN or infinity (a diverged loss) is written as null: every line is strict JSON.
  end    status: completed | preempted (with step, epoch) | failed (with error) | stalled
         (with error, and the ranks and hosts it names: chexnet_hvd.stall; a rank stuck in
         its start-up, or one waiting there for it, writes one with before_start true and its
         own host and slurm_job_id, its attempt having no start record; one the engine
         ended while the job was suspended names no rank and carries `suspended`, the
         seconds it was, and before_start where the attempt had written no start record)
A resumed run appends: one start per attempt, each followed by the epochs it trained.
Each line is flushed and fsynced, so a killed job leaves a readable log. A line a kill or a full
disk cut short is ended with a newline by the next attempt's writer before it appends (so the
torn line stays one unreadable line instead of swallowing the next record), and every reader
skips unreadable lines and counts them (`read_records`). This module must not import
TensorFlow: tools/scaling_report.py reads logs on machines without it.

`python -m chexnet_hvd.runlog RUN_DIR` prints how the newest attempt ended; the Slurm templates
take `--records` before an attempt and ask `--after` that count after it (an attempt that
failed before its start record is not judged by the one before), requeue a job when it says
`preempted` and the launcher failed, whatever its code (srun ends the other ranks (143) once one
exits 75), and when it says `stalled` unless `--stalled-in-a-row` says 2 or more; with `--count
STATUS`, how many attempts ended so.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import threading
import time
from pathlib import Path
from typing import Any

from chexnet_hvd import cli

SCHEMA = "chexnet_hvd.runlog/1"
FILENAME = "runlog.jsonl"
END_STATUSES = ("completed", "preempted", "failed", "stalled")
# The fields every record of an event must have (the writer refuses one without them, the
# reader a file holding one; the docstring above lists the rest): readers such as
# tools/scaling_report.py rely on these.
REQUIRED = {"start": ("world_size", "local_batch", "model", "image_size", "precision"),
            "epoch": ("epoch", "seconds", "images_per_sec"),
            "end": ("status",)}
EVENTS = tuple(REQUIRED)


def finite(value: Any) -> Any:
    """`value` with every NaN or infinity (a diverged loss) as None: json.dumps would write NaN,
    which strict JSON readers refuse."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    return value


class RunLogError(ValueError):
    """A run log that is missing, empty or of another schema."""


class RunLogWriter:
    """Append-only writer; one JSON object per line, flushed and fsynced."""

    def __init__(self, run_dir: str | Path):
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        self.path = Path(run_dir) / FILENAME
        self._lock = threading.Lock()  # the stall watchdog's thread may write the end record
        self._fh = open(self.path, "a+b")
        if self._fh.tell() and (self._fh.seek(-1, os.SEEK_END), self._fh.read(1))[1] != b"\n":
            self._fh.write(b"\n")  # end a line torn by a kill or a full disk: see the docstring above

    def write(self, event: str, **fields: Any) -> dict:
        if event not in EVENTS:
            raise ValueError(f"unknown run-log event {event!r}")
        missing = [k for k in REQUIRED[event] if k not in fields]
        if missing or (event == "end" and fields["status"] not in END_STATUSES):
            raise ValueError(f"run-log {event} record without {missing or 'a known status'}")
        record = finite({"schema": SCHEMA, "event": event, "time": round(time.time(), 3), **fields})
        with self._lock:
            try:
                self._fh.write((json.dumps(record, default=str) + "\n").encode())
                self._fh.flush()
                os.fsync(self._fh.fileno())
            except OSError as err:  # a full disk fails the flush, whose error names no file
                raise OSError(err.errno, err.strerror, str(self.path)) from None
        return record

    def close(self) -> None:
        self._fh.close()


def log_path(path: str | Path) -> Path:
    """The run log of `path`, a run log or its run directory."""
    path = Path(path)
    return path / FILENAME if path.is_dir() else path


def read_records(path: str | Path) -> tuple[list[dict], list[int]]:
    """(records, numbers of the lines skipped as unreadable) of a run log (a file or its run
    directory). A line that is not JSON (a write torn by a kill or a full disk) is skipped;
    RunLogError when the file is missing, holds no record, JSON of another schema, or a record
    without its event's REQUIRED fields."""
    out, skipped = parse(log_path(path))
    if not out:
        raise RunLogError(f"{log_path(path)}: empty run log")
    return out, skipped


def parse(path: Path) -> tuple[list[dict], list[int]]:
    """read_records' work, a run log without a record let through."""
    if not path.is_file():
        raise RunLogError(f"{path}: no run log")
    out, skipped = [], []
    for i, line in enumerate(path.read_bytes().decode("utf-8", errors="replace").splitlines()):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            skipped.append(i + 1)
            continue
        if not isinstance(record, dict) or record.get("schema") != SCHEMA:
            found = record.get("schema") if isinstance(record, dict) else type(record).__name__
            raise RunLogError(f"{path}:{i + 1}: schema {found!r}, expected {SCHEMA!r}")
        missing = [k for k in REQUIRED.get(record.get("event"), ("event",)) if k not in record]
        if missing:
            raise RunLogError(f"{path}:{i + 1}: {record.get('event', 'a')} record without {', '.join(missing)}")
        out.append(record)
    return out, skipped


def read_runlog(path: str | Path) -> list[dict]:
    """All readable records of a run log (a file or its run directory), unreadable lines
    skipped (`read_records` counts them); RunLogError when not one of ours."""
    return read_records(path)[0]


def status(path: str | Path, after: int = 0) -> str:
    """How the newest attempt ended: completed, preempted, failed or stalled; `running` when the last
    record is not an `end` (still going, or killed before it could write one). With `after`: of
    the records after the first `after` (an attempt's own, the count taken before it began),
    `none` when it wrote none (it failed before its start record: the ending before it is
    another attempt's)."""
    records = read_runlog(path)[after:]
    if not records:
        return "none"
    return records[-1]["status"] if records[-1]["event"] == "end" else "running"


def count(path: str | Path, end_status: str) -> int:
    """How many attempts ended with `end_status`."""
    return sum(r["event"] == "end" and r["status"] == end_status for r in read_runlog(path))


def stalled_in_a_row(path: str | Path, per_job: bool = True) -> int:
    """How many attempts stalled since the run last completed an epoch (one with steps: an
    epoch a resume left empty is no progress): a node or link that stalls each attempt before
    it gets anywhere, where stalls days apart are unrelated. `per_job`: the newest Slurm job's
    attempts only (a job resubmitted on the run, its bad node excluded, counts afresh). An
    attempt ended by a suspension (the scheduler's doing, not a node's fault) is not counted."""
    stalls, job = 0, None
    for record in read_runlog(path):
        other_job = per_job and record.get("slurm_job_id", job) != job
        if (record["event"] == "epoch" and record.get("steps", 1)) or other_job:
            stalls, job = 0, record.get("slurm_job_id", job)
        stalls += record["event"] == "end" and record["status"] == "stalled" and "suspended" not in record
    return stalls


def records(path: str | Path) -> int:
    """How many readable records the run log holds; 0 when there is none yet."""
    return len(parse(log_path(path))[0]) if log_path(path).exists() else 0


@dataclasses.dataclass
class StatusConfig:
    run_dir: str = cli.field(help="run directory (or its runlog.jsonl)")
    count: str = cli.field("", help="print instead how many attempts ended so",
                           choices=["", *END_STATUSES])
    stalled_in_a_row: bool = cli.field(False, help="print instead how many attempts of the newest "
                                       "Slurm job stalled since the run last completed an epoch, "
                                       "suspensions aside (the Slurm templates requeue a stalled job "
                                       "unless it is 2 or more)")
    records: bool = cli.field(False, help="print instead how many records the run log holds (0: none "
                              "yet); taken before an attempt, it is that attempt's --after")
    after: int = cli.field(0, help="how the attempt that began after the first AFTER records ended, "
                           "none when it wrote no record (it failed before its start)", minimum=0)


def main(argv: list[str] | None = None) -> int:
    cfg = cli.parse_config(StatusConfig, "Print how a run's newest attempt ended: completed, "
                           "preempted, failed, stalled or running.", argv, positional=["run_dir"],
                           prog="python -m chexnet_hvd.runlog")
    queries = {"--count": cfg.count, "--stalled-in-a-row": cfg.stalled_in_a_row, "--records": cfg.records,
               "--after": cfg.after}
    given = [flag for flag, value in queries.items() if value]
    if len(given) > 1:
        raise cli.InputError(given[1], f"give one of {', '.join(queries)}, not {' and '.join(given)}")
    try:
        if cfg.count:
            print(count(cfg.run_dir, cfg.count))
        elif cfg.stalled_in_a_row:
            print(stalled_in_a_row(cfg.run_dir))
        else:
            print(records(cfg.run_dir) if cfg.records else status(cfg.run_dir, cfg.after))
    except RunLogError as err:
        where, _, what = str(err).partition(": ")
        raise cli.InputError(where, what) from None
    return 0


if __name__ == "__main__":
    cli.run(main)
