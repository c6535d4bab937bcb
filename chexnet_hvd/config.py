"""The trainer's configuration: the TrainConfig dataclass its CLI is made from, the recipes'
defaults under the flags, the checks of flag combinations, and the values derived from the
config and the world size (`Derived`), computed once and logged at start.

No TensorFlow here: the NAS worker, the GPU check, the benchmarks and the tests build trainer
command lines from this module without loading it.
"""

from __future__ import annotations

import dataclasses
import operator
import re
import sys

from chexnet_hvd import cli, distributed, recipes, sharding

PRECISIONS = ["fp32", "mixed_float16", "mixed_bfloat16"]


@dataclasses.dataclass
class TrainConfig:
    data: str = cli.field(help="records directory (has manifest.json)")
    run_dir: str = cli.field(help="where config.json, runlog.jsonl and checkpoints/ go")
    recipe: str = cli.field("none", help="named settings that the other flags override: "
                            "--recipe list, --recipe show NAME (chexnet_hvd/recipes.py)")
    model: str = cli.field("densenet121", help="densenet121 | resnet50 | resnet59 | small_cnn | "
                       "nas-<8 digits> (an architecture of chexnet_hvd.nas.space)")
    image_size: int = cli.field(224, help="model input side in pixels", minimum=1)
    batch_size: int = cli.field(16, help="images per rank per step (global batch = this x ranks)",
                                minimum=1)
    epochs: int = cli.field(3, help="epochs to train (in total, counting resumed ones)", minimum=1)
    steps_per_epoch: int = cli.field(0, help="0: every full global batch of the training split "
                                     "(fewer than one global batch is left out, another each epoch)",
                                     minimum=0)
    optimizer: str = cli.field("adam", help="Adam (CheXNet) or SGD with Nesterov momentum 0.9",
                               choices=["adam", "sgd"])
    lr: float = cli.field(1e-3, help="base learning rate at --reference-batch (CheXNet: Adam 1e-3 at 16)",
                          minimum=0)  # 0: weights that stay put (tests)
    reference_batch: int = cli.field(16, help="lr = lr x global_batch / reference_batch (Goyal "
                                     "et al. 2017); 0: lr as given, not scaled (and, with "
                                     "--warmup-epochs -1, no warmup)", minimum=0)
    warmup_epochs: float = cli.field(-1.0, help="linear warmup from lr/world_size to the scaled lr; "
                                     "-1: proportional to the global batch, global_batch / "
                                     "reference_batch / 8 epochs, at most 5 (SURFsara's recipe); a "
                                     "resumed run keeps its first attempt's warmup unless this changes",
                                     minimum=-1)
    schedule: str = cli.field("constant", help="lr after warmup: constant, cosine to zero, step "
                              "(x0.1 every --step-epochs), or plateau (x --plateau-factor after "
                              "--plateau-patience epochs without a better validation score: mean AUROC, or the loss "
                              "where no class's AUROC is defined)",
                              choices=["constant", "cosine", "step", "plateau"])
    step_epochs: int = cli.field(10, help="epochs between x0.1 decays of --schedule step",
                                 minimum=1)
    plateau_patience: int = cli.field(1, help="--schedule plateau: epochs without improvement "
                                      "before the lr drops (CheXNet: 1)", minimum=1)
    plateau_factor: float = cli.field(0.1, help="--schedule plateau: lr multiplier per drop",
                                      exclusive_minimum=0, exclusive_maximum=1)
    class_weights: str = cli.field("none", help="manifest: weighted BCE with the manifest's "
                                   "per-class positive weights (CheXNet)", choices=["none", "manifest"])
    precision: str = cli.field("fp32", help="Keras mixed-precision policy; mixed_float16 adds "
                               "dynamic loss scaling", choices=PRECISIONS)
    xla: bool = cli.field(False, help="XLA auto-clustering (the engine's collectives stay outside XLA)")
    engine: str = distributed.engine_field(
        "what carries the gradients between ranks: Horovod (horovodrun, mpirun, srun --mpi=pmix) "
        "or TensorFlow's MultiWorkerMirroredStrategy (chexnet_hvd.launch, srun, TF_CONFIG)")
    workers: str = cli.field("", help="--engine tf with no launcher: every worker as host:port in "
                             "rank order, the same list on each (in place of TF_CONFIG)")
    worker_index: int = cli.field(0, help="with --workers: this process' place in that list, from 0",
                                  minimum=0)
    fp16_allreduce: bool = cli.field(False, help="compress gradients to fp16 for the allreduce "
                                     "(Horovod only)")
    backward_passes_per_step: int = cli.field(1, help="accumulate gradients of N batches per "
                                              "allreduce (large inputs, small batches; Horovod only)",
                                              minimum=1)
    weights: str = cli.field("none", help="none, imagenet (from the cache `python -m "
                             "chexnet_hvd.weights fetch` fills; nothing is downloaded here), or "
                             "a weights file")
    seed: int = cli.field(0, help="seed of weights, shuffles and augmentation", minimum=0)
    augment: bool = cli.field(True, help="random horizontal flips")
    crop: bool = cli.field(False, help="CheXNet's geometry: train on random S-px windows of the "
                           "image at S x 256/224 (records written with --image-size S x 256/224 "
                           "or more), validate, evaluate and predict on the centre one; ten-crop "
                           "takes its windows at the same scale. Recorded in the checkpoints")
    synthetic_input: bool = cli.field(False, help="train on one random in-memory batch, repeated "
                                      "(benchmarks: the trainer without its input pipeline)")
    shuffle_buffer: int = cli.field(2048, help="record shuffle buffer per rank", minimum=1)
    deterministic: bool = cli.field(False, help="deterministic ops (TensorFlow op determinism: slower on GPUs); the input order is deterministic always")
    val_split: str = cli.field("val", help="split validated after every epoch")
    val_batch_size: int = cli.field(64, help="images per rank per validation step", minimum=1)
    early_stopping: int = cli.field(0, help="stop after N epochs without a better validation score "
                                    "(as --schedule plateau's) (0: off)",
                                    minimum=0)
    resume: bool = cli.field(False, help="continue from the newest complete checkpoint in RUN_DIR")
    checkpoint_every_steps: int = cli.field(0, help="also checkpoint every N steps (0: per epoch only)",
                                            minimum=0)
    stall_timeout: float = cli.field(600.0, help="end the job when a rank makes no training "
                                     "progress (a step, a validation batch, a checkpoint) for this "
                                     "many seconds, or, at any point of the run, a rank idle for "
                                     "this long hears no heartbeat from another for as long (stopped, "
                                     "killed, cut off); the line names the rank(s) waited for: run log "
                                     "status 'stalled', exit 76 (chexnet_hvd.stall); 0: off", minimum=0,
                                     maximum=1e6)  # the engines' timeouts are integer milliseconds
    steps_per_execution: int = cli.field(1, help="training steps Keras runs in one call of its "
                                         "graph: Python's cost per call (~1 ms here) spread over "
                                         "N steps, which matters at GPU step times; stops, step "
                                         "checkpoints and the stall watch act between calls",
                                         minimum=1)
    stop_check_steps: int = cli.field(10, help="the ranks agree on a stop request (SIGTERM, "
                                      "SIGUSR1) every N steps: a collective, so not every step",
                                      minimum=1)
    preempt_at_step: int = cli.field(0, help="act as if SIGUSR1 arrived at this step (the ranks "
                                     "stop at their next agreement): rehearse preemption, "
                                     "checkpoint and --resume (0: off)", minimum=0)
    keep_checkpoints: int = cli.field(3, help="how many of the newest epoch checkpoints to keep",
                                      minimum=1)
    threads: int = cli.field(0, help="CPU threads per rank for TF ops; 0: from the CPUs this rank "
                             "may run on (all of them when bound, else a share per local rank)",
                             minimum=0)
    timing_warmup_steps: int = cli.field(3, help="steps at the start of each epoch left out of img/s",
                                         minimum=0)
    tensorboard: bool = cli.field(True, help="rank 0 writes each epoch's train loss, lr, img/s, "
                                  "val loss and per-class and mean AUROC as TensorBoard scalars "
                                  "to RUN_DIR/tensorboard (`tensorboard --logdir RUN_DIR`)")
    profile_steps: str = cli.field("", help="A,B: a TensorFlow profiler trace of rank 0's steps "
                                   "A..B (the run's step numbers, as in the run log, from 1) "
                                   "into RUN_DIR/tensorboard/profile")
    audit: bool = cli.field(False, help="each rank writes to RUN_DIR/audit/: rank<N>-trained.jsonl "
                            "(the ids of the records each epoch trained), rank<N>-initial.npz and "
                            "rank<N>.npz (its initial and final weights) and rank<N>-optimizer.npz "
                            "(its final optimizer state), for tests")
    heartbeat: float = cli.field(60.0, help="when stdout is not a terminal (a batch log): rank 0 "
                                 "prints a line every this many seconds of an epoch (step, img/s, "
                                 "loss); 0: off", minimum=0)
    verbose: int = cli.field(1, help="rank 0's output: 0 silent; 1 a start line and one line "
                             "per epoch, plus Keras' progress bar when stdout is a terminal (else "
                             "the --heartbeat lines); 2 the same without the bar", choices=[0, 1, 2])


PROG = "python -m chexnet_hvd.train"
DESCRIPTION = ("Train a chest X-ray classifier on 1..N ranks (GPUs or CPU processes), with "
               "Horovod or TensorFlow's own MultiWorkerMirroredStrategy carrying the gradients.")


def recipe_defaults(name: str) -> dict:
    """A recipe's trainer settings ('none': no recipe, none)."""
    return recipes.get(name).train if name != "none" else {}


def parse(argv: list[str] | None = None) -> TrainConfig:
    """The trainer's config: a --config file's settings over its recipe's, the flags given over
    both (a --recipe flag's settings too), every value in its field's range and choices.
    argparse finds a --recipe flag (the last, abbreviations too), then parses again over it."""
    argv = list(sys.argv[1:] if argv is None else argv)
    path = cli.settings_file(argv)
    given = cli.read_settings(TrainConfig, path) if path else {}
    parser = cli.build_parser(TrainConfig, DESCRIPTION, prog=PROG, given=given)
    parser.set_defaults(recipe=None)
    flag = parser.parse_known_args(argv)[0].recipe  # None: no --recipe on the command line
    name = given.get("recipe", "none") if flag is None else flag
    recipe = recipe_defaults(name)
    parser.set_defaults(**(recipe | given if flag is None else given | recipe) | {"recipe": name})
    return cli.from_namespace(TrainConfig, parser.parse_args(argv))


def argv_of(cfg: TrainConfig) -> list[str]:
    """The flags that `parse` turns back into `cfg` (its recipe's settings left implicit)."""
    return cli.to_argv(cfg, defaults=recipe_defaults(cfg.recipe))


def command(cfg: TrainConfig, python: str = sys.executable) -> list[str]:
    """The trainer's command line for `cfg`: what the NAS worker, the GPU check, the benchmarks
    and the tests start (a launcher goes in front)."""
    return [python, "-m", "chexnet_hvd.train", *argv_of(cfg)]


# ---------------------------------------------------------------- derived values -------------
@dataclasses.dataclass(frozen=True)
class Derived:
    """Every number computed from the config and the world, in one place; logged at start (the
    run log's start record carries its fields)."""

    world_size: int
    local_batch: int
    global_batch: int
    steps_per_epoch: int
    scaled_lr: float
    # the warmup's start lr as a fraction of scaled_lr (1 / world_size) and its length; a resumed
    # run has its first attempt's (chexnet_hvd.resume.run_warmup)
    warmup_from: float
    warmup_epochs: float
    train_records: int
    records_per_rank: int  # every rank the same (chexnet_hvd.sharding)
    epoch_coverage: float


def warmup_epochs(flag: float, reference_batch: int, global_batch: int) -> float:
    """--warmup-epochs, or at -1 proportional to the global batch: global_batch /
    reference_batch / 8 epochs, at most 5 (none when the lr is not scaled)."""
    if flag >= 0:
        return flag
    return min(5.0, global_batch / reference_batch / 8) if reference_batch else 0.0


def derive(cfg: TrainConfig, manifest: dict, world_size: int) -> Derived:
    """The derived values of `cfg` on `world_size` ranks over the records of `manifest`."""
    records_total = manifest["splits"]["train"]["count"]
    global_batch = cfg.batch_size * world_size
    full = sharding.steps_per_epoch(records_total, world_size, cfg.batch_size)
    if cfg.synthetic_input:  # one in-memory batch: no records to run out of (the GPU check)
        full = max(full, cfg.steps_per_epoch, 1)
    if full < 1:
        raise cli.InputError("--batch-size", f"{cfg.batch_size} per rank x {world_size} ranks is more "
                             f"than the {records_total} training records")
    if cfg.steps_per_epoch > full and not cfg.synthetic_input:
        raise cli.InputError("--steps-per-epoch", f"{cfg.steps_per_epoch} is more than the {full} "
                             f"global batches of {global_batch} the training split holds")
    steps = cfg.steps_per_epoch or full
    ratio = global_batch / cfg.reference_batch if cfg.reference_batch else 1.0
    return Derived(world_size=world_size, local_batch=cfg.batch_size, global_batch=global_batch,
                   steps_per_epoch=steps, scaled_lr=cfg.lr * ratio,
                   warmup_from=1 / world_size,
                   warmup_epochs=warmup_epochs(cfg.warmup_epochs, cfg.reference_batch, global_batch),
                   train_records=records_total, records_per_rank=full * cfg.batch_size,
                   epoch_coverage=round(steps * global_batch / records_total, 6))


def profile_range(steps: str) -> tuple[int, int]:
    """--profile-steps 'A,B' (or 'A') -> (A, B)."""
    first, _, last = steps.partition(",")
    return int(first), int(last or first)


def check_config(cfg: TrainConfig) -> None:
    """Flag combinations that cannot work, refused before anything starts (each number's own
    range is its field's, checked by `parse`, and again here for a config built in code)."""
    cli.check_values(cfg)
    if -1 < cfg.warmup_epochs < 0:  # the range lets -1 through, and so the values between
        raise cli.InputError("--warmup-epochs", f"{cfg.warmup_epochs}: give -1 (proportional to the "
                             "global batch) or a number of epochs, at least 0")
    if cfg.profile_steps and not (re.fullmatch(r"[1-9]\d*(,[1-9]\d*)?", cfg.profile_steps)
                                  and operator.le(*profile_range(cfg.profile_steps))):
        raise cli.InputError("--profile-steps", f"{cfg.profile_steps!r}: give A,B, the first and "
                             "last step to trace (from 1, A <= B)")
    refused = distributed.engine_class(cfg.engine).refuses(cfg)
    if refused:
        flag, why = refused
        raise cli.InputError(flag, f"{why} (--engine {cfg.engine})")
    if cfg.backward_passes_per_step > 1 and cfg.precision == "mixed_float16":
        # Horovod accumulates the passes locally and allreduces only every Nth: an overflow in
        # a local pass would make one rank skip while the others apply, and the loss scale differ.
        raise cli.InputError("--backward-passes-per-step", "cannot be combined with --precision "
                             "mixed_float16 (ranks would skip different steps); use fp32 or "
                             "mixed_bfloat16, which need no loss scaling")
