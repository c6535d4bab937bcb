"""Where a rank runs: the CPUs it may use and the TF threads sized from them, and the one GPU it
takes. Under Slurm's or MPI's CPU binding a rank may use fewer CPUs than the machine has
(`os.sched_getaffinity`, never `os.cpu_count()`). Both engines place their ranks through `place`
before anything touches the TF runtime; each rank's Placement goes into the run log.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import subprocess

from chexnet_hvd.cli import InputError


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
