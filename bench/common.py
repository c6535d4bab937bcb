"""What the benchmark scripts share: the machine's description, running a command with its
wall time, CPU time and peak memory (the process's and its worker processes'), and the names
that bench_comm.py records and run_all.py renders."""

from __future__ import annotations

import contextlib
import fcntl
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Open MPI told to call sched_yield between its polls while it waits (it still polls): a setting
# of one of bench_comm.py's trainer runs, which run_all.py's notes look for
YIELD = "OMPI_MCA_mpi_yield_when_idle=1"


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (the processor type where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return " ".join(line.split(":", 1)[1].split())
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> str:
    """Host, CPU model and the cores this process may use: what a row's numbers were measured on."""
    return f"{platform.node()}, {cpu_model()}, {len(os.sched_getaffinity(0))} cores"


def today() -> str:
    return time.strftime("%Y-%m-%d")


def _parent(pid: int | str) -> int:
    """The parent pid of a live process (0 once it has ended)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0
    return int(stat[stat.rindex(")") + 2:].split()[1])  # the name in (...) may hold spaces


def _children() -> dict[int, list[int]]:
    """Parent pid -> child pids, from /proc (a process that ends while it is read is skipped)."""
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (ppid := _parent(entry)):
            tree.setdefault(ppid, []).append(int(entry))
    return tree


def ancestors(pid: int) -> list[int]:
    """The pids above `pid`, its parent first, up to init."""
    out = []
    while (pid := _parent(pid)) > 0:
        out.append(pid)
    return out


def held_above(path: str | Path) -> bool:
    """Whether a process this one descends from holds a flock(2) lock on `path`: the whole run
    started under `flock PATH make bench`, say, which a second lock on PATH would wait for forever."""
    st = os.stat(path)
    file = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    holders = {int(f[4]) for f in map(str.split, Path("/proc/locks").read_text().splitlines())
               if f[1] == "FLOCK" and f[5] == file}  # a waiter's line has "->" in f[1]
    return bool(holders & set(ancestors(os.getpid())))


@contextlib.contextmanager
def locked(paths: tuple[str, ...]) -> Iterator[None]:
    """Hold an exclusive flock on each of `paths` (waiting for other holders), except those a
    process above this one already holds for it."""
    with contextlib.ExitStack() as stack:
        for path in paths:
            fh = stack.enter_context(open(path, "a"))
            if not held_above(path):
                fcntl.flock(fh, fcntl.LOCK_EX)
        yield


def descendants(pid: int) -> list[int]:
    tree, out, todo = _children(), [], [pid]
    while todo:
        kids = tree.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


def peak_rss_kb(pid: int) -> int:
    """VmHWM (the peak resident set so far) of a live process, in kB; 0 once it has ended."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


# `measure` runs its command under this small shim, which forks, execs the command and writes
# the command's own peak RSS, CPU seconds (from wait4: its workers included) and wall seconds to
# argv[1], so the shim's own start is in none of them. Measured directly, a child's ru_maxrss
# would start at its parent's size: Linux carries the replaced address space's high-water mark
# over an exec, and before the exec that space is the benchmark's (tested).
SHIM = """import os, sys, time
t0 = time.perf_counter()
pid = os.fork()
if not pid:
    os.execvp(sys.argv[2], sys.argv[2:])
status, usage = os.wait4(pid, 0)[1:]
with open(sys.argv[1], "w") as fh:
    fh.write(f"{usage.ru_maxrss} {usage.ru_utime + usage.ru_stime} {time.perf_counter() - t0}")
sys.exit(os.waitstatus_to_exitcode(status))
"""


def measure(cmd: list[str], cwd: Path = ROOT, env: dict | None = None, interval: float = 0.05) -> dict:
    """Run `cmd` to its end. Returns wall and CPU seconds (user + system, its worker processes
    included), peak RSS in MB of the command and its workers (the kernel's largest, at exit:
    `SHIM`), of the command's process itself and of its largest descendant (sampled every
    `interval` s: VmHWM only grows, so the last sample is within one interval of the truth),
    and stdout. A failing command raises with its stderr's last lines."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, \
            tempfile.NamedTemporaryFile("r") as peak:
        proc = subprocess.Popen([sys.executable, "-c", SHIM, peak.name, *map(str, cmd)], cwd=cwd, env=env,
                                stdout=out, stderr=err)
        peaks: dict[int, int] = {}
        main = None
        while True:
            pid, status, _ = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            main = main or next(iter(_children().get(proc.pid, [])), None)  # the command, under the shim
            for p in descendants(proc.pid):
                peaks[p] = max(peaks.get(p, 0), peak_rss_kb(p))
            time.sleep(interval)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(errors="replace"), err.read().decode(errors="replace")
        peak_kb, cpu, wall = (float(v) for v in (peak.read().split() or [0, 0, 0]))
    if proc.returncode:
        tail = "\n".join(stderr.strip().splitlines()[-5:])
        raise RuntimeError(f"{' '.join(map(str, cmd))}: exit {proc.returncode}\n{tail}")
    workers = [kb for p, kb in peaks.items() if p != main]
    return {"seconds": wall, "cpu_seconds": cpu,
            "peak_rss_mb": peak_kb / 1024, "main_rss_mb": (peaks.get(main) or peak_kb) / 1024,
            "worker_rss_mb": max(workers, default=0) / 1024, "stdout": stdout}


def rate_gbs(rate: str) -> float:
    """A tc rate like 200mbit in GB/s."""
    units = {"kbit": 1e3, "mbit": 1e6, "gbit": 1e9}
    unit = next(u for u in units if rate.endswith(u))
    return float(rate.removesuffix(unit)) * units[unit] / 8 / 1e9
