"""The tf engine: TensorFlow's own `MultiWorkerMirroredStrategy` (Keras 2 / tf_keras; ring
collectives on CPUs, NCCL on GPUs), one worker per process, started by `python -m
chexnet_hvd.launch` on a workstation, by srun under Slurm (its node list and task order), by any
launcher that sets TF_CONFIG, or by hand with `--workers host:port,... --worker-index I` on each
host. This module loads without TensorFlow (the launcher uses its cluster helpers); the engine
imports it when it starts."""

from __future__ import annotations

import json
import os
import pickle
import signal
import sys

import numpy as np

from chexnet_hvd.cli import InputError
from chexnet_hvd.engine import (
    Cluster,
    Engine,
    batch_norm_statistics,
    launched_sizes,
    refuse_other_launcher,
)


def tf_port_base(job_id: str) -> int:
    """The first port of a Slurm job's workers (worker i listens on base + i): distinct per job,
    so jobs sharing a node do not collide, and per worker across the job (not per node), so
    nodes that share an address (the rehearsal cluster's) do not either. CHEXNET_TF_PORT
    overrides it."""
    if os.environ.get("CHEXNET_TF_PORT"):
        port = os.environ["CHEXNET_TF_PORT"]
        if not (port.isdigit() and 0 < int(port) < 65536):
            raise InputError("CHEXNET_TF_PORT", f"{port!r} is not a port number")
        return int(port)
    digits = "".join(c for c in job_id if c.isdigit()) or "0"
    return 20000 + int(digits) % 400 * 100


def tf_config(workers: list[str], index: int) -> str:
    """TF_CONFIG for worker `index` of `workers` (host:port each)."""
    return json.dumps({"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}})


def tf_cluster() -> Cluster:
    """(workers as host:port, this worker's index): TF_CONFIG when set; inside a Slurm step of
    several tasks, Slurm's view (its nodes and task order, our ports);
    else a world of one ([], 0)."""
    if os.environ.get("TF_CONFIG"):
        try:
            config = json.loads(os.environ["TF_CONFIG"])
            workers, index = list(config["cluster"]["worker"]), int(config["task"]["index"])
        except (ValueError, KeyError, TypeError) as err:
            raise InputError("TF_CONFIG", f"not a worker cluster spec ({err})") from None
        if not 0 <= index < len(workers):
            raise InputError("TF_CONFIG", f"task index {index} but {len(workers)} workers")
        return workers, index
    if int(os.environ.get("SLURM_STEP_NUM_TASKS", "1")) > 1:
        from tensorflow.python.distribute.cluster_resolver.slurm_cluster_resolver import (
            expand_hostlist,
            expand_tasks_per_node,
        )

        # SlurmClusterResolver's own parsers, but Slurm's node order, in which it numbers the
        # tasks (SLURM_PROCID; block distribution): its cluster_spec sorts hostnames as text,
        # which puts node10 before node9 and names each worker by the other's address.
        nodes = expand_hostlist(os.environ["SLURM_STEP_NODELIST"])
        counts = expand_tasks_per_node(os.environ["SLURM_STEP_TASKS_PER_NODE"])
        hosts = [node for node, n in zip(nodes, counts, strict=True) for _ in range(n)]
        base = tf_port_base(os.environ.get("SLURM_JOB_ID", "0"))
        if base + len(hosts) - 1 > 65535:
            raise InputError("CHEXNET_TF_PORT", f"{base}: {len(hosts)} workers' ports (one each) go past 65535")
        return [f"{host}:{base + i}" for i, host in enumerate(hosts)], int(os.environ["SLURM_PROCID"])
    return [], 0


def local_ranks(workers: list[str], index: int) -> tuple[int, int]:
    """(local rank, local size): this worker's place among the workers on its host."""
    if not workers:
        return 0, 1
    hosts = [w.rsplit(":", 1)[0] for w in workers]
    mine = [i for i, host in enumerate(hosts) if host == hosts[index]]
    return mine.index(index), len(mine)


class TensorFlow(Engine):
    """tf.distribute.MultiWorkerMirroredStrategy over Keras 2, one replica per worker."""

    name = "tf"
    takes_workers = True
    everyone_saves = True

    @staticmethod
    def refuses(cfg) -> tuple[str, str] | None:
        if cfg.fp16_allreduce:
            return "--fp16-allreduce", "gradient compression is Horovod's; the tf engine has none"
        if cfg.backward_passes_per_step > 1:
            return "--backward-passes-per-step", "gradient accumulation is Horovod's; the tf engine has none"
        return None

    def __init__(self, threads: int, cluster: Cluster | None = None, stall_timeout: float = 0):
        workers, index = cluster or tf_cluster()
        if not workers:  # no cluster of its own, but maybe one rank of Horovod's launchers
            refuse_other_launcher("the tf engine", launched_sizes(), "start its workers with "
                                  "python -m chexnet_hvd.launch, srun or TF_CONFIG, or Horovod's "
                                  "ranks with --engine horovod")
        super().__init__(index, max(len(workers), 1), *local_ranks(workers, index))
        self.placement = self.place(threads)
        import tensorflow as tf

        if workers:  # the strategy reads the cluster from TF_CONFIG
            os.environ["TF_CONFIG"] = tf_config(workers, index)
        implementation = tf.distribute.experimental.CommunicationImplementation
        self.implementation = implementation.NCCL if self.placement.tf_gpus else implementation.RING
        handler = signal.getsignal(signal.SIGTERM)
        self.strategy = tf.distribute.MultiWorkerMirroredStrategy(
            communication_options=tf.distribute.experimental.CommunicationOptions(
                implementation=self.implementation,
                # a collective's own limit, above --stall-timeout: the watchdog speaks first
                timeout_seconds=stall_timeout + 60 if stall_timeout > 0 else None))
        # The strategy's preemption notifier takes SIGTERM over (in C++, unseen by Python's
        # signal module); give it back to whoever had it: the trainer stops on it by agreement.
        signal.signal(signal.SIGTERM, handler)
        # No AutoGraph in these small graphs (no Python control flow on tensors to convert).
        self._sum = tf.function(self._replica_sum, reduce_retracing=True, autograph=False)

    def _replica_sum(self, value):
        import tensorflow as tf

        def replica(v):
            return tf.distribute.get_replica_context().all_reduce(
                tf.distribute.ReduceOp.SUM, tf.identity(v))  # TF collective: sum over workers

        return self.strategy.run(replica, args=(value,))

    def _local(self, value):
        return self.strategy.experimental_local_results(value)[0]

    def sum(self, array: np.ndarray) -> np.ndarray:
        """The elementwise sum of `array` over all workers."""
        return self._local(self._sum(array)).numpy()

    def allgather_object(self, obj) -> list:
        """Pickled, as int64 words: each worker fills its own row of a zero matrix and a sum
        assembles all rows (the sum of one value and zeros is exact)."""
        if self.size == 1:
            return [obj]
        raw = pickle.dumps(obj)
        lengths = self.sum(np.eye(self.size, dtype=np.int64)[self.rank] * len(raw))
        rows = np.zeros((self.size, -(-int(lengths.max()) // 8)), np.int64)
        rows[self.rank] = np.frombuffer(raw.ljust(rows.shape[1] * 8, b"\0"), np.int64)
        rows = self.sum(rows)
        return [pickle.loads(rows[r].tobytes()[:lengths[r]]) for r in range(self.size)]

    def broadcast_object(self, obj):
        return self.allgather_object(obj if self.rank == 0 else None)[0]

    def any_rank(self, flag: bool) -> bool:
        return bool(self.sum(np.array([float(flag)], np.float32))[0] > 0)

    def broadcast_variables(self, variables: list) -> None:
        """Each variable's rank-0 value summed with the others' zeros."""
        import tensorflow as tf

        chief = self.rank == 0
        self._reduce_into(variables, lambda v: tf.identity(v) if chief else tf.zeros_like(v), "SUM")

    def average_statistics(self, model) -> None:
        """Each worker's own values (a replica reads its local copy), averaged."""
        import tensorflow as tf

        self._reduce_into(batch_norm_statistics(model), tf.identity, "MEAN")

    def _reduce_into(self, variables: list, mine, op: str) -> None:
        """variables := the `op` (SUM or MEAN) over the workers of mine(variable), one
        collective per dtype (a collective packs its tensors into one)."""
        import tensorflow as tf

        if self.size == 1 or not variables:
            return
        groups = {}
        for variable in variables:
            groups.setdefault(variable.dtype, []).append(variable)

        @tf.function(autograph=False)
        def reduce(group):
            def replica():
                return tf.distribute.get_replica_context().all_reduce(
                    tf.distribute.ReduceOp[op], [mine(v) for v in group])  # TF collective

            return self.strategy.run(replica)

        for group in groups.values():
            for variable, value in zip(group, reduce(group), strict=True):
                variable.assign(self._local(value))

    def scope(self):
        return self.strategy.scope()

    def fit_input(self, make_dataset):
        import tensorflow as tf

        # Each worker's own batches, as made: no auto-sharding, no re-batching by the strategy.
        return tf.keras.utils.experimental.DatasetCreator(lambda context: make_dataset())

    def predictor(self, model):
        """The model on this worker's replica: Keras' own predict would gather every worker's
        outputs (a collective, which ranks holding different numbers of batches cannot join)."""
        import tensorflow as tf

        call = tf.function(lambda x: self.strategy.run(lambda y: model(y, training=False), args=(x,)),
                           reduce_retracing=True, autograph=False)
        return lambda images: self._local(call(images)).numpy()

    def backend(self) -> str:
        return self.implementation.name.lower()

    def versions(self) -> dict:
        return dict([keras_package()])

    @staticmethod
    def launcher(n: int) -> list[str]:
        return [sys.executable, "-m", "chexnet_hvd.launch", "-np", str(n)]

    @staticmethod
    def build() -> list[tuple[str, str]]:
        keras = " ".join(keras_package())
        return [("PASS", f"the tf engine: MultiWorkerMirroredStrategy over {keras}, "
                         "NCCL collectives between GPUs, ring on the CPU")]


def keras_package() -> tuple[str, str]:
    """(name, version) of the Keras 2 the tf engine runs on: tf_keras under TF >= 2.16, else
    TensorFlow's own keras."""
    from importlib.metadata import version

    keras = "tf_keras" if os.environ.get("TF_USE_LEGACY_KERAS") == "1" else "keras"
    return keras, version(keras)
