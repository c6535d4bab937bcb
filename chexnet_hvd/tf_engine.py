"""The tf engine: TensorFlow's own `MultiWorkerMirroredStrategy` (Keras 2 / tf_keras; ring
collectives on CPUs, NCCL on GPUs), one worker per process, started by `python -m
chexnet_hvd.launch` on a workstation, by srun under Slurm (its node list and task order), by any
launcher that sets TF_CONFIG, or by hand with `--workers host:port,... --worker-index I` on each
host. This module loads without TensorFlow (the launcher uses its cluster helpers); the engine
imports it when it starts."""

from __future__ import annotations

import itertools
import json
import os
import pickle
import signal
import socket
import sys
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np

from chexnet_hvd import stall
from chexnet_hvd.cli import InputError
from chexnet_hvd.engine import (
    Cluster,
    Engine,
    batch_norm_statistics,
    launched_sizes,
    refuse_other_launcher,
)

RENDEZVOUS_SECONDS = 300  # how long a worker waits for the others' addresses


def own_port() -> tuple[int, socket.socket | None]:
    """The port this worker will listen on: CHEXNET_TF_PORT + its Slurm task number (a range
    the cluster's firewall opens), else the one Slurm reserved for this task of the step on this
    node (srun --resv-ports), else one the kernel finds free now; with the last, the socket that
    holds it (bound, so no other process is given it) until the caller closes it, once the
    addresses are exchanged (the worker's own server takes the port moments later)."""
    if os.environ.get("CHEXNET_TF_PORT"):
        base = os.environ["CHEXNET_TF_PORT"]
        port = int(base) + int(os.environ.get("SLURM_PROCID", "0")) if base.isdigit() else -1
        if not 0 < port < 65536:
            raise InputError("CHEXNET_TF_PORT", f"{base!r} plus the worker's Slurm task number is not a port number")
        return port, None
    reserved = os.environ.get("SLURM_STEP_RESV_PORTS", "")
    if reserved:
        from tensorflow.python.distribute.cluster_resolver.slurm_cluster_resolver import (
            expand_hostlist,
        )

        ports = [int(p) for p in expand_hostlist(f"p[{reserved}]") if p[1:].isdigit() for p in [p[1:]]]
        local = int(os.environ.get("SLURM_LOCALID", "0"))
        if local >= len(ports):  # two workers on one port: the second fails, or worse
            raise InputError("SLURM_STEP_RESV_PORTS", f"{reserved}: {len(ports)} port(s) reserved on this "
                             f"node for task {local} and the ones before it: give srun --resv-ports "
                             "one port per task (its default), or leave it out")
        return ports[local], None
    holder = socket.socket()
    holder.bind(("", 0))
    return holder.getsockname()[1], holder


def rendezvous(folder: Path, me: int, count: int, address: str, wait: float = RENDEZVOUS_SECONDS) -> list[str]:
    """Every worker's address, in rank order: each writes its own into `folder` (a directory
    every node sees) and reads the others'. Ports are chosen by each worker on its own node
    (`own_port`), not by a formula two jobs sharing a node could both compute."""
    folder.mkdir(parents=True, exist_ok=True)
    mine = folder / f"{me}.tmp{os.getpid()}"
    mine.write_text(address)
    os.replace(mine, folder / str(me))
    deadline = time.monotonic() + wait
    while True:
        found = {int(p.name): p.read_text() for p in folder.iterdir() if p.name.isdigit()}
        if len(found) >= count:
            return [found[i] for i in range(count)]
        if time.monotonic() > deadline:
            missing = sorted(set(range(count)) - set(found))
            raise InputError(folder, f"workers {missing} never wrote their address in {wait:.0f} s: "
                             "the folder must be one every node of the job sees (the run directory)")
        time.sleep(0.2)


def heartbeat_timeout(workers: list[str], seconds: float) -> None:
    """TF's coordination service, set up as MultiWorkerMirroredStrategy would (it leaves one
    already set up alone), but with its heartbeat timeout above the stall watchdog's bound: at
    TF's default of 10 s a worker whose heartbeats a loaded node delays ends a healthy job, and a
    stalled one would end it without the watchdog's message naming the rank."""
    import tensorflow as tf
    from tensorflow.python.distribute import collective_all_reduce_strategy, multi_worker_util
    from tensorflow.python.eager import context

    cluster = tf.train.ClusterSpec({"worker": workers})
    job = collective_all_reduce_strategy.coordination_config_pb2.CoordinatedJob(name="worker", num_tasks=len(workers))
    context.context().configure_coordination_service(
        service_type="standalone", service_leader=multi_worker_util.coordination_leader(cluster),
        coordinated_jobs=[job], heartbeat_timeout_in_ms=int(seconds * 1000))


# What TF's errors say when a collective or the coordination service lost a peer.
PEER_MARKS = ("Collective ops is aborted", "coordination service", "CollectiveReduce", "CollectiveGather",
              "CollectiveBcast", "/tensorflow.WorkerService/")


def tf_config(workers: list[str], index: int) -> str:
    """TF_CONFIG for worker `index` of `workers` (host:port each)."""
    return json.dumps({"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}})


def tf_cluster(shared: Path | None = None) -> Cluster:
    """(workers as host:port, this worker's index): TF_CONFIG when set; inside a Slurm step of
    several tasks, Slurm's view (its nodes and task order), with ports each worker chose and
    shared through `shared`, a directory every node sees (default: where the job was submitted
    from); else a world of one ([], 0)."""
    if os.environ.get("TF_CONFIG"):
        try:
            config = json.loads(os.environ["TF_CONFIG"])
            workers, index = list(config["cluster"]["worker"]), int(config["task"]["index"])
            roles = {role for role, tasks in config["cluster"].items() if tasks} | {config["task"].get("type", "worker")}
            roles -= {"worker"}
        except (ValueError, KeyError, TypeError) as err:
            raise InputError("TF_CONFIG", f"not a worker cluster spec ({err})") from None
        if roles:  # a chief / ps / evaluator task would take worker `index`'s rank as well
            raise InputError("TF_CONFIG", f"has {', '.join(sorted(roles))} tasks; this trainer's ranks are "
                                          "all 'worker' tasks (worker 0 is the chief)")
        if not 0 <= index < len(workers):
            raise InputError("TF_CONFIG", f"task index {index} but {len(workers)} workers")
        return workers, index
    # Ranks of mpirun or horovodrun inside an allocation inherit the Slurm step of the daemon
    # that started them (one task per node): that step's tasks are not these workers.
    by_mpi = {"HOROVOD_SIZE", "OMPI_COMM_WORLD_SIZE"} & set(launched_sizes())
    if int(os.environ.get("SLURM_STEP_NUM_TASKS", "1")) > 1 and not by_mpi:
        from tensorflow.python.distribute.cluster_resolver.slurm_cluster_resolver import (
            expand_hostlist,
            expand_tasks_per_node,
        )

        # SlurmClusterResolver's own parsers, but Slurm's node order, in which it numbers the
        # tasks (SLURM_PROCID; block distribution): its cluster_spec sorts hostnames as text,
        # which puts node10 before node9 and names each worker by the other's address.
        nodes = expand_hostlist(os.environ["SLURM_STEP_NODELIST"])
        counts = expand_tasks_per_node(os.environ["SLURM_STEP_TASKS_PER_NODE"])
        hosts, tasks = ring_places([node for node, n in zip(nodes, counts, strict=True) for _ in range(n)])
        me = tasks[int(os.environ["SLURM_PROCID"])]
        # one folder per step of each attempt: a requeued job keeps its id and numbers its steps anew
        step = "{}.{}.{}".format(*(os.environ.get(v, "0") for v in ("SLURM_JOB_ID", "SLURM_RESTART_COUNT",
                                                                    "SLURM_STEP_ID")))
        shared = shared or Path(os.environ.get("SLURM_SUBMIT_DIR", ".")) / ".chexnet-rendezvous"
        port, holder = own_port()
        try:
            return rendezvous(shared / step, me, len(hosts), f"{hosts[me]}:{port}"), me
        finally:  # the server takes the port next (a held port is no other process's meanwhile)
            if holder:
                holder.close()
    return [], 0


def ring_places(hosts: list[str]) -> tuple[list[str], list[int]]:
    """(the host of each worker index, the worker index of each Slurm task) for a step whose
    tasks are on `hosts` (Slurm's task order: node by node). TF's ring all-reduce visits the
    workers in the text order of their names (worker 10 before worker 2), so each node's tasks
    take the indices of a run of places in that order, in ascending order (so a worker's local
    rank is its SLURM_LOCALID), and the ring goes node by node, crossing each node's link once.
    (Numbered as Slurm numbers them, 16 workers 4 per node crossed two nodes' links twice:
    those sent twice the bytes, and the allreduce took 2.9x the 4-worker one; below 11 workers
    the two numberings are the same.)"""
    order = sorted(range(len(hosts)), key=lambda task: f"/job:worker/replica:0/task:{task}/")
    by_index, index_of = [""] * len(hosts), [0] * len(hosts)
    for _, tasks in itertools.groupby(range(len(hosts)), key=hosts.__getitem__):
        tasks = list(tasks)
        for task, index in zip(tasks, sorted(order[t] for t in tasks), strict=True):
            by_index[index], index_of[task] = hosts[task], index
    return by_index, index_of


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

    def __init__(self, threads: int, cluster: Cluster | None = None, stall_timeout: float = 0,
                 shared: Path | None = None):
        workers, index = cluster or tf_cluster(shared)
        if not workers:  # no cluster of its own, but maybe one rank of Horovod's launchers
            refuse_other_launcher("the tf engine", launched_sizes(), "start its workers with "
                                  "python -m chexnet_hvd.launch, srun or TF_CONFIG, or Horovod's "
                                  "ranks with --engine horovod")
        super().__init__(index, max(len(workers), 1), *local_ranks(workers, index))
        self.placement = self.place(threads)
        import tensorflow as tf

        if workers:  # the strategy reads the cluster from TF_CONFIG
            os.environ["TF_CONFIG"] = tf_config(workers, index)
            if stall_timeout > 0:
                heartbeat_timeout(workers, stall_timeout + stall.ENGINE_MARGIN)
        implementation = tf.distribute.experimental.CommunicationImplementation
        self.implementation = implementation.NCCL if self.placement.tf_gpus else implementation.RING
        handler = signal.getsignal(signal.SIGTERM)
        self.strategy = tf.distribute.MultiWorkerMirroredStrategy(
            # No timeout_seconds: TF gives every collective with a timeout a thread that sleeps
            # out the whole timeout (PosixEnv::SchedClosureAfter), so at --stall-timeout's 600 s
            # and a dozen collectives a step a fast job holds tens of thousands of threads and
            # dies on "Resource temporarily unavailable". The coordination service's heartbeat
            # timeout (above) is the second line of defence instead.
            communication_options=tf.distribute.experimental.CommunicationOptions(
                implementation=self.implementation))
        # The strategy's preemption notifier takes SIGTERM over (in C++, unseen by Python's
        # signal module); give it back to whoever had it: the trainer stops on it by agreement.
        signal.signal(signal.SIGTERM, handler)
        self._sums: dict = {}  # dtype -> its graph (`sum`)
        self._reducers: dict = {}  # (op, chief only) -> its graph (`_reduce_into`)

    def _replica_sum(self, value):
        import tensorflow as tf

        def replica(v):
            return tf.distribute.get_replica_context().all_reduce(
                tf.distribute.ReduceOp.SUM, tf.identity(v))  # TF collective: sum over workers

        return self.strategy.run(replica, args=(value,))

    def _local(self, value):
        return self.strategy.experimental_local_results(value)[0]

    def sum(self, array: np.ndarray) -> np.ndarray:
        """The elementwise sum of `array` over all workers. One graph per dtype, whatever the
        shape: the array goes flat (a graph per shape retraced, and TF warned of it in every log).
        No AutoGraph in this small graph (no Python control flow on tensors to convert)."""
        import tensorflow as tf

        flat = np.ravel(array)
        if flat.dtype not in self._sums:
            self._sums[flat.dtype] = tf.function(self._replica_sum, autograph=False,
                                                 input_signature=[tf.TensorSpec([None], flat.dtype)])
        return self._local(self._sums[flat.dtype](flat)).numpy().reshape(np.shape(array))

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
        return bool(self.sum(np.array([flag], np.int64))[0] > 0)

    def broadcast_variables(self, variables: list) -> None:
        """Each variable's rank-0 value summed with the others' zeros."""
        self._reduce_into(variables, "SUM", chief_only=True)

    def average_statistics(self, model) -> None:
        """Each worker's own values (a replica reads its local copy), averaged."""
        self._reduce_into(batch_norm_statistics(model), "MEAN")

    def _reduce_into(self, variables: list, op: str, chief_only: bool = False) -> None:
        """variables := the `op` (SUM or MEAN) over the workers of their values (with
        `chief_only`, the chief's and the others' zeros), one collective per dtype (a collective
        packs its tensors into one). One graph per kind of reduction, kept: TF counts traces per
        Python function, so a graph made per call warned of retracing from the third epoch on."""
        import tensorflow as tf

        if self.size == 1 or not variables:
            return
        if (op, chief_only) not in self._reducers:
            zero = chief_only and self.rank != 0

            @tf.function(autograph=False)
            def reduce(group):
                def replica():
                    return tf.distribute.get_replica_context().all_reduce(  # TF collective
                        tf.distribute.ReduceOp[op], [tf.zeros_like(v) if zero else tf.identity(v) for v in group])

                return self.strategy.run(replica)

            self._reducers[op, chief_only] = reduce
        groups = {}
        for variable in variables:
            groups.setdefault(variable.dtype, []).append(variable)
        for group in groups.values():
            for variable, value in zip(group, self._reducers[op, chief_only](group), strict=True):
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

    def local_function(self, fn):
        """On this worker's replica: the model's variables are the strategy's."""
        import tensorflow as tf

        call = tf.function(lambda: self.strategy.run(fn), autograph=False)
        return lambda: self._local(call())

    def peer_left(self, err: BaseException) -> bool:
        import tensorflow as tf

        # a collective aborted (its peer's socket closed), or the coordination service gone; the
        # same error types also carry local file errors (a stale NFS handle is Aborted), which
        # keep their traceback
        return (isinstance(err, tf.errors.UnavailableError | tf.errors.AbortedError | tf.errors.CancelledError)
                and any(mark in str(err) for mark in PEER_MARKS))

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
    keras = "tf_keras" if os.environ.get("TF_USE_LEGACY_KERAS") == "1" else "keras"
    return keras, version(keras)
