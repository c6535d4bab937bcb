"""Trainer checkpoints: RUN_DIR/checkpoints/<name>/ with `ckpt.*` (model + optimizer, incl. the
step counter) and meta.json (model, image size, classes, epochs completed, step, validation AUROC).
A checkpoint is written into a hidden temporary directory and renamed when complete, so any
directory under its final name is whole; a write that fails (a full disk) leaves no partial
copy and is one line. `best` is a symlink to a hidden copy (hard links where the file system
has them) of the best epoch by mean validation AUROC (or loss, when the validation split cannot
define one), swapped in one rename: a complete best exists at every instant.

One RunState per run, the same on every rank: counters (epoch, step), the validation result and
the bookkeeping it drives (best AUROC, epochs since, plateau scale), and the flags that end a run
(preempted, stopped early); meta.json carries what a resumed run needs of it."""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import re
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import tensorflow as tf

from chexnet_hvd import cli, data, models, records, stall
from chexnet_hvd.cli import InputError
from chexnet_hvd.engine import accumulation, passes_per_update

if TYPE_CHECKING:
    from chexnet_hvd.config import Derived, TrainConfig

META_SCHEMA = "chexnet_hvd.checkpoint/1"
# meta.json, written by `save` through `meta_record` and read back by `read_meta`: the model to
# rebuild, and the counters a resumed run continues from (RunState).
# parts: what the attempts so far trained of epoch `epoch` (world size, batch, steps, batches
# done each; empty at an epoch's end); shapes: the (world size, batch) each epoch started with.
# best: the best value of best_by (chexnet_hvd.callbacks.CRITERIA) so far.
# scaling, crop: how the model's input is made from a stored image (chexnet_hvd.views.View).
# train_signature: the training split's (chexnet_hvd.records.split_signature), so that a
# mid-epoch resume refuses records other than those its parts index into.
# warmup: [start as a fraction of the peak lr, epochs], chosen by the run's first attempt.
# record_order: the version of the order epochs are read in (chexnet_hvd.data.RECORD_ORDER).
META_FIELDS = ("model", "image_size", "scaling", "crop", "classes", "num_classes", "epoch", "step", "parts", "shapes",
               "steps_per_epoch", "global_batch", "precision", "val_mean_auroc", "val_loss",
               "best_by", "best", "since_best", "plateau", "warmup", "train_signature", "record_order",
               "config")


@dataclasses.dataclass
class RunState:
    """What the callbacks share, the same on every rank, and what a checkpoint carries on to
    the next attempt (`run_meta`)."""

    plateau: dict  # reduce-on-plateau: scale, best, wait
    epoch: int = 0  # epochs completed, so also the index of the epoch in progress
    step: int = 0  # optimizer steps taken (counted in Python: reading the optimizer would sync)
    best_by: str = "val_mean_auroc"  # what ranks epochs: a key of callbacks.CRITERIA
    best: float | None = None  # its best value so far
    since_best: int = 0  # epochs (with a defined value) since it improved (--early-stopping)
    improved: bool = False  # the epoch just validated set a new best
    validation: dict = dataclasses.field(default_factory=dict)  # the last epoch's result
    timing: dict = dataclasses.field(default_factory=dict)  # the last epoch's seconds, img/s
    resumed_from: str | None = None
    preempted: bool = False
    stopped_early: bool = False
    # Where in the data the run is, whatever shape each attempt had (chexnet_hvd.sharding):
    shape: tuple[int, int] = (1, 1)  # this attempt's (world size, per-rank batch)
    shapes: list = dataclasses.field(default_factory=list)  # the shape each epoch started with
    parts: list = dataclasses.field(default_factory=list)  # earlier attempts' parts of this epoch
    part_steps: int = 0  # steps this attempt trains of epoch `epoch`
    batch: int = 0  # of which done
    executed: int = 0  # steps the last call of Keras' train function took (--steps-per-execution)
    lr: float = 0.0  # the learning rate at the end of the last epoch
    diagnosis: dict = dataclasses.field(default_factory=dict)  # the last epoch's bottleneck verdict
    # The lr warmup's (start / peak, epochs), as the run's first attempt derived them from its
    # world size and global batch: a resume on another shape keeps them, so that its lr is the
    # straight run's times the global-batch ratio (None until resume_state sets it)
    warmup: tuple[float, float] | None = None

    def epoch_parts(self) -> list:
        """The parts of epoch `epoch` trained so far, this attempt's included (sharding.Part)."""
        return self.parts + ([(*self.shape, self.part_steps, self.batch)] if self.batch else [])


def meta_record(**fields) -> dict:
    """A checkpoint's meta.json content: exactly META_FIELDS, after the schema tag."""
    if set(fields) != set(META_FIELDS):
        raise ValueError(f"checkpoint meta fields {sorted(set(fields) ^ set(META_FIELDS))} do not "
                         f"match the schema {META_SCHEMA}")
    return {"schema": META_SCHEMA, **fields}


def run_meta(cfg: TrainConfig, manifest: dict, derived: Derived, state: RunState,
             epochs_done: int) -> dict:
    """What a trainer's checkpoint records: enough to rebuild the model and resume the run
    exactly (step, epoch and what of it was trained at which shape, the plateau and early-stopping
    counts)."""
    return meta_record(
        model=cfg.model, image_size=cfg.image_size, scaling=models.input_scaling(cfg.model),
        crop=cfg.crop, classes=manifest["classes"],
        num_classes=manifest["num_classes"], epoch=epochs_done, step=state.step,
        parts=state.epoch_parts() if epochs_done == state.epoch else [], shapes=state.shapes,
        steps_per_epoch=derived.steps_per_epoch, global_batch=derived.global_batch,
        precision=cfg.precision, val_mean_auroc=state.validation.get("mean_auroc"),
        val_loss=state.validation.get("loss"), best_by=state.best_by, best=state.best,
        since_best=state.since_best, plateau=state.plateau, warmup=list(state.warmup),
        train_signature=records.split_signature(manifest, "train"), record_order=data.RECORD_ORDER,
        config=dataclasses.asdict(cfg))


class Saver:
    """The trainer's checkpoint writer, `saver(name, epochs_done)`, called on every rank at the
    same points: first `share` (every rank: what the ranks hold apart, made one, e.g. Horovod's
    accumulation); then the chief writes RUN_DIR/checkpoints/<name> and prunes old ones; with
    an engine whose variable reads are collectives (`writes` there too), the other ranks write
    alongside into a scratch directory they then delete. Returns the checkpoint's path on the
    chief, else None."""

    def __init__(self, model, optimizer, ckpt_dir: Path, keep: int, chief: bool, writes: bool,
                 meta: Callable[[int], dict], beat: Callable[..., None] = lambda **_: None,
                 share: Callable[[], None] = lambda: None):
        self.model, self.optimizer, self.ckpt_dir, self.keep = model, optimizer, ckpt_dir, keep
        self.chief, self.writes, self.meta = chief, writes, meta
        self.beat, self.share = beat, share  # beat: the stall watchdog's progress

    def __call__(self, name: str, epochs_done: int) -> Path | None:
        self.beat(phase=stall.CHECKPOINTING)
        self.share()
        path = None
        if self.writes and not self.chief:  # a copy thrown away: the chief's is the run's
            with tempfile.TemporaryDirectory(prefix="chexnet-checkpoint-") as scratch:
                try:
                    save(self.model, Path(scratch), name, self.meta(epochs_done), self.optimizer, durable=False)
                except InputError as err:  # its path is gone already: say where it was, and what
                    raise InputError(f"{socket.gethostname()}:{scratch}", f"this worker's own copy of "
                                     f"checkpoint {name}, thrown away once written (the tf engine's "
                                     f"workers each write one, under $TMPDIR): {err.what}") from None
        elif self.writes:
            path = save(self.model, self.ckpt_dir, name, self.meta(epochs_done), self.optimizer)
            prune(self.ckpt_dir, self.keep)
        self.beat(phase=stall.BETWEEN)
        return path


def optimizer_variables(optimizer) -> list:
    """Every variable of the optimizer's checkpoint, in a fixed order: its step and slots, and
    under mixed_float16 the loss scale and its count of good steps (which `optimizer.variables`
    leaves out: broadcasting only those left the other ranks on a fresh loss scale at resume);
    then Horovod's gradient accumulation (`engine.accumulation`)."""
    found = {id(t): t for t in tf.train.TrackableView(optimizer).descendants() if isinstance(t, tf.Variable)}
    return list(found.values()) + accumulation(optimizer)


def writing(partial: Path, final: Path):
    """A checkpoint's write into `partial` that fails (a full disk) is one line naming `final`
    and leaves no partial copy (the checkpoints already there are untouched)."""
    return cli.writing(partial, final, "this checkpoint", records.write_errors())


def save(model: tf.keras.Model, ckpt_dir: Path, name: str, meta: dict, optimizer=None, durable: bool = True) -> Path:
    """`model` (and `optimizer`, default the model's own) as ckpt_dir/name, renamed into place
    when complete and, `durable`, on disk (a node that crashes after the rename must not leave a
    complete name over files still in its page cache; a copy thrown away needs no such care)."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    final = ckpt_dir / name
    tmp = ckpt_dir / f".{name}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    optimizer = optimizer or model.optimizer
    summed = accumulation(optimizer)  # only an update in progress needs its sums
    extra = {"accumulation": summed} if summed and int(summed[0]) else {}
    with writing(tmp, final):
        tf.train.Checkpoint(model=model, optimizer=optimizer, **extra).write(str(tmp / "ckpt"))
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        for file in (*tmp.iterdir(), tmp) if durable else ():
            fsync(file)
    _replace_dir(tmp, final)
    if durable:
        fsync(ckpt_dir)  # the rename itself
    return final


# What fsync of a directory gives on file systems that do not sync directories (CIFS: EINVAL):
# their renames are as durable as they make them, and the checkpoint is still whole.
UNSYNCED_DIRECTORY = {errno.EINVAL, errno.ENOTSUP, errno.EBADF, errno.EISDIR}


def fsync(path: Path) -> None:
    """Flush a file's (or a directory's entries') writes to the disk; a directory's where the
    file system can (UNSYNCED_DIRECTORY)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as err:
        if not (path.is_dir() and err.errno in UNSYNCED_DIRECTORY):
            raise OSError(err.errno, err.strerror, str(path)) from None
    finally:
        os.close(fd)


def set_aside(path: Path) -> Path:
    """Rename a checkpoint that cannot be read out of every search and pruning (a hidden name
    that clear_leftovers leaves alone): kept for the user to look at, never deleted."""
    aside = path.with_name(f".{path.name}.unreadable-{time.time_ns()}")
    os.replace(path, aside)
    return aside


def _replace_dir(tmp: Path, final: Path) -> None:
    """Rename tmp to final; an older final is moved aside first (rename cannot replace a dir)."""
    old = final.with_name(f".{final.name}.old{os.getpid()}")
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


LEFTOVER = re.compile(r"\.(.+)\.(tmp|old)\d+")  # `save`'s hidden names, a process id last


def clear_leftovers(ckpt_dir: Path) -> list[str]:
    """What a kill in the middle of `save` left: a partial copy (`.NAME.tmpPID`, up to a
    checkpoint's size, never written over: each attempt has another process id) is deleted; a
    complete checkpoint moved aside for its replacement (`.NAME.oldPID`) goes back under its
    name if the replacement never arrived, else is deleted; so is, where `best` names a complete
    copy, every other copy of `set_best`'s (a kill before its link was swapped in, or before the
    old one's deletion). The chief calls it before it resumes, when no save is in progress.
    Returns what it did, a line each."""
    done = []
    for path in sorted(ckpt_dir.glob(".*")):
        found = LEFTOVER.fullmatch(path.name)
        if not found:
            continue
        final = ckpt_dir / found[1]
        if found[2] == "old" and not final.exists() and read_meta(path) is not None:
            os.replace(path, final)
            done.append(f"{path.name}: back as {final.name} (a kill came before its replacement arrived)")
        else:
            if path.is_symlink():  # set_best's new link
                path.unlink()
            else:
                shutil.rmtree(path, ignore_errors=True)
            done.append(f"{path.name}: deleted (left by a kill in the middle of a checkpoint's write)")
    best = ckpt_dir / "best"
    named = os.readlink(best) if best.is_symlink() and read_meta(best) is not None else None
    for path in ckpt_dir.glob(".best-*") if named else ():  # (else one may be the only whole copy)
        if path.is_dir() and not path.is_symlink() and path.name != named:
            shutil.rmtree(path, ignore_errors=True)
            done.append(f"{path.name}: deleted (a copy best/ does not name, left by a kill as best/ was set)")
    return done


def classes_differ(trained: list[str], held: list[str]) -> str | None:
    """How the classes a checkpoint was trained on and those records hold differ: their counts
    and the first output whose class is another (None: the same, in the same order)."""
    if list(trained) == list(held):
        return None
    i = next((i for i, (a, b) in enumerate(zip(trained, held, strict=False)) if a != b), min(len(trained), len(held)))
    ours, theirs = ((names[i] if i < len(names) else "none") for names in (trained, held))
    return (f"the checkpoint predicts {len(trained)} classes, the records hold {len(held)}; "
            f"output {i}: {ours} in the checkpoint, {theirs} in the records")


def read_meta(path: Path) -> dict | None:
    """A checkpoint's meta.json; None when it has none or a torn one (not a checkpoint). One of
    another schema version is an error (written before the schema tag: read as this one)."""
    try:
        meta = json.loads((path / "meta.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if not isinstance(meta, dict):
        return None
    if meta.get("schema", META_SCHEMA) != META_SCHEMA:
        raise InputError(path / "meta.json", f"checkpoint schema {meta['schema']!r}, this suite "
                         f"reads {META_SCHEMA!r}")
    return meta


def complete(ckpt_dir: Path) -> list[Path]:
    """The complete checkpoints, newest first: by step, an epoch checkpoint first in a tie."""
    found = [(m["step"], p.name.startswith("epoch-"), p) for p in ckpt_dir.glob("[es][pt]*-*")
             if not p.name.startswith(".") and (m := read_meta(p)) is not None]
    return [p for *_, p in sorted(found, reverse=True)]


def newest(ckpt_dir: Path) -> Path | None:
    """The complete checkpoint with the highest step (an epoch checkpoint wins a tie)."""
    return next(iter(complete(ckpt_dir)), None)


def prune(ckpt_dir: Path, keep: int) -> None:
    """Keep the newest `keep` (>= 1) epoch checkpoints and the newest step checkpoint, newest by
    number (epoch-10000 is newer than epoch-9999)."""
    if keep < 1:  # [:-0] would keep everything, and a negative count delete the newest
        raise ValueError(f"keep must be at least 1, not {keep}")
    for prefix, n in (("epoch-", keep), ("step-", 1)):
        numbered = sorted((int(p.name[len(prefix):]), p) for p in ckpt_dir.glob(f"{prefix}*")
                          if p.name[len(prefix):].isdigit())
        for _, old in numbered[:-n]:
            shutil.rmtree(old, ignore_errors=True)


def link_or_copy(source: Path, target: Path) -> None:
    """A hard link where the file system has them (no bytes copied: a checkpoint's files are
    never changed once written, only renamed and deleted), else a copy."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def set_best(source: Path) -> Path:
    """Make `best` (in the same folder) a complete copy of `source`: link or copy into a hidden
    directory, point a new symlink at it, rename that over `best` (atomic), then drop older
    copies. A crash at any point leaves the previous best or the new one, never none."""
    ckpt_dir = source.parent
    copy = ckpt_dir / f".best-{source.name}-{time.time_ns()}"
    with writing(copy, ckpt_dir / "best"):
        copy.mkdir()
        for file in source.iterdir():  # a checkpoint is flat: ckpt.* and meta.json (`save`)
            link_or_copy(file, copy / file.name)
        link = ckpt_dir / f".best-link.tmp{os.getpid()}"
        link.unlink(missing_ok=True)
        os.symlink(copy.name, link)
    best = ckpt_dir / "best"
    if best.is_dir() and not best.is_symlink():  # a best/ written by an older version
        os.replace(best, ckpt_dir / f".best-legacy-{time.time_ns()}")
    os.replace(link, best)
    for old in ckpt_dir.glob(".best-*"):
        if old.name != copy.name and not old.name.startswith(".best-link"):
            shutil.rmtree(old, ignore_errors=True)
    return best


def repair_best(ckpt_dir: Path) -> str | None:
    """`best` as the epoch checkpoints say it should be: a kill (or an error, e.g. a full disk)
    between an epoch's checkpoint, whose meta holds its score as the best, and `set_best` left
    `best` on an older epoch (or none), and the resumed run, counting from that score, would
    never replace it. The line saying what it did, or None."""
    epochs = [(p, meta) for p in complete(ckpt_dir) if p.name.startswith("epoch-") and (meta := read_meta(p))]
    if not epochs or epochs[0][1].get("best") is None:
        return None
    by, score = epochs[0][1].get("best_by", "val_mean_auroc"), epochs[0][1]["best"]
    held = read_meta(ckpt_dir / "best")
    if held is not None and held.get(by) == score:
        return None
    source = next((p for p, meta in reversed(epochs) if meta.get(by) == score), None)  # the first to score it
    if source is None:  # pruned since: nothing to set it from
        return None
    set_best(source)
    was = f"epoch {held['epoch']}" if held is not None else "none"
    return (f"best: now {source.name}, the best epoch ({by} {score:.4g}; it was {was}: a kill came "
            "before it was set)")


class Unreadable(InputError):
    """A checkpoint whose files cannot be read (cut short or corrupt: a crash or a full disk
    outside `save`'s care, a copy that failed), where one that does not fit the model is an
    InputError of its own."""


def restore(model: tf.keras.Model, path: Path, optimizer=None) -> None:
    """Weights (and with `optimizer`, its state and step counter) from a checkpoint."""
    with_optimizer = optimizer is not None
    objects = {"model": model} | ({"optimizer": optimizer} if with_optimizer else {})
    try:
        status = tf.train.Checkpoint(**objects).read(str(path / "ckpt"))
        status.assert_existing_objects_matched()  # every variable of ours came from the file
    except (IndexError, tf.errors.DataLossError, tf.errors.NotFoundError) as err:  # IndexError: cut short
        raise Unreadable(path, f"cannot be read: a file torn or corrupt ({type(err).__name__}: "
                         f"{str(err).splitlines()[0][:120]})") from None
    except (AssertionError, ValueError, tf.errors.OpError) as err:
        raise InputError(path, f"its weights do not fit a {model.name} model "
                         f"({str(err).splitlines()[0][:120]})") from None
    status.expect_partial()  # the optimizer's slots (without it) or Horovod's accumulation
    if with_optimizer:
        restore_accumulation(optimizer, path)


def restore_accumulation(optimizer, path: Path) -> None:
    """Horovod's accumulation (`accumulation`) from a checkpoint written in the middle of an
    update, into this run's. Where this run's updates take no more passes than the checkpoint
    has summed (--backward-passes-per-step made smaller on resume), the update could never
    complete: its passes are left out, and said so."""
    reader = tf.train.load_checkpoint(str(path / "ckpt"))
    key = "accumulation/0/.ATTRIBUTES/VARIABLE_VALUE"  # the count of passes, where `save` wrote one
    passes = int(reader.get_tensor(key)) if reader.has_tensor(key) else 0
    summed, per_update = accumulation(optimizer), passes_per_update(optimizer)
    if passes and passes < per_update:
        tf.train.Checkpoint(accumulation=summed).read(str(path / "ckpt")).expect_partial()
    elif passes:
        print(f"warning: {path}: {passes} backward pass(es) of an update in progress left out "
              f"(this run updates every {per_update})", file=sys.stderr, flush=True)


def missing(path: Path) -> str:
    """Why a checkpoint asked for is not there, and which are."""
    if path.is_symlink():  # `best` copied as what it is, a link, without the folder it names
        return (f"a link to {os.readlink(path)}, which is not beside it: copied without its target? "
                "(`best` is a link: copy it with cp -rL or rsync -L, which copy the checkpoint it names)")
    there = sorted(p.name for p in path.parent.glob("[es][pt]*-*") if read_meta(p)) if path.parent.is_dir() else []
    why = (" (a run writes best/ once an epoch has been validated; this one was stopped before, "
           "or its validation could not score: its run log says)") if path.name == "best" else ""
    return (f"no such checkpoint{why}; "
            + (f"checkpoints there: {', '.join(there)}" if there else f"no checkpoints in {path.parent}"))


def load(ckpt_dir: str | Path) -> tuple[tf.keras.Model, dict]:
    """Rebuild the model a checkpoint's meta.json describes and restore its weights (inference)."""
    path = Path(ckpt_dir)
    if not path.exists():
        raise InputError(path, missing(path))
    meta = read_meta(path)
    if meta is None:
        raise InputError(path, "not a checkpoint directory (no readable meta.json)")
    model = models.build_model(meta["model"], meta["image_size"], meta["num_classes"])
    restore(model, Path(ckpt_dir))
    return model, meta
