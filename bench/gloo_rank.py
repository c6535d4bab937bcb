#!/usr/bin/env python3
"""One Horovod rank over Gloo under `srun --mpi=none`, told its place in the job by Slurm's
variables as horovodrun's Gloo launcher would tell it; the command (a script, or `-m module`)
then runs in this process. bench/bench_comm.py serves the rendezvous (HOROVOD_GLOO_RENDEZVOUS_*).

    srun --mpi=none -N4 --ntasks-per-node=1 python bench/gloo_rank.py bench/comm_worker.py --engine horovod
"""

from __future__ import annotations

import os
import runpy
import socket
import sys


def main() -> None:
    slurm = os.environ
    nodes, tasks = int(slurm["SLURM_NNODES"]), int(slurm["SLURM_NTASKS"])
    os.environ.update(HOROVOD_RANK=slurm["SLURM_PROCID"], HOROVOD_SIZE=str(tasks),
                      HOROVOD_LOCAL_RANK=slurm["SLURM_LOCALID"], HOROVOD_LOCAL_SIZE=str(tasks // nodes),
                      HOROVOD_CROSS_RANK=slurm["SLURM_NODEID"], HOROVOD_CROSS_SIZE=str(nodes),
                      HOROVOD_HOSTNAME=socket.gethostname())
    command = sys.argv[1:]
    if command[0] == "-m":
        sys.argv = command[1:]
        runpy.run_module(command[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = command
        runpy.run_path(command[0], run_name="__main__")


if __name__ == "__main__":
    main()
