"""The distribution engine's interface (`Engine`): everything the trainer, evaluate and the tests
need from distribution, whichever engine carries it (chexnet_hvd.distributed picks one; the
engines live in horovod_engine.py and tf_engine.py)."""

from __future__ import annotations

import contextlib
import json
import os
import sys

from chexnet_hvd.cli import EXIT_FAILED, InputError, error_text
from chexnet_hvd.placement import Placement, place

Cluster = tuple[list[str], int]  # (every worker as host:port in rank order, this one's index)
# What launchers tell each process they start about the size of its world. A process that finds
# one above 1 while its engine sees a world of one was started by the other engine's launcher:
# left alone it would train alone, N copies writing one run directory.
LAUNCHER_SIZES = {"TF_CONFIG": "chexnet_hvd.launch or TF_CONFIG (the tf engine's launchers)",
                  "HOROVOD_SIZE": "horovodrun", "OMPI_COMM_WORLD_SIZE": "mpirun",
                  "PMI_SIZE": "an MPI launcher", "SLURM_STEP_NUM_TASKS": "srun"}


def launched_sizes() -> dict[str, int]:
    """{variable: world size} of the launcher variables set to more than 1 in this process."""
    sizes = {}
    for var in LAUNCHER_SIZES:
        value = os.environ.get(var, "")
        if var == "TF_CONFIG" and value:
            try:
                sizes[var] = len(json.loads(value)["cluster"]["worker"])
            except (ValueError, KeyError, TypeError):
                continue  # the tf engine reports a malformed TF_CONFIG itself
        elif value.isdigit():
            sizes[var] = int(value)
    return {var: n for var, n in sizes.items() if n > 1}


def refuse_other_launcher(engine: str, started_by: dict[str, int], fix: str) -> None:
    """A one-line error when `started_by` (from `launched_sizes`) shows this process was started
    as one of several by a launcher of the other engine."""
    if started_by:
        var, n = next(iter(started_by.items()))
        raise InputError("--engine", f"{engine} sees a world of 1, but {LAUNCHER_SIZES[var]} started "
                         f"{n} ({var}): {fix}")

class Engine:
    """What a distributed run needs, whichever engine carries it. rank/size/local_rank/local_size
    are this process' place in the job; the methods are collectives every rank calls in the same
    order (a rank that skips one stalls the others)."""

    name = ""
    takes_workers = False  # whether --workers can name its ranks (else its launcher does)
    # Whether reading the model's variables is itself a collective (MultiWorkerMirroredStrategy
    # averages batch-norm statistics across workers on read), so that every rank must take part
    # in a checkpoint write; the non-chiefs then write to a scratch directory.
    everyone_saves = False

    def __init__(self, rank: int, size: int, local_rank: int, local_size: int):
        self.rank, self.size, self.local_rank, self.local_size = rank, size, local_rank, local_size

    def place(self, threads: int) -> Placement:
        """This rank's GPU pinned and TF threads sized; where it runs (before the TF runtime starts)."""
        return Placement(self.rank, self.size, self.local_rank, self.local_size,
                         **place(self.local_rank, self.local_size, threads))

    @property
    def saves_here(self) -> bool:
        """Whether this rank takes part in writing a checkpoint (the chief's is the run's)."""
        return self.rank == 0 or self.everyone_saves

    @staticmethod
    def refuses(cfg) -> tuple[str, str] | None:
        """A training flag this engine cannot honour, as (flag, why), or None."""
        return None

    def allgather_object(self, obj) -> list:
        """Every rank's `obj`, in rank order, on every rank."""
        raise NotImplementedError

    def broadcast_object(self, obj):
        """Rank 0's `obj` on every rank."""
        raise NotImplementedError

    def barrier(self) -> None:
        """Returns on each rank once every rank has called it: no rank leaves before the chief
        has written what it writes last (a tf worker that exits while the chief still works
        makes the chief's coordination service log errors on a success; a launcher may kill
        the others once one rank exits)."""
        self.broadcast_object(0)  # Horovod/TF: a collective

    def any_rank(self, flag: bool) -> bool:
        """True on every rank when `flag` is True on any (the stop agreement)."""
        raise NotImplementedError

    def broadcast_variables(self, variables: list) -> None:
        """Rank 0's values of `variables` on every rank."""
        raise NotImplementedError

    def average_statistics(self, model) -> None:
        """The mean over the ranks of the model's batch-norm moving statistics, on every rank:
        each rank updates them from its own batches, so without this every rank would validate
        a different model and the chief would checkpoint its own statistics alone."""
        raise NotImplementedError

    def average_accumulation(self, optimizer) -> None:
        """Before a checkpoint, every rank: the mean over the ranks of the gradient sums of an
        update still accumulating (`accumulation`), on every rank, so that the checkpoint (the
        chief's) holds what all ranks summed. Only Horovod accumulates."""

    def scope(self):
        """The context in which models and optimizers are built."""
        return contextlib.nullcontext()

    def distributed_optimizer(self, optimizer, cfg):
        """`optimizer` with gradients averaged over the ranks (loss scaling goes outside it)."""
        return optimizer

    def callbacks(self) -> list:
        """The engine's own Keras callbacks, first in the trainer's list."""
        return []

    def fit_input(self, make_dataset):
        """What Keras `fit` takes for this rank's own dataset (`make_dataset()`: per-rank
        batches, already sharded by the suite: the engine must not shard or re-batch it)."""
        return make_dataset()

    def predictor(self, model):
        """images -> probabilities (numpy) on this rank alone, no collective. A graph of its own:
        Keras' predict_on_batch would take --steps-per-execution batches per call."""
        import tensorflow as tf

        call = tf.function(lambda x: model(x, training=False), reduce_retracing=True, autograph=False)
        return lambda images: call(images).numpy()

    def local_function(self, fn):
        """`fn` (no arguments) as a traced function run on this rank alone, no collective."""
        import tensorflow as tf

        return tf.function(fn)

    def peer_left(self, err: BaseException) -> bool:
        """Whether `err` is a collective this rank was in failing because another rank left
        the job (that rank's own error is the news; this one's traceback is noise)."""
        return False

    def says_peer_left(self, err: BaseException) -> bool:
        """When `peer_left(err)`: one line on stderr saying so (the rank then exits
        EXIT_FAILED, the other rank's own error being the news), and True."""
        if self.size == 1 or not self.peer_left(err):
            return False
        print(f"error: rank {self.rank}: another rank left the job ({type(err).__name__}: "
              f"{error_text(err)}); ending this one (exit {EXIT_FAILED})", file=sys.stderr, flush=True)
        return True

    def backend(self) -> str:
        """The transport in use (run log `backend`)."""
        return "none"

    def versions(self) -> dict:
        return {}

    @staticmethod
    def launcher(n: int) -> list[str]:
        """What starts n ranks of this engine on one machine (a workstation, a test)."""
        raise NotImplementedError

    @staticmethod
    def build() -> list[tuple[str, str]]:
        """How this engine was built, as (verdict, text) for chexnet_hvd.check."""
        return []


# Horovod's gradient accumulation (--backward-passes-per-step > 1) lives on a helper of its
# own (`_agg_helper`, Horovod 0.28.1), outside the optimizer's checkpoint: a resume lost the
# passes of the update in progress. These three are all the suite knows of it.
def accumulation(optimizer) -> list:
    """Horovod's accumulation as variables: its count of the passes since the last update, then
    each trainable variable's gradient summed over them; [] without it."""
    helper = getattr(optimizer, "_agg_helper", None)
    if helper is None:
        return []
    sums = helper.locally_aggregated_grads  # {index in the gradients' list: tf.Variable}
    return [helper.counter, *(sums[i] for i in sorted(sums))]


def make_accumulation(optimizer, variables: list) -> None:
    """The sums Horovod makes at its first pass (one per trainable variable, in this order),
    made now as zeros, so that a checkpoint can be restored into them."""
    helper = getattr(optimizer, "_agg_helper", None)
    if helper is None:
        return
    import tensorflow as tf

    for i, variable in enumerate(variables):
        if i not in helper.locally_aggregated_grads:
            helper.locally_aggregated_grads[i] = tf.Variable(tf.zeros_like(variable), trainable=False)


def passes_per_update(optimizer) -> int:
    """--backward-passes-per-step as Horovod's optimizer applies it (1 without accumulation)."""
    helper = getattr(optimizer, "_agg_helper", None)
    return 1 if helper is None else helper.backward_passes_per_step


def batch_norm_statistics(model) -> list:
    """The moving means and variances of every batch-norm layer in `model`, nested ones too."""
    import tensorflow as tf

    layers = [m for m in model.submodules if isinstance(m, tf.keras.layers.BatchNormalization)]
    return [v for layer in layers for v in (layer.moving_mean, layer.moving_variance)]
