"""Where a resumed run goes on: the run state a checkpoint's meta.json describes, checked
against this attempt's flags and records (what a resume cannot change is refused with one
line; what it changes of how the run trains is said), and every rank on the chief's weights
and optimizer state before the first step. chexnet_hvd.train calls `resume_state`."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from chexnet_hvd import checkpoints, cli, config, data, models, schedules, sharding, views
from chexnet_hvd.checkpoints import RunState
from chexnet_hvd.config import Derived, TrainConfig
from chexnet_hvd.engine import make_accumulation
from chexnet_hvd.records import split_signature


def resume_state(cfg: TrainConfig, engine, model, optimizer, run_dir: Path, derived: Derived,
                 records: data.Records, best_by: str) -> RunState:
    """The run state, and every rank on the chief's weights and optimizer state before the
    first step: with --resume restored from the newest complete checkpoint, else the chief's
    fresh initial weights. A checkpoint in mid-epoch carries what its epoch's attempts trained,
    at which shapes; this attempt trains its share of the rest, at its own shape."""
    shape = (derived.world_size, derived.local_batch)
    state = RunState(plateau=dict(schedules.PLATEAU_START), best_by=best_by, shape=shape, shapes=[(0, *shape)])
    error = None
    optimizer.build(model.trainable_variables)  # create the slots so they can be restored
    make_accumulation(optimizer, model.trainable_variables)  # and Horovod's gradient sums, if any
    # Only the chief reads the checkpoint; the broadcasts below share it (and any error in it,
    # so that every rank fails alike instead of waiting for the chief)
    if engine.rank == 0:
        try:
            state = chief_state(cfg, model, optimizer, run_dir / "checkpoints", records.manifest, state)
        except OSError as err:  # a checkpoint folder it cannot read or tidy
            error = cli.InputError(run_dir / "checkpoints", f"cannot resume: {err.strerror or err}")
        except cli.InputError as err:
            error = err
    state, error = engine.broadcast_object((state, error))  # counters from the chief
    if error:
        raise error
    state.part_steps = first_part_steps(cfg, records, state, derived)
    state.warmup = state.warmup or (derived.warmup_from, derived.warmup_epochs)  # a fresh run's own
    schedules.live_schedule(optimizer).scale.assign(state.plateau["scale"])
    schedules.live_schedule(optimizer).set_warmup(*state.warmup)
    engine.broadcast_variables(model.variables + checkpoints.optimizer_variables(optimizer))
    return state


NEW_RUN = "start a new run in another --run-dir"  # where a resume cannot go on


def chief_state(cfg: TrainConfig, model, optimizer, ckpt_dir: Path, manifest: dict, fresh: RunState) -> RunState:
    """The chief's part of `resume_state`: with --resume, the newest complete checkpoint restored
    into `model` and `optimizer` and the state its meta.json describes (`fresh` where there is
    none); without, `fresh`, unless the run directory holds a checkpoint a new run would write
    over."""
    if not cfg.resume:
        if found := checkpoints.newest(ckpt_dir):
            raise cli.InputError("--run-dir", f"{ckpt_dir.parent} holds a run (its checkpoint {found.name}), "
                                 f"which a new run would write over: --resume to go on with it, or {NEW_RUN}")
        return fresh
    for line in checkpoints.clear_leftovers(ckpt_dir):
        print(f"resume: {line}", file=sys.stderr, flush=True)
    found = restore_newest_readable(cfg, model, optimizer, ckpt_dir, manifest["classes"])
    if line := checkpoints.repair_best(ckpt_dir):  # from the readable checkpoints only
        print(f"resume: {line}", file=sys.stderr, flush=True)
    if found is None:
        return fresh
    meta = checkpoints.read_meta(found)
    state = restored_state(cfg, found, meta, fresh.shape, manifest)
    then_split = meta["config"].get("val_split", cfg.val_split)
    if (state.best_by, then_split) != (fresh.best_by, cfg.val_split):
        print(f"resume: {found}'s best checkpoint and patience went by {state.best_by} on {then_split!r}, "
              f"this attempt's by {fresh.best_by} on {cfg.val_split!r}: not comparable, so counted afresh "
              "from here", file=sys.stderr, flush=True)
        state = afresh(state, fresh.best_by)
    if changed := changed_flags(cfg, meta["config"]):
        print(f"resume: this attempt changes how {found}'s run trained ({', '.join(changed)}): "
              f"from here training follows this attempt's flags", file=sys.stderr, flush=True)
    return state


def check_same_kind(cfg: TrainConfig, found: Path, meta: dict) -> None:
    """A resume restores what the checkpoint holds into this attempt's model and optimizer:
    another --model has other weights, and the optimizer state has the shape of its kind
    (--optimizer: Adam's two moments, SGD's momentum) and of a loss scale around it or not
    (--precision mixed_float16): another kind has no place for it (fp32 and mixed_bfloat16
    share one)."""
    states, scaled = "the two optimizers' states do not match", "mixed_float16"
    for flag, then, same, why in (
            ("model", meta["model"], meta["model"] == cfg.model, "its weights are another model's"),
            ("optimizer", meta["config"]["optimizer"], meta["config"]["optimizer"] == cfg.optimizer, states),
            ("precision", meta["precision"], (meta["precision"] == scaled) == (cfg.precision == scaled), states)):
        if not same:
            raise cli.InputError(f"--{flag}", f"{getattr(cfg, flag)}, but {found} was trained with {then}: "
                                 f"{why}; resume with --{flag} {then}, or {NEW_RUN}")


def check_same_classes(cfg: TrainConfig, found: Path, meta: dict, classes: list[str]) -> None:
    """A resume goes on training each output on the class it was trained on: records whose
    classes differ, in name or order, would silently give an output another meaning (the same
    count restores without error)."""
    if differ := checkpoints.classes_differ(meta["classes"], classes):
        raise cli.InputError(cfg.data, f"not the classes of {found} ({differ}): a resume cannot change what "
                             f"an output means; {NEW_RUN}")


def restore_newest_readable(cfg: TrainConfig, model, optimizer, ckpt_dir: Path, classes: list[str]) -> Path | None:
    """Restore the newest complete checkpoint whose files can be read, and return it (None:
    there is none). One whose files are torn (a node that crashed before they reached its
    disk, a copy cut short) is passed over for the next newest and set aside under a hidden
    name (kept, but no longer newest: the run's later step checkpoints would be pruned as older
    than it), and said so."""
    found = checkpoints.complete(ckpt_dir)
    for path, older in zip(found, [*found[1:], None], strict=False):  # each with the next newest
        meta = checkpoints.read_meta(path)
        check_same_kind(cfg, path, meta)
        check_same_classes(cfg, path, meta, classes)
        try:
            restore_at_size(cfg, model, optimizer, path, meta)
            return path
        except checkpoints.Unreadable as err:
            if older is None:
                raise
            aside = checkpoints.set_aside(path)
            print(f"warning: resume: {err.where}: {err.what}; going on from the next newest, {older.name} "
                  f"(this one kept as {aside.name})", file=sys.stderr, flush=True)
    return None


def restore_at_size(cfg: TrainConfig, model, optimizer, found: Path, meta: dict) -> None:
    """Restore the checkpoint into this attempt's model. A fully convolutional model takes its
    weights at another --image-size (a progressive resize; `changed_flags` says it); where they
    do not fit, the error names the size they were trained at."""
    try:
        checkpoints.restore(model, found, optimizer)
    except checkpoints.Unreadable:
        raise
    except cli.InputError:
        if (then := meta["image_size"]) == cfg.image_size:
            raise
        raise cli.InputError("--image-size", f"{cfg.image_size}, but {found} was trained at {then} px and "
                             f"its weights do not fit {cfg.image_size} px: resume with --image-size {then}, "
                             f"or {NEW_RUN}") from None


# Flags a resume may change that change what is learned from there on; a key to a schedule: read
# by that schedule only. World size and batch are not among them: the lr's rescaling to them is
# the point of a resume onto another allocation.
CHANGES_TRAINING = {"image_size": None, "crop": None, "augment": None, "class_weights": None, "val_split": None,
                    "precision": None, "schedule": None, "lr": None, "reference_batch": None,
                    "warmup_epochs": None, "epochs": "cosine", "step_epochs": "step",
                    "plateau_patience": "plateau", "plateau_factor": "plateau"}


def changed_flags(cfg: TrainConfig, then: dict) -> list[str]:
    """The flags of CHANGES_TRAINING that a resume changes (`then`: the checkpoint's config), as
    `--epochs 10 -> 20` (a finished cosine run extended: its lr rises again) or `--image-size
    224 -> 320` (its checkpoints, evaluate and predict then use 320 px)."""
    return [f"{' '.join(cli.field_argv(key, then[key]))} -> {cli.field_argv(key, getattr(cfg, key))[-1]}"
            for key, schedule in CHANGES_TRAINING.items()
            if then.get(key, getattr(cfg, key)) != getattr(cfg, key)
            and schedule in (None, cfg.schedule, then.get("schedule"))]


def restored_state(cfg: TrainConfig, found: Path, meta: dict, shape: tuple[int, int], manifest: dict) -> RunState:
    """The run state a checkpoint's meta.json describes, for an attempt at `shape` on the
    records of `manifest`."""
    parts = [tuple(p) for p in meta.get("parts") or []]
    trained_on = views.View.of(meta).scaling  # weights trained on one input scaling stay on it
    if trained_on != models.input_scaling(cfg.model):
        raise cli.InputError(found, f"its {cfg.model} was trained on {trained_on} input scaling, this "
                             f"version feeds {cfg.model} {models.input_scaling(cfg.model)}: start a new run")
    if parts:  # the rest of the epoch is planned from the order its first attempt read it in
        order = meta.get("record_order", 1)  # written before it was kept: the first order
        if order != data.RECORD_ORDER:
            raise cli.InputError(found, f"stopped in mid-epoch reading its records in order {order}, which "
                                 f"this version no longer reads (it reads order {data.RECORD_ORDER}), so the "
                                 "rest of that epoch cannot be found: finish the epoch with the version "
                                 "that wrote it, or resume from an epoch checkpoint (remove the step-* checkpoint)")
        for flag in ("seed", "shuffle_buffer"):
            if meta["config"].get(flag) != getattr(cfg, flag):
                raise cli.InputError(f"--{flag.replace('_', '-')}", f"{getattr(cfg, flag)}, but {found} "
                                     f"stopped in mid-epoch with {meta['config'].get(flag)}: resume "
                                     "with that, or from an epoch checkpoint")
        then, now = meta.get("train_signature"), split_signature(manifest, "train")  # None: written before it was kept
        if then and then != now:  # its parts index into the records it read
            raise cli.InputError("--data", f"{cfg.data}: other training records than {found} stopped in "
                                 f"mid-epoch on (shard files, counts, sizes or rows differ: then {then['shards']} "
                                 f"shards of {then['records']} records, digest {then['digest']}; now "
                                 f"{now['shards']} of {now['records']}, {now['digest']}): resume with those "
                                 "records, or from an epoch checkpoint (remove the step-* checkpoint)")
    shapes = meta.get("shapes") or [(0, *shape)]  # written before shapes were kept: this one
    return RunState(plateau=meta["plateau"], epoch=meta["epoch"], step=meta["step"],
                    best_by=meta.get("best_by", "val_mean_auroc"),
                    best=meta.get("best", meta.get("best_val_mean_auroc")), since_best=meta.get("since_best", 0),
                    resumed_from=str(found), shape=shape, parts=parts,
                    warmup=run_warmup(cfg, meta),
                    shapes=sharding.with_shape(shapes, meta["epoch"] + bool(parts), shape))


def afresh(state: RunState, best_by: str) -> RunState:
    """`state` with its best value and patience (early stopping's and the plateau's) counted
    anew by `best_by`; the plateau's lr cuts so far are kept."""
    return dataclasses.replace(state, best_by=best_by, best=None, since_best=0,
                               plateau={**state.plateau, "best": None, "wait": 0})


def run_warmup(cfg: TrainConfig, meta: dict) -> tuple[float, float] | None:
    """The lr warmup (start / peak, epochs) a resumed run keeps: its first attempt's, from a
    checkpoint that recorded it or, written before it was, derived from the first attempt's shape
    (with the flags of the attempt that wrote the checkpoint). None (this attempt's own) when
    --warmup-epochs changed."""
    then = meta["config"]
    if cfg.warmup_epochs != then.get("warmup_epochs", cfg.warmup_epochs):
        return None
    if meta.get("warmup"):
        return tuple(meta["warmup"])
    _, world, batch = (meta.get("shapes") or [(0, meta["global_batch"] // then["batch_size"], then["batch_size"])])[0]
    return 1 / world, config.warmup_epochs(then["warmup_epochs"], then["reference_batch"], world * batch)


def first_part_steps(cfg: TrainConfig, records: data.Records, state: RunState, derived: Derived) -> int:
    """Steps of the first epoch this attempt trains: a whole epoch's, or its share of the rest
    of an epoch earlier attempts began (0 when less than one global batch is left)."""
    if not state.parts:
        return derived.steps_per_epoch
    counts = [count for _, count in records.units("train")]
    (_, layout), = sharding.epoch_layouts(counts, state.shapes, cfg.seed, range(state.epoch, state.epoch + 1))
    return sharding.part_steps(layout, state.parts[0][2], state.parts, state.shape)
