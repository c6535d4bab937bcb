"""The distribution engine seam: everything the trainer, evaluate and the tests need from
distribution, and the one place that knows which engine runs.

Two engines, one interface (`Engine`):
- `horovod`: Horovod's allreduce over MPI or Gloo (horovodrun, mpirun, srun --mpi=pmix);
- `tf`: TensorFlow's own `MultiWorkerMirroredStrategy` (Keras 2 / tf_keras; ring collectives on
  CPUs, NCCL on GPUs), one worker per process, started by `python -m chexnet_hvd.launch` on a
  workstation, by srun under Slurm (its node list and task order), by any launcher that sets
  TF_CONFIG, or by hand with `--workers host:port,... --worker-index I` on each host.
Both start the same way: one GPU per local rank with memory growth, and TF threads sized from
the CPUs this process may run on, which under Slurm's or MPI's CPU binding is fewer than the
machine has (`os.sched_getaffinity`, never `os.cpu_count()`). `start` returns the engine and
where this rank landed, which the trainer records per rank in its run log.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import os
import pickle
import signal
import socket
import subprocess
import sys

import numpy as np

from chexnet_hvd.cli import InputError

# --engine's default: CHEXNET_ENGINE, else horovod where it is installed, else tf.
DEFAULT_ENGINE = os.environ.get("CHEXNET_ENGINE") or (
    "horovod" if importlib.util.find_spec("horovod") is not None else "tf")

def usable_cpus() -> list[int]:
    """The CPUs this process may run on (its affinity: what srun/mpirun bound it to)."""
    return sorted(os.sched_getaffinity(0))


def threads_for(cpus: int, local_size: int, machine_cpus: int) -> int:
    """TF threads per rank: all of its own CPUs when the launcher bound it to fewer than the
    machine has, else an equal share of them among the node's ranks."""
    if cpus < machine_cpus:
        return cpus
    return max(1, cpus // max(local_size, 1))


def visible_gpus() -> list[str]:
    """The GPUs this process is given: CUDA_VISIBLE_DEVICES when set (Slurm's gres/gpu sets it
    per task), else the indices nvidia-smi lists; [] without GPUs."""
    if "CUDA_VISIBLE_DEVICES" in os.environ:
        return [g.strip() for g in os.environ["CUDA_VISIBLE_DEVICES"].split(",") if g.strip()]
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [str(i) for i, line in enumerate(out.splitlines()) if line.startswith("GPU ")]


def gpu_index(local_rank: int, local_size: int, n_visible: int) -> int | None:
    """Which of the visible GPUs a rank uses: its local rank's, or the only one when the launcher
    gave each task its own (srun --gpus-per-task); None without GPUs."""
    if n_visible == 0:
        return None
    if n_visible == 1:
        return 0
    if local_rank < n_visible:
        return local_rank
    raise InputError("GPUs", f"local rank {local_rank} of {local_size} on {socket.gethostname()} "
                     f"but only {n_visible} GPUs visible: start one rank per GPU")


@dataclasses.dataclass
class Placement:
    """Where a rank runs: recorded per rank at start (run log `ranks`)."""

    rank: int
    size: int
    local_rank: int
    local_size: int
    host: str
    cpus: list[int]
    threads: int
    cuda_visible_devices: list[str]
    gpu: str | None  # the device this rank uses, as named in CUDA_VISIBLE_DEVICES (or its index)
    tf_gpus: int  # GPUs TensorFlow found before pinning


def place(local_rank: int, local_size: int, threads: int) -> dict:
    """Pin this rank's GPU (memory growth), size TF's thread pools: Placement's fields but the
    rank's own numbers. Before anything touches the TF runtime."""
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    visible = visible_gpus()
    index = gpu_index(local_rank, local_size, len(gpus) or len(visible))
    if gpus:  # one GPU per process
        tf.config.experimental.set_memory_growth(gpus[index], True)
        tf.config.set_visible_devices(gpus[index], "GPU")
    cpus = usable_cpus()
    threads = threads or threads_for(len(cpus), local_size, os.cpu_count() or len(cpus))
    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(max(1, min(threads, 2)))
    gpu = None if index is None else (visible[index] if index < len(visible) else str(index))
    return {"host": socket.gethostname(), "cpus": cpus, "threads": threads,
            "cuda_visible_devices": visible, "gpu": gpu, "tf_gpus": len(gpus)}


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
        """images -> probabilities (numpy) on this rank alone, no collective."""
        return model.predict_on_batch

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


def engine_class(name: str) -> type[Engine]:
    """The engine called `name`; an unknown one (a bad CHEXNET_ENGINE) is a one-line error."""
    if name not in ENGINES:
        raise InputError("--engine", f"unknown engine {name!r} (CHEXNET_ENGINE={DEFAULT_ENGINE!r}?); "
                         f"one of {', '.join(ENGINES)}")
    return ENGINES[name]


Cluster = tuple[list[str], int]  # (every worker as host:port in rank order, this one's index)


def workers_flag(engine: str, workers: str, index: int) -> Cluster | None:
    """--workers host:port,... and --worker-index, checked (one-line errors): the cluster named
    on the command line, in place of TF_CONFIG; None when --workers is not given."""
    if not workers:
        if index:
            raise InputError("--worker-index", "needs --workers")
        return None
    if not engine_class(engine).takes_workers:
        raise InputError("--workers", f"the {engine} engine takes its ranks from its launcher "
                         "(horovodrun, mpirun, srun); --workers is for --engine tf")
    hosts = workers.split(",")
    for i, worker in enumerate(hosts):
        host, _, port = worker.rpartition(":")
        if not (host and port.isdigit() and 0 < int(port) < 65536):
            raise InputError("--workers", f"{worker!r} is not host:port")
        if worker in hosts[:i]:
            raise InputError("--workers", f"{worker!r} is named twice (one worker per host:port)")
    if not 0 <= index < len(hosts):
        raise InputError("--worker-index", f"{index}, but --workers names {len(hosts)} (from 0)")
    return hosts, index


def start(engine: str = DEFAULT_ENGINE, threads: int = 0,
          cluster: Cluster | None = None) -> tuple[Engine, Placement]:
    """Start `engine` (a name of ENGINES), pin this rank's GPU, size TF's thread pools;
    `cluster` (from workers_flag) names the tf engine's workers."""
    started = engine_class(engine)(threads, cluster)
    return started, started.placement


class Horovod(Engine):
    """Horovod (hvd.init first; MPI or Gloo, NCCL on GPUs)."""

    name = "horovod"

    def __init__(self, threads: int, cluster: Cluster | None = None):  # cluster: workers_flag refuses it
        import horovod.tensorflow.keras as hvd

        hvd.init()  # Horovod: initialise before anything touches the TF runtime
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
        import horovod.tensorflow as hvd_tf
        import tensorflow as tf

        stats = batch_norm_statistics(model)
        if self.size == 1 or not stats:
            return
        flat = tf.concat([tf.reshape(v, [-1]) for v in stats], 0)  # one collective for them all
        mean = hvd_tf.allreduce(flat, op=hvd_tf.Average, name="batch_norm_statistics")  # Horovod: mean over ranks
        for v, part in zip(stats, tf.split(mean, [v.shape.num_elements() for v in stats]), strict=True):
            v.assign(tf.reshape(part, v.shape))

    def distributed_optimizer(self, optimizer, cfg):
        hvd = self.hvd
        return hvd.DistributedOptimizer(  # Horovod: allreduce the gradients
            optimizer, backward_passes_per_step=cfg.backward_passes_per_step,
            compression=hvd.Compression.fp16 if cfg.fp16_allreduce else hvd.Compression.none)

    def callbacks(self) -> list:
        return [self.hvd.callbacks.MetricAverageCallback()]  # Horovod: average the train loss

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


# ---------------------------------------------------------------- the tf engine --------------
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

    def __init__(self, threads: int, cluster: Cluster | None = None):
        workers, index = cluster or tf_cluster()
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
                implementation=self.implementation))
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


def batch_norm_statistics(model) -> list:
    """The moving means and variances of every batch-norm layer in `model`, nested ones too."""
    import tensorflow as tf

    layers = [m for m in model.submodules if isinstance(m, tf.keras.layers.BatchNormalization)]
    return [v for layer in layers for v in (layer.moving_mean, layer.moving_variance)]


def keras_package() -> tuple[str, str]:
    """(name, version) of the Keras 2 the tf engine runs on: tf_keras under TF >= 2.16, else
    TensorFlow's own keras."""
    from importlib.metadata import version

    keras = "tf_keras" if os.environ.get("TF_USE_LEGACY_KERAS") == "1" else "keras"
    return keras, version(keras)


ENGINES = {"horovod": Horovod, "tf": TensorFlow}
