"""Start N workers of the tf engine on this machine, as horovodrun does for Horovod.

    python -m chexnet_hvd.launch -np 2 python -m chexnet_hvd.train --engine tf --data ... --run-dir ...

Each worker gets TF_CONFIG naming all workers (localhost, free ports) and its own index.
SIGTERM and SIGUSR1 are passed on to every worker (they then stop after the same step and
checkpoint); when a worker fails, the others are stopped after a grace period. The exit code is
the workers' when they agree (0, or 75 after a preemption), else the first failure's. Under
Slurm, srun starts the workers instead (chexnet_hvd.distributed reads Slurm's layout).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

from chexnet_hvd import cli
from chexnet_hvd.cli import EXIT_PREEMPTED, InputError
from chexnet_hvd.tf_engine import tf_config

GRACE_SECONDS = 10


def free_ports(n: int) -> list[int]:
    """n ports free on localhost now (held open together, so they differ)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("localhost", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def outcome(codes: list[int]) -> int:
    """One exit code for the job from the workers' codes in the order they ended: a failure's
    (the first; a signal N as 128 + N, as shells report it), else 75 if any was preempted, else 0."""
    failures = [128 - c if c < 0 else c for c in codes if c not in (0, EXIT_PREEMPTED)]
    if failures:
        return failures[0]
    return EXIT_PREEMPTED if EXIT_PREEMPTED in codes else 0


def run(np_: int, command: list[str]) -> int:
    procs: list[subprocess.Popen] = []

    def forward(signum, frame):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):  # before any worker starts
        signal.signal(sig, forward)
    workers = [f"localhost:{p}" for p in free_ports(np_)]
    for i in range(np_):
        # CHEXNET_ENGINE: the workers' --engine defaults to the one this launcher starts
        env = os.environ | {"TF_CONFIG": tf_config(workers, i), "CHEXNET_ENGINE": "tf"}
        procs.append(subprocess.Popen(command, env=env))
    ended: dict[int, int] = {}  # worker -> exit code, in the order the workers ended
    failed_at = None
    while len(ended) < np_:
        for i, p in enumerate(procs):
            if i not in ended and p.poll() is not None:
                ended[i] = p.returncode
        if failed_at is None and outcome(list(ended.values())) not in (0, EXIT_PREEMPTED):
            failed_at = time.monotonic()  # a worker died: the others would wait for it forever
        if failed_at is not None and time.monotonic() - failed_at > GRACE_SECONDS:
            for p in procs:
                if p.poll() is None:
                    p.kill()
        time.sleep(0.2)
    code = outcome(list(ended.values()))
    if code:
        print(f"chexnet_hvd.launch: worker exit codes {[p.returncode for p in procs]}", file=sys.stderr,
              flush=True)
    return code


def main(argv: list[str] | None = None) -> int:
    parser = cli.Parser(prog="python -m chexnet_hvd.launch", description=cli.summary(__doc__),
                        epilog="everything after the options is the worker command")
    parser.add_argument("-np", "--np", dest="np_", type=int, required=True, help="workers to start")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the command each worker runs")
    args = parser.parse_args(argv)
    if args.np_ < 1:
        raise InputError("-np", f"must be at least 1, not {args.np_}")
    if not args.command:
        parser.error("give the command each worker runs after -np N")
    if shutil.which(args.command[0]) is None:  # before any worker starts, not N tracebacks
        raise InputError(args.command[0], "no such program on PATH, or not executable")
    return run(args.np_, args.command)


if __name__ == "__main__":
    cli.run(main)
