"""The distribution seam: which engine runs, and starting it. The trainer, evaluate and check
call `start` and then use the `Engine` interface (chexnet_hvd.engine) without knowing which of
the two engines carries the gradients:
- `horovod` (chexnet_hvd.horovod_engine): Horovod's allreduce over MPI or Gloo (horovodrun,
  mpirun, srun --mpi=pmix);
- `tf` (chexnet_hvd.tf_engine): TensorFlow's own `MultiWorkerMirroredStrategy`, one worker per
  process (chexnet_hvd.launch, srun, TF_CONFIG, or --workers).
Both place their ranks the same way (chexnet_hvd.placement). This module loads without
TensorFlow: configs and command builders read its names and refusals.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from chexnet_hvd import cli
from chexnet_hvd.cli import InputError
from chexnet_hvd.engine import Cluster, Engine
from chexnet_hvd.horovod_engine import Horovod
from chexnet_hvd.placement import Placement
from chexnet_hvd.tf_engine import TensorFlow

ENGINES: dict[str, type[Engine]] = {"horovod": Horovod, "tf": TensorFlow}
# --engine's default: CHEXNET_ENGINE, else horovod where it is installed, else tf.
DEFAULT_ENGINE = os.environ.get("CHEXNET_ENGINE") or (
    "horovod" if importlib.util.find_spec("horovod") is not None else "tf")


def engine_field(what: str):
    """A config's --engine: `what` it carries, its choices, and its default (CHEXNET_ENGINE, else
    horovod where installed, else tf)."""
    return cli.field(DEFAULT_ENGINE, help=f"{what}; default: $CHEXNET_ENGINE, else horovod where "
                     "installed, else tf", choices=list(ENGINES), env="CHEXNET_ENGINE")


def engine_class(name: str) -> type[Engine]:
    """The engine called `name`; an unknown one (a bad CHEXNET_ENGINE) is a one-line error."""
    if name not in ENGINES:
        raise InputError("--engine", f"unknown engine {name!r} (CHEXNET_ENGINE={DEFAULT_ENGINE!r}?); "
                         f"one of {', '.join(ENGINES)}")
    return ENGINES[name]


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


def start(engine: str = DEFAULT_ENGINE, threads: int = 0, cluster: Cluster | None = None,
          stall_timeout: float = 0, shared: Path | None = None) -> tuple[Engine, Placement]:
    """Start `engine` (a name of ENGINES), pin this rank's GPU, size TF's thread pools;
    `cluster` (from workers_flag) names the tf engine's workers; the engine's own timeouts
    (Horovod's stall shutdown, Gloo's, TF's heartbeat) are set above `stall_timeout`
    (chexnet_hvd.stall); under Slurm the tf engine's
    workers share their addresses through `shared`, a directory every node sees."""
    started = engine_class(engine)(threads, cluster, stall_timeout, shared)
    return started, started.placement
