"""The Horovod engine: Horovod's allreduce over MPI or Gloo (NCCL on GPUs), started by
horovodrun, mpirun or srun --mpi=pmix. Horovod is optional (it does not build against
TensorFlow >= 2.16), so it is imported when the engine starts, not with this module."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from chexnet_hvd import stall
from chexnet_hvd.engine import (
    Cluster,
    Engine,
    accumulation,
    batch_norm_statistics,
    launched_sizes,
    refuse_other_launcher,
)


class Horovod(Engine):
    """Horovod (hvd.init first; MPI or Gloo, NCCL on GPUs)."""

    name = "horovod"

    def __init__(self, threads: int, cluster: Cluster | None = None,  # cluster: workers_flag refuses it
                 stall_timeout: float = 0, shared: Path | None = None):  # shared: the tf engine's
        import horovod.tensorflow.keras as hvd

        for var, value in stall.engine_timeouts(stall_timeout).items():  # unless the user set them
            os.environ.setdefault(var, value)
        hvd.init()  # Horovod: initialise before anything touches the TF runtime
        if hvd.size() == 1:  # Horovod: one rank, but maybe one of several another launcher started
            refuse_other_launcher("horovod", launched_sizes(), "start Horovod's ranks with horovodrun, "
                                  "mpirun or srun --mpi=pmix, or the tf engine's with --engine tf")
        super().__init__(hvd.rank(), hvd.size(), hvd.local_rank(), hvd.local_size())
        self.hvd = hvd
        self.placement = self.place(threads)
        skip_autograph_for_horovod()

    def allgather_object(self, obj) -> list:
        import horovod.tensorflow as hvd_tf

        return hvd_tf.allgather_object(obj) if self.size > 1 else [obj]  # Horovod: allgather

    def broadcast_object(self, obj):
        import horovod.tensorflow as hvd_tf

        return hvd_tf.broadcast_object(obj, root_rank=0)  # Horovod: rank 0's object

    def any_rank(self, flag: bool) -> bool:
        import horovod.tensorflow as hvd_tf
        import tensorflow as tf

        total = hvd_tf.allreduce(tf.constant(float(flag)), op=hvd_tf.Max, name="stop_request")  # Horovod: max
        return float(total) > 0

    def broadcast_variables(self, variables: list) -> None:
        import horovod.tensorflow as hvd_tf

        hvd_tf.broadcast_variables(variables, root_rank=0)  # Horovod: rank 0's values

    def average_statistics(self, model) -> None:
        self._average(batch_norm_statistics(model), "batch_norm_statistics")

    def average_accumulation(self, optimizer) -> None:
        passes, *sums = accumulation(optimizer) or [0]
        if int(passes):  # the same count on every rank: all of them allreduce, or none
            self._average(sums, "accumulated_gradients")

    def _average(self, variables: list, name: str) -> None:
        """variables := their mean over the ranks, on every rank."""
        import horovod.tensorflow as hvd_tf
        import tensorflow as tf

        if self.size == 1 or not variables:
            return
        flat = tf.concat([tf.reshape(v, [-1]) for v in variables], 0)  # one collective for them all
        mean = hvd_tf.allreduce(flat, op=hvd_tf.Average, name=name)  # Horovod: mean over ranks
        for v, part in zip(variables, tf.split(mean, [v.shape.num_elements() for v in variables]), strict=True):
            v.assign(tf.reshape(part, v.shape))

    def distributed_optimizer(self, optimizer, cfg):
        hvd = self.hvd
        return hvd.DistributedOptimizer(  # Horovod: allreduce the gradients
            optimizer, backward_passes_per_step=cfg.backward_passes_per_step,
            compression=hvd.Compression.fp16 if cfg.fp16_allreduce else hvd.Compression.none)

    def callbacks(self) -> list:
        return [self.hvd.callbacks.MetricAverageCallback()]  # Horovod: average the train loss

    def peer_left(self, err: BaseException) -> bool:
        # Horovod's background loop shuts down when a peer goes; each later op then says so
        return "Horovod has been shut down" in str(err) or type(err).__name__ == "HorovodInternalError"

    def backend(self) -> str:
        if self.hvd.mpi_enabled():
            return "mpi"
        return "gloo" if self.hvd.gloo_enabled() else "none"

    def versions(self) -> dict:
        return {"horovod": __import__("horovod").__version__}

    @staticmethod
    def launcher(n: int) -> list[str]:
        return ["horovodrun", "--gloo", "-np", str(n)]

    @staticmethod
    def build() -> list[tuple[str, str]]:
        if importlib.util.find_spec("horovod") is None:
            return [("FAIL", "Horovod is not installed here (make setup builds it; or --engine tf)")]
        import horovod
        import horovod.tensorflow as hvd

        built = [name for name, ok in (("MPI", hvd.mpi_built()), ("Gloo", hvd.gloo_built()),
                                       ("NCCL", hvd.nccl_built())) if ok]
        found = [("PASS", f"Horovod {horovod.__version__} built with {', '.join(built) or 'nothing'}")]
        if hvd.nccl_built():
            return found + [("PASS", "Horovod has NCCL: gradients are allreduced GPU to GPU")]
        return found + [("FAIL", "Horovod was built without NCCL: GPU gradients would be allreduced "
                                 "through the CPU (rebuild on a GPU node: make setup GPU=1)")]


def skip_autograph_for_horovod() -> None:
    """Horovod's ops are graph-safe as written (tf.cond, no Python control flow on tensors);
    AutoGraph rewriting its modules inside every traced step cost ~8 s of each process's
    start-up here (a third of a short run), so calls into Horovod go unconverted, as calls
    into tensorflow and keras already do. The rule list is TensorFlow's own."""
    from tensorflow.python.autograph.core import config

    rule = config.DoNotConvert("horovod")
    if str(rule) not in map(str, config.CONVERSION_RULES):
        config.CONVERSION_RULES = (rule, *config.CONVERSION_RULES)
