"""A stalled rank ends the job, with a name and within a bound (--stall-timeout).

A collective waits for every rank, forever under MPI: one rank stopped, killed without its
launcher noticing, cut off from the network or stuck reading its input would hold a multi-node
job until its time limit. So every rank runs a `Watchdog`, a thread beside the training loop:

- the loop calls `progress()` after every call of the training step (--steps-per-execution
  steps), validation batch and checkpoint write, and as it enters each (one attribute store;
  the phase it is in: in a training call, between calls, validating, writing a checkpoint);
- every `interval` seconds each rank sends every other rank a heartbeat (a UDP datagram: rank,
  step, input batches delivered, seconds since its last progress) to the address it announced
  at start, and notes the heartbeats it receives, each at the time it arrived (`queued`);
- when no rank has made progress for `timeout` seconds while steps are due (as far as this
  rank knows: its own clock, and each peer's as last reported plus the age of that report; a
  peer that has missed heartbeats is first given until it is silent: `late`), or when a peer
  it has heard from has sent none for `timeout` seconds and this rank has made no progress
  either, whether steps are due or not (before the first step, between fits, at the last
  barrier: a live process always beats), the rank ends the job: it names the
  ranks it stopped hearing from (stopped, killed, or cut off: their host), else the ranks in
  a training call whose input pipeline delivered no batch for the step they wait for, else
  the ranks validating or writing a checkpoint while the others wait (out of a training call
  while the others wait in one), else the ranks at the lowest step (everyone else waits for
  them in a collective); prints one line;
  the chief (or, when the chief is the one stalled, the lowest rank still running, after a
  grace period) writes the run log's end record, status `stalled`; and the process exits with
  EXIT_STALLED. The launcher then ends the others (srun --kill-on-bad-exit, mpirun, horovodrun
  and chexnet_hvd.launch all end a job when a rank fails); a rank that is still alive after the
  grace period exits too.

A rank that did not run for longer than the timeout (stopped, frozen) tells from the peers'
heartbeats queued meanwhile whether it was stopped alone (it leaves: the others end the job) or
with every rank (the job suspended, as Slurm's scontrol suspend does: the pause does not count
as time without progress); an engine that gave up on its peers during such a suspension ends
the attempt as stalled. Shorter pauses (gang scheduling's time slices) count as time.

Until the Watchdog runs (every rank joined the engine and announced its address), `StartUp`
bounds each rank's start-up from a small process of its own: past the timeout plus a minute it
says what the rank was doing, writes the run log's end record, status `stalled` (one per
attempt, whichever rank's watcher fires first), and kills it.

Heartbeats are threads of their own, so they run while the training thread is blocked inside
a collective (TensorFlow and Horovod release the GIL there); a stopped process sends none. The
engines' own timeouts are set above `timeout`, as the second line of defence: Horovod's and
Gloo's (`engine_timeouts`), TF's heartbeat (chexnet_hvd.tf_engine; its collectives get none).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

EXIT_STALLED = 76  # distinct from 75 (preempted: requeue me) and 1/2 (failed, bad input)
START_UP_SLACK = 60  # a start-up's bound: --stall-timeout plus this (StartUp)
ENGINE_MARGIN = 60  # the engines' own timeouts: at least --stall-timeout plus this (engine_timeouts)
SO_TIMESTAMPNS = 35  # Linux's (asm-generic/socket.h): the kernel stamps each datagram on arrival
# What a rank is doing (its heartbeat says): only a rank in a training call waits for its input.
TRAINING, BETWEEN, VALIDATING, CHECKPOINTING = (
    "in a training call", "between training calls", "validating", "writing a checkpoint")


def engine_timeouts(timeout: float) -> dict[str, str]:
    """Environment for the engines' own stall limits, above ours so that ours speaks first:
    Horovod's stall inspector shuts down (it only warns by default) and Gloo's receive timeout
    (30 s by default) waits longer."""
    if timeout <= 0:
        return {}
    return {"HOROVOD_STALL_CHECK_TIME_SECONDS": str(int(max(1, min(60, timeout / 2)))),
            "HOROVOD_STALL_SHUTDOWN_TIME_SECONDS": str(int(timeout + 2 * ENGINE_MARGIN)),
            "HOROVOD_GLOO_TIMEOUT_SECONDS": str(int(timeout + ENGINE_MARGIN))}


def interval_for(timeout: float) -> float:
    """Seconds between heartbeats: several per timeout, at most 10."""
    return max(0.2, min(10.0, timeout / 5))


def silent(heard: dict[int, dict], me: int, now: float, after: float) -> list[int]:
    """The ranks other than `me` whose last heartbeat in `heard` arrived over `after` s before `now`."""
    return sorted(r for r, h in heard.items() if r != me and now - h["at"] > after)


def culprits(now: float, me: int, heard: dict[int, dict], timeout: float) -> tuple[list[int], str]:
    """Whom a rank with no progress for `timeout` names, and why, from the heartbeats `heard`
    ({rank: {"at": when it arrived (monotonic), "step": the run's, "taken": steps this process
    took, "delivered": input batches this process's pipeline handed over, "idle", "phase"}})
    of its peers and its own (`me`, at `now`). A resumed attempt's step starts where the
    checkpoint left off, its counts at 0: starved compares the counts."""
    if gone := silent(heard, me, now, timeout):
        return gone, f"no heartbeat for more than {timeout:g} s (stopped, killed, or cut off)"
    # Starved: in a training call with no batch beyond the steps taken, or (inside a call of
    # several steps, which the step counts do not see) fewer batches than another rank at the
    # same step: ranks step together, so the others hold the batch of the step this one waits
    # for. Out of a call every batch handed over has been taken: that says nothing.
    in_call = {r: h for r, h in heard.items() if h.get("phase", TRAINING) == TRAINING}
    if in_call:
        top = max(h["step"] for h in in_call.values())
        level = max(h["delivered"] for h in in_call.values() if h["step"] == top)
        starved = sorted(r for r, h in in_call.items()
                         if h["delivered"] <= h["taken"] or (h["step"] == top and h["delivered"] < level))
        if starved:
            return starved, "its input pipeline delivered no batch for the step it is at"
    # Out of a call and busy (validating, writing a checkpoint) while others wait: in a training
    # call, or between calls (Horovod's other ranks go on to the next epoch's stop agreement
    # while the chief writes its checkpoint): the busy ones hold them.
    away = sorted(r for r in heard if r not in in_call)
    busy = [r for r in away if heard[r].get("phase") != BETWEEN]
    named = busy if busy and len(busy) < len(heard) else away if in_call else []
    doing = " / ".join(sorted({heard[r].get("phase", TRAINING) for r in named or away}))
    if named:
        return named, f"{doing}, while the others wait for it"
    lowest = min(h["step"] for h in heard.values())
    behind = sorted(r for r, h in heard.items() if h["step"] == lowest)
    if len(behind) < len(heard):
        return behind, f"at step {lowest}, behind the others, which wait for it in a collective"
    return behind, (f"every rank at step {lowest}, {doing or TRAINING}, inside a collective (or a "
                    "read or write) that does not complete")


def late(now: float, me: int, heard: dict[int, dict], interval: float, timeout: float) -> list[int]:
    """Peers that have missed heartbeats (none for two intervals) but are not yet silent (none
    for `timeout`): a rank stopped in mid-call, after the others' last progress, has been quiet
    for less than the job has been idle; its silence is waited for, so that it, not every rank,
    is named."""
    return sorted(r for r, h in heard.items() if r != me and 2 * interval < now - h["at"] <= timeout)


class Watchdog:
    """One rank's stall watch (see the module docstring). `announce` is this rank's heartbeat
    address, to be gathered from every rank and given to `start`."""

    def __init__(self, rank: int, hosts: list[str] | None, timeout: float,
                 on_stall: Callable[[str, list[int]], None],
                 count_delivered: Callable[[], int] | None = None):
        self.rank, self.timeout, self.on_stall = rank, timeout, on_stall
        self.grace = min(30.0, max(5.0, timeout))  # what the others give the chief to speak first
        # input batches this rank's pipeline handed over (unknown: never taken for starved)
        self.count_delivered = count_delivered or (lambda: self.taken + 1)
        self.interval = interval_for(timeout)
        self.step = 0  # the run's step, as the trainer counts it (from a checkpoint's on resume)
        self.taken = 0  # steps this process took
        self.phase = BETWEEN
        self.delivered = 0
        self.last_progress = time.monotonic()
        self.armed = False
        self.warned = False
        self.suspended: tuple[float, float] | None = None  # the job's last suspension: (its end, seconds)
        self.last_tick = time.monotonic()  # the watch's last tick: a pause since is not judged yet
        self.heard: dict[int, dict] = {}
        self.reached: set[int] = set()  # peers whose heartbeats have arrived (their address works)
        self.peers: list[tuple[str, int]] = []
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("0.0.0.0", 0))
        self.sock.settimeout(self.interval)
        self.hosts = hosts
        if sys.platform.startswith("linux"):  # arrival stamps: see `queued`
            with contextlib.suppress(OSError):
                self.sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        # the same socket, never waiting: the watch reads what has queued (`read_queued`) while
        # the listener waits on the socket above (its timeout makes every read wait for data)
        self.queue = socket.socket(fileno=os.dup(self.sock.fileno()))
        self.queue.setblocking(False)
        self.beats = 0  # heartbeats sent: a beat read after a later one of the same peer is dropped
        self._stop = threading.Event()
        self._lock = threading.Lock()

    @property
    def announce(self) -> tuple[str, int]:
        return own_address(self.hosts or [], socket.gethostname()), self.sock.getsockname()[1]

    def start(self, addresses: list[tuple[str, int]]) -> None:
        """Begin heartbeats to `addresses` (every rank's `announce`, in rank order)."""
        self.peers = [(resolve(host), port) for host, port in addresses]
        now = time.monotonic()
        self.heard = {r: {"at": now, "step": 0, "taken": 0, "delivered": 1, "idle": 0.0, "phase": BETWEEN}
                      for r in range(len(addresses))}
        for target in (self._listen, self._watch):
            threading.Thread(target=target, daemon=True, name=f"stall-{target.__name__}").start()

    def progress(self, step: int | None = None, steps: int = 1, phase: str | None = None) -> None:
        """A call of the training step (`steps` steps, up to the run's `step`: then between
        calls), a validation batch or a checkpoint write completed, or `phase` entered: the
        clock starts again (and, from the first training step on, the watch is armed)."""
        self.last_progress = time.monotonic()
        if step is not None:
            self.step, self.armed, self.phase = step, True, BETWEEN
            self.taken += steps
        if phase:
            self.phase = phase

    def rest(self) -> None:
        """Training has ended (or a resumed part's fit has, before the next begins): no step is
        due, so no time without one is a stall (a pipeline's teardown at the end of fit took
        over 10 s on a loaded node); the next step arms the watch again. A silent peer still
        ends the job."""
        self.armed = False

    def stop(self) -> None:
        self._stop.set()

    def silent_peers(self, after: float) -> list[int]:
        """Ranks not heard from for `after` seconds (a failed collective asks who is gone)."""
        return silent(dict(self.heard), self.rank, time.monotonic(), after)

    def _listen(self) -> None:
        while not self._stop.is_set():
            self._receive(self.sock)

    def read_queued(self) -> None:
        """Note the heartbeats that have arrived but not been read (a rank starved of the CPU
        runs its listener late): a decision on what had been read named every rank once, the
        beat read between the decision and the naming having made the silent peer look heard."""
        for _ in range(1024):  # bounded: peers beat a few times per interval
            if not self._receive(self.queue):
                return

    def _receive(self, sock: socket.socket) -> bool:
        """Read one datagram from `sock` (the listener's waits up to an interval for one, the
        queue's does not wait) and note it if it is a peer's heartbeat; False when none came."""
        try:
            data, ancillary, _, _ = sock.recvmsg(4096, socket.CMSG_SPACE(16))
        except (TimeoutError, BlockingIOError):
            return False
        except OSError:  # e.g. an ICMP error of an earlier send to a peer that is gone
            return True
        try:
            payload = json.loads(data)
        except ValueError:
            return True
        if isinstance(payload, dict) and isinstance(rank := payload.get("rank"), int) and rank in self.heard:
            with self._lock, contextlib.suppress(KeyError, TypeError):  # a stray datagram is no beat
                if "beat" in payload and payload["beat"] <= self.heard[rank].get("beat", 0):
                    return True  # older than the one noted (two threads read)
                # never earlier than the beat before it (they arrive in order): a step of the wall
                # clock while a beat waited would make a live peer look silent
                arrived = max(time.monotonic() - queued(ancillary), self.heard[rank]["at"])
                self.heard[rank] = {"at": arrived, **{
                    key: payload[key] for key in ("step", "taken", "delivered", "idle")}, "beat": payload.get("beat", 0),
                    "phase": payload.get("phase", TRAINING)}
                self.reached.add(rank)
        return True

    def _watch(self) -> None:
        seen: dict[int, int] = {}
        self.last_tick = time.monotonic()
        while not self._stop.is_set():  # a beat at once, then every interval
            now = time.monotonic()
            if now - self.last_tick > self.timeout:  # this process did not run (stopped, frozen)
                if self._stopped_alone(seen):
                    self._was_stopped(now - self.last_tick)
                    return
                self._resumed(now, now - self.last_tick)
            self.last_tick = now
            seen = {r: h.get("beat", 0) for r, h in self.heard.items()}  # the peers' beats by this tick
            idle = now - self.last_progress
            self.delivered = self.count_delivered()
            mine = {"step": self.step, "taken": self.taken, "delivered": self.delivered, "idle": idle,
                    "phase": self.phase}
            self.beats += 1
            beat = json.dumps({"rank": self.rank, "beat": self.beats, **mine, "idle": round(idle, 1)}).encode()
            for address in self.peers:
                try:
                    self.sock.sendto(beat, address)
                except OSError:
                    pass  # a peer we cannot reach is what the others will report
            self.heard[self.rank] = {"at": now, **mine}
            self.read_queued()
            now, heard = time.monotonic(), dict(self.heard)  # one view: the decision's and the names'
            if now - self.last_tick > self.timeout:
                continue  # this process was stopped within this tick: the next one's start judges it
            # the job's idle time: the least any rank has been without progress (a slow peer
            # still working, e.g. writing a checkpoint, keeps the others waiting, not stalled)
            job_idle = min(h["idle"] + now - h["at"] for h in heard.values())
            # A peer once heard and silent since (stopped, killed, cut off) stalls the job when
            # this rank has made no progress either, whether steps are due or not: before the
            # first step, between fits, at the last barrier. (While this rank progresses, its
            # collectives complete: the peer lives, its heartbeats are what got lost.)
            gone = set(silent(heard, self.rank, now, self.timeout))
            if (gone & self.reached and idle > self.timeout) or (self.armed and job_idle > self.timeout
                        and not late(now, self.rank, heard, self.interval, self.timeout)):
                self._stalled(now, idle, heard)
                return
            if self.rank == 0 and not self.warned and (deaf := sorted(gone - self.reached)):
                self.warned = True  # a peer never heard: its address does not reach the chief
                print(f"warning: stall watch: no heartbeat from rank(s) {', '.join(map(str, deaf))} has "
                      f"reached rank 0 since the start (their announced address: "
                      f"{', '.join(f'{self.peers[r][0]}:{self.peers[r][1]}' for r in deaf)}): it sees "
                      "them only through the others' progress", file=sys.stderr, flush=True)
            self._stop.wait(self.interval)

    def _stopped_alone(self, seen: dict[int, int]) -> bool:
        """After this process did not run for a while: whether its peers ran meanwhile (a rank
        stopped alone, which they end the job for past the timeout), or were stopped with it
        (the whole job suspended, as Slurm's `scontrol suspend` and gang scheduling do with
        SIGSTOP: no stall). The heartbeats queued meanwhile tell (`seen`: each peer's beat as of
        the last tick, before this process stopped): a peer stopped too sent the few around the
        suspension's start and end, one that ran sent one per interval until it ended the job,
        a timeout later (at least 5 at a timeout of 50 s or less; with the socket's buffer, a
        few hundred shared by the peers, more than 3 each up to ~64 ranks)."""
        self.read_queued()
        return any(self.heard[r].get("beat", 0) - seen.get(r, 0) > 3 for r in self.heard if r != self.rank)

    def _resumed(self, now: float, seconds: float) -> None:
        """The whole job was suspended for `seconds`: no step was due, no peer was silent; the
        stall clocks leave the pause out (this rank's time without progress, each peer's since
        its last heartbeat)."""
        self.last_progress, self.suspended = min(now, self.last_progress + seconds), (now, seconds)
        with self._lock:
            for heard in self.heard.values():
                heard["at"] = min(now, heard["at"] + seconds)
        if self.rank == 0:
            print(f"note: stall watch: the job did not run for {seconds:.0f} s (suspended with every rank, "
                  "e.g. scontrol suspend); the pause does not count", file=sys.stderr, flush=True)

    def just_suspended(self) -> float | None:
        """Seconds of a suspension of the whole job that ended less than ENGINE_MARGIN ago (the
        engines' own timeouts, set above ours, may have run out meanwhile: they fail their
        collectives at once, or at their next check), or of a pause past the timeout that the
        watch has not judged yet (the engine's error came first); else None."""
        now = time.monotonic()
        if now - self.last_tick > self.timeout and not self._stop.is_set():
            return now - self.last_tick
        if self.suspended and now - self.suspended[0] < ENGINE_MARGIN:
            return self.suspended[1]
        return None

    def _was_stopped(self, seconds: float) -> None:
        """This rank was the stalled one and runs again: its peers have ended (or are ending)
        the job and written its end; it only says so and leaves."""
        print(f"error: stalled: rank {self.rank} did not run for {seconds:.0f} s (stopped or frozen); "
              f"the other ranks end the job (exit {EXIT_STALLED})", file=sys.stderr, flush=True)
        os._exit(EXIT_STALLED)

    def _stalled(self, now: float, idle: float, heard: dict[int, dict]) -> None:
        names, why = culprits(now, self.rank, heard, self.timeout)
        where = ", ".join(f"rank {r}" + (f" ({self.hosts[r]})" if self.hosts else "") for r in names)
        message = (f"stalled: no progress on rank {self.rank} for {idle:.0f} s "
                   f"(--stall-timeout {self.timeout:g}); waiting for {where}: {why}")
        print(f"error: {message}; ending the job (exit {EXIT_STALLED})", file=sys.stderr, flush=True)
        alive = [r for r in sorted(heard) if r not in names]
        writer = alive[0] if alive else self.rank
        if self.rank != 0:  # the chief speaks first when it can (its exit ends the job); a rank
            # that cannot hear it (it stopped, or a cut link between them) waits, then writes
            # the end record if it is the lowest rank it hears, or leaves
            time.sleep(self.grace)
        try:
            self.on_stall(message, names if self.rank == writer else [])
        finally:
            os._exit(EXIT_STALLED)


class StartUp:
    """The bound on a rank's start-up, before its Watchdog runs: until every rank has joined the
    engine and announced its heartbeat address, no rank can hear another's silence, and a rank
    stuck there (a file system that never answers its read of the records; a peer that never
    joins MPI_Init or the tf engine's cluster, which wait forever, the latter inside a call that
    holds the GIL, where no thread of this process can act) would hold the job until its time
    limit. So a small process of its own watches it: past `timeout` plus a minute (the
    Watchdog's bound) it says what the rank was doing, logs the stall and kills the rank; the
    launcher then ends the others. A context: the bound ends with the block (the Watchdog
    running, or an error)."""

    def __init__(self, timeout: float, run_log: Path | None = None, record: dict | None = None):
        """`run_log` and `record`: where the watcher that kills its rank writes `record` (a run
        log's stalled end record, less the error and hosts it adds), when its folder exists."""
        self.timeout, self.seconds = timeout, timeout + START_UP_SLACK
        self._watcher = None
        if timeout > 0:
            log = [str(run_log), json.dumps(record)] if run_log is not None and record is not None else []
            self._watcher = subprocess.Popen(  # this file as a script (isolated: it needs only the
                # standard library), not the package, which imports TensorFlow
                [sys.executable, "-I", os.path.abspath(__file__), str(os.getpid()), str(self.seconds), str(timeout),
                 *log], stdin=subprocess.PIPE, text=True)

    def at(self, phase: str) -> None:
        """What the rank does from now on (`phase`: `opening the records`, ...)."""
        if self._watcher:
            with contextlib.suppress(OSError):  # a watcher gone (killed): no bound, no failure
                self._watcher.stdin.write(phase + "\n")
                self._watcher.stdin.flush()

    def __enter__(self) -> StartUp:
        return self

    def __exit__(self, *exc) -> None:
        if self._watcher:
            with contextlib.suppress(OSError):
                self._watcher.stdin.close()  # its end: it leaves
            self._watcher.wait()


def watch_start_up() -> None:
    """StartUp's watcher: `PID SECONDS TIMEOUT [RUN_LOG RECORD]` as arguments, the rank's phases
    on stdin (its end: the start-up is over, or the rank is gone)."""
    pid, seconds, timeout = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
    log = (Path(sys.argv[4]), json.loads(sys.argv[5])) if len(sys.argv) > 5 else None
    begun: list[int] = []  # where this attempt's records begin (another rank's watcher may write
    # its stall first); in a thread, as the write below: a file system that hangs must not hold
    # this process, whose kill is the bound
    if log:
        threading.Thread(target=lambda: begun.append(log_size(log[0])), daemon=True).start()
    for sig in (signal.SIGINT, signal.SIGUSR1, signal.SIGTERM):  # the rank's to act on: its end ends this
        signal.signal(sig, signal.SIG_IGN)
    deadline, phase, fd = time.monotonic() + seconds, "starting", sys.stdin.fileno()
    while (left := deadline - time.monotonic()) > 0:
        if select.select([fd], [], [], left)[0]:
            lines = os.read(fd, 4096).decode(errors="replace")  # unbuffered: no line left unseen
            if not lines:
                return
            phase = lines.strip().splitlines()[-1] if lines.strip() else phase
    message = (f"stalled: {socket.gethostname()} (pid {pid}) still {phase} after {seconds:g} s of start-up "
               f"(--stall-timeout {timeout:g} plus a minute); killing it, which ends the job")

    def report() -> None:  # before the kill: once the rank dies, srun ends this process too
        with contextlib.suppress(OSError):
            print(f"error: {message}", file=sys.stderr, flush=True)
        if log and begun and begun[0] is not None:
            log_stall(log[0], begun[0], {**log[1], "time": round(time.time(), 3), "error": message,
                                         "hosts": [socket.gethostname()]})

    reporter = threading.Thread(target=report, daemon=True)
    reporter.start()
    reporter.join(10)  # bounded: a file system or a reader that hangs must not save the rank
    with contextlib.suppress(ProcessLookupError):  # gone meanwhile
        os.kill(pid, signal.SIGKILL)


def log_size(path: Path) -> int | None:
    """The size of the run log `path` (0 when there is none yet; None when it cannot be read)."""
    try:
        return path.stat().st_size if path.exists() else 0
    except OSError:
        return None


def log_stall(path: Path, begun: int, record: dict) -> None:
    """Append `record` to the run log `path`, unless a stall is logged past byte `begun` (every
    rank's watcher may fire: one record per attempt, so the Slurm templates requeue it once).
    Locked (POSIX locks, which NFS keeps too; where the file system refuses them, a marker
    file created exclusively, named after `begun`) against the other watchers. A torn last
    line is ended first, as chexnet_hvd.runlog's writer does (this script cannot import the
    package: it runs isolated). A log that cannot be written (or its folder gone): the job
    still ends."""
    if not path.parent.is_dir():
        return
    with contextlib.suppress(OSError), open(path, "a+b") as fh:
        try:
            fcntl.lockf(fh, fcntl.LOCK_EX)
        except OSError:
            os.close(os.open(path.parent / f".{path.name}.stall-{begun}", os.O_CREAT | os.O_EXCL))  # or leave
        fh.seek(min(begun, fh.seek(0, os.SEEK_END)))
        for line in fh.read().splitlines():
            with contextlib.suppress(ValueError, AttributeError):  # a torn line, not a record
                if json.loads(line).get("status") == record["status"]:
                    return
        if fh.tell() and (fh.seek(-1, os.SEEK_END), fh.read(1))[1] != b"\n":
            fh.write(b"\n")
        fh.write((json.dumps(record) + "\n").encode())
        fh.flush()
        os.fsync(fh.fileno())


def watch(engine, hosts: list[str], timeout: float, on_stall: Callable[[str, list[int]], None],
          count_delivered: Callable[[], int] | None = None) -> Watchdog:
    """A started Watchdog for this rank of `engine` (every rank calls it: the heartbeat
    addresses are gathered, a collective)."""
    watchdog = Watchdog(engine.rank, hosts, timeout, on_stall, count_delivered)
    watchdog.start(engine.allgather_object(watchdog.announce))
    return watchdog


def queued(ancillary: list[tuple[int, int, bytes]]) -> float:
    """Seconds a datagram waited in the socket's queue before it was read, from the kernel's
    stamp of its arrival (SO_TIMESTAMPNS, wall clock; 0 without one). A rank starved of the CPU
    (a loaded node, a thread holding the GIL) reads seconds of queued heartbeats at once: read
    times would make a peer stopped meanwhile look just heard, and the job named every rank."""
    for level, kind, raw in ancillary:
        if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(raw) >= 16:
            seconds, nanoseconds = struct.unpack("qq", raw[:16])
            return max(0.0, time.time() - seconds - nanoseconds * 1e-9)
    return 0.0


def own_address(hosts: list[str], me: str) -> str:
    """This rank's IPv4 address as the other nodes reach it: the source address of the route to
    another rank's host (`hosts`: every rank's), not what its own hostname resolves to (Debian's
    /etc/hosts maps it to 127.0.1.1, where no other node can send); with no other host, its own."""
    for host in dict.fromkeys(h for h in hosts if h != me):
        with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect((socket.gethostbyname(host), 9))  # a datagram socket's connect sends nothing
            return probe.getsockname()[0]
    return resolve(me)


def resolve(host: str) -> str:
    """An IPv4 address of `host` (a rank's own hostname; loopback when it is this one and has none)."""
    try:
        return socket.gethostbyname(host)
    except OSError:
        return "127.0.0.1"


if __name__ == "__main__":  # StartUp's watcher
    watch_start_up()
