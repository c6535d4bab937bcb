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
         val_batches, val_seconds, peak_memory_mb (rank 0: GPU allocator peak, or peak RSS on CPU)
  end    status: completed | preempted (with step, epoch) | failed (with error)
A resumed run appends: one start per attempt, each followed by the epochs it trained.
Each line is flushed and fsynced, so a killed job leaves a readable log. This module must not
import TensorFlow: tools/scaling_report.py reads logs on machines without it.

`python -m chexnet_hvd.runlog RUN_DIR` prints how the newest attempt ended (the Slurm templates
requeue a job when it says `preempted`, whatever exit code the launcher passed on).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any

from chexnet_hvd import cli

SCHEMA = "chexnet_hvd.runlog/1"
FILENAME = "runlog.jsonl"
END_STATUSES = ("completed", "preempted", "failed")
# The fields every record of an event must have (the writer refuses one without them; the
# docstring above lists the rest); readers such as tools/scaling_report.py rely on these.
REQUIRED = {"start": ("world_size", "local_batch", "model", "image_size", "precision"),
            "epoch": ("epoch", "seconds", "images_per_sec"),
            "end": ("status",)}
EVENTS = tuple(REQUIRED)


class RunLogError(ValueError):
    """A run log that is missing, empty or of another schema."""


class RunLogWriter:
    """Append-only writer; one JSON object per line, flushed and fsynced."""

    def __init__(self, run_dir: str | Path):
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        self.path = Path(run_dir) / FILENAME
        self._fh = open(self.path, "a", encoding="utf-8")

    def write(self, event: str, **fields: Any) -> dict:
        if event not in EVENTS:
            raise ValueError(f"unknown run-log event {event!r}")
        missing = [k for k in REQUIRED[event] if k not in fields]
        if missing or (event == "end" and fields["status"] not in END_STATUSES):
            raise ValueError(f"run-log {event} record without {missing or 'a known status'}")
        record = {"schema": SCHEMA, "event": event, "time": round(time.time(), 3), **fields}
        self._fh.write(json.dumps(record, default=str) + "\n")
        self._fh.flush()
        os.fsync(self._fh.fileno())
        return record

    def close(self) -> None:
        self._fh.close()


def read_runlog(path: str | Path) -> list[dict]:
    """All records of a run log (a file or its run directory); RunLogError when not one of ours.
    A torn last line (a job killed mid-write) is ignored."""
    path = Path(path)
    if path.is_dir():
        path = path / FILENAME
    if not path.is_file():
        raise RunLogError(f"{path}: no run log")
    lines = path.read_text(encoding="utf-8").splitlines()
    out = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise RunLogError(f"{path}:{i + 1}: not JSON") from None
        if not isinstance(record, dict) or record.get("schema") != SCHEMA:
            found = record.get("schema") if isinstance(record, dict) else type(record).__name__
            raise RunLogError(f"{path}:{i + 1}: schema {found!r}, expected {SCHEMA!r}")
        out.append(record)
    if not out:
        raise RunLogError(f"{path}: empty run log")
    return out


def status(path: str | Path) -> str:
    """How the newest attempt ended: completed, preempted or failed; `running` when the last
    record is not an `end` (still going, or killed before it could write one)."""
    last = read_runlog(path)[-1]
    return last["status"] if last["event"] == "end" else "running"


@dataclasses.dataclass
class StatusConfig:
    run_dir: str = cli.field(help="run directory (or its runlog.jsonl)")


def main(argv: list[str] | None = None) -> int:
    cfg = cli.parse_config(StatusConfig, "Print how a run's newest attempt ended: completed, "
                           "preempted, failed or running.", argv, positional=["run_dir"])
    try:
        print(status(cfg.run_dir))
    except RunLogError as err:
        where, _, what = str(err).partition(": ")
        raise cli.InputError(where, what) from None
    return 0


if __name__ == "__main__":
    cli.run(main)
