"""A stalled rank ends the job within a bound and by name (chexnet_hvd.stall), under every
launcher: one rank of a 2-rank run is stopped (SIGSTOP) in the middle of its training; the job
ends within --stall-timeout plus a minute, a line names that rank, and the run log ends
`stalled` with it. The run then resumes from its checkpoint: checked once, after the chief
stalled (the resume is the trainer's, whichever launcher ended the job; CI minutes are few). A
rank paused for less than the timeout does not end the job. evaluate: a rank stopped while it
scores ends the job; a chief's long report does not.
(On the Slurm rehearsal, under srun with either engine: tests/test_slurm.py.)"""

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
from conftest import BATCH_NORM_MODEL, ROOT, VENV_BIN, ranks_of, run

from chexnet_hvd import stall
from chexnet_hvd.runlog import read_runlog, stalled_in_a_row

pytestmark = [pytest.mark.slow, pytest.mark.mpi]
TIMEOUT = 10
BOUND = TIMEOUT + 60  # what --stall-timeout promises: about the timeout, plus a minute
LAUNCHERS = {
    "horovodrun": (["horovodrun", "--gloo", "-np", "2"], "horovod"),
    "mpirun": (["mpirun", "--allow-run-as-root", "--oversubscribe", "-np", "2", "--bind-to", "none",
                "--mca", "mpi_yield_when_idle", "1"], "horovod"),
    "chexnet_hvd.launch": ([sys.executable, "-m", "chexnet_hvd.launch", "-np", "2"], "tf"),
}


def into_epoch_2(proc: subprocess.Popen, run_dir) -> None:
    """Wait until the 2-rank job `proc` has logged its first epoch in `run_dir` (after its
    checkpoint), and a second more (into its second epoch)."""
    deadline = time.monotonic() + 300
    log = run_dir / "runlog.jsonl"
    while not (log.is_file() and '"event": "epoch"' in log.read_text() and len(ranks_of(run_dir)) == 2):
        assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()[0][-3000:]
        time.sleep(0.2)
    time.sleep(1)


def at_start(proc: subprocess.Popen, run_dir) -> None:
    """Wait until the 2-rank job `proc` has written its run log's start record: before its first
    step (the model built, the input and the step not yet)."""
    deadline = time.monotonic() + 300
    while not ((run_dir / "runlog.jsonl").is_file() and (run_dir / "runlog.jsonl").stat().st_size
               and len(ranks_of(run_dir)) == 2):
        assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()[0][-3000:]
        time.sleep(0.02)


# Under horovodrun (Gloo) the chief is the one stopped: the side that notices (monitor.on_stall)
# is the same code under every launcher, and mpirun's rank 1 is a stopped non-chief.
@pytest.mark.parametrize("launcher,victim,when", [
    ("horovodrun", 0, into_epoch_2), ("mpirun", 1, into_epoch_2),
    ("chexnet_hvd.launch", 1, into_epoch_2), ("mpirun", 1, at_start)],
    ids=["horovodrun-rank0", "mpirun-rank1", "launch-rank1", "mpirun-rank1-before-step-1"])
def test_a_stopped_rank_ends_the_job_by_name(records_dir, tmp_path, launcher, victim, when):
    """Stopped in epoch 2, or before the first step (the watch was armed by the first step
    only: under mpirun such a job hung with no word, Horovod's own stall shutdown blocked too)."""
    start, engine = LAUNCHERS[launcher]
    train = [sys.executable, "-m", "chexnet_hvd.train", "--data", str(records_dir), "--run-dir", str(tmp_path),
             "--model", "small_cnn", "--image-size", "32", "--batch-size", "8", "--threads", "1",
             "--verbose", "2", "--engine", engine, "--stall-timeout", str(TIMEOUT)]
    env = os.environ | {"PATH": f"{VENV_BIN}:{os.environ['PATH']}"}
    proc = subprocess.Popen([*start, *train, "--epochs", "200"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        when(proc, tmp_path)
        pid = ranks_of(tmp_path)[victim]
        os.kill(pid, signal.SIGSTOP)
        stopped = time.monotonic()
        out, _ = proc.communicate(timeout=BOUND + 60)
        ended = time.monotonic() - stopped
    finally:
        for leftover in ranks_of(tmp_path).values():  # a stopped rank outlives some launchers
            os.kill(leftover, signal.SIGKILL)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    print(f"{launcher}, rank {victim} stopped: the job ended after {ended:.1f} s")
    assert proc.returncode != 0 and ended < BOUND, (ended, out[-3000:])
    if launcher == "chexnet_hvd.launch":  # passes its workers' exit code on: the distinct one
        assert proc.returncode == stall.EXIT_STALLED, out[-3000:]
    named = [line for line in out.splitlines() if "error: stalled:" in line]
    assert named and all(f"rank {victim} " in line.split("waiting for", 1)[-1].split("heartbeat from", 1)[-1]
                         for line in named), out[-3000:]
    end = read_runlog(tmp_path)[-1]
    assert (end["event"], end["status"], end["ranks"]) == ("end", "stalled", [victim]), end
    if (launcher, victim) != ("horovodrun", 0):
        return
    epochs = [r["epoch"] for r in read_runlog(tmp_path) if r["event"] == "epoch"]
    run([*start, *train, "--resume", "--epochs", str(epochs[-1] + 1)], timeout=300, check=True)
    log = read_runlog(tmp_path)
    assert log[-1]["status"] == "completed" and [r for r in log if r["event"] == "start"][-1]["resumed_from"]


@pytest.mark.parametrize("launcher", ["mpirun", "chexnet_hvd.launch"])
def test_a_rank_stopped_before_it_joins_the_engine_ends_the_job_saying_where(records_dir, tmp_path, launcher):
    """Rank 1 stopped as soon as its process exists (before the watch runs: a node whose file
    system hangs its start-up): rank 0 waits in the engine's start (MPI_Init; the tf engine's
    cluster, inside a call that holds the GIL), which waits forever, until a start-up bound
    (--stall-timeout plus a minute) ends the job, saying what the rank waited in, in the run
    log too: its one record, a stalled end, which the Slurm templates requeue once."""
    start, engine = LAUNCHERS[launcher]
    train = [sys.executable, "-m", "chexnet_hvd.train", "--data", str(records_dir), "--run-dir", str(tmp_path),
             "--model", "small_cnn", "--image-size", "32", "--batch-size", "8", "--threads", "1",
             "--engine", engine, "--stall-timeout", str(TIMEOUT)]
    env = os.environ | {"PATH": f"{VENV_BIN}:{os.environ['PATH']}"}
    proc = subprocess.Popen([*start, *train, "--epochs", "2"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while 1 not in (pids := ranks_of(tmp_path)):
            assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()[0][-3000:]
            time.sleep(0.01)
        os.kill(pids[1], signal.SIGSTOP)
        stopped = time.monotonic()
        out, _ = proc.communicate(timeout=BOUND + 120)
        ended = time.monotonic() - stopped
    finally:
        for leftover in ranks_of(tmp_path).values():
            os.kill(leftover, signal.SIGKILL)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    print(f"{launcher}, rank 1 stopped at its start: the job ended after {ended:.1f} s")
    assert proc.returncode != 0 and ended < BOUND + 30, (ended, out[-3000:])
    # whose watcher speaks first: rank 1's (stopped in its start-up's first phase, its watcher
    # a process of its own) or rank 0's (waiting in the engine's start)
    assert re.search(rf"^error: stalled: \S+ \(pid \d+\) still (opening the records|starting the {engine} engine "
                     rf"\(waiting for every rank to join\)) after {BOUND} s of start-up \(--stall-timeout {TIMEOUT} plus a minute\); "
                     r"killing it, which ends the job$", out, re.M), out[-3000:]
    (end,) = read_runlog(tmp_path)
    assert (end["event"], end["status"]) == ("end", "stalled") and end["error"] in out, (end, out[-3000:])
    ask = [sys.executable, "-m", "chexnet_hvd.runlog", str(tmp_path)]
    assert [run([*ask, *flags], check=True).stdout for flags in ([], ["--stalled-in-a-row"])] == ["stalled\n", "1\n"]


def suspended(records_dir, run_dir, launcher: str, timeout: float, seconds: float) -> tuple[subprocess.Popen, str]:
    """A 2-rank run at --stall-timeout `timeout` with every rank and the launcher stopped
    together in its second epoch for `seconds`, then continued: the ended job and its output."""
    start, engine = LAUNCHERS[launcher]
    train = [sys.executable, "-m", "chexnet_hvd.train", "--data", str(records_dir), "--run-dir", str(run_dir),
             "--model", "small_cnn", "--image-size", "32", "--batch-size", "8", "--threads", "1", "--verbose", "2",
             "--engine", engine, "--stall-timeout", str(timeout), "--epochs", "12"]
    env = os.environ | {"PATH": f"{VENV_BIN}:{os.environ['PATH']}"}
    proc = subprocess.Popen([*start, *train], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        into_epoch_2(proc, run_dir)
        every = [proc.pid, *ranks_of(run_dir).values()]
        for pid in every:
            os.kill(pid, signal.SIGSTOP)
        time.sleep(seconds)
        for pid in every:
            os.kill(pid, signal.SIGCONT)
        return proc, proc.communicate(timeout=300)[0]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


@pytest.mark.parametrize("launcher", ["mpirun", "chexnet_hvd.launch"])
def test_a_job_suspended_whole_for_longer_than_the_timeout_goes_on(records_dir, tmp_path, launcher):
    """Every rank and the launcher stopped together (SIGSTOP: Slurm's scontrol suspend and gang
    scheduling) for 3x the timeout, then continued: no rank's peers ran meanwhile (their
    heartbeats say so), so no stall: the job completes, saying it was suspended. Each rank used
    to take its own pause for a stall and exit 76, with no end record: a suspended job died and
    was not requeued."""
    timeout = 5
    proc, out = suspended(records_dir, tmp_path, launcher, timeout, 3 * timeout)
    assert proc.returncode == 0 and "error: stalled" not in out, out[-3000:]
    assert re.search(r"^note: stall watch: the job did not run for 1[5-9] s \(suspended with every rank", out, re.M), out[-3000:]
    log = read_runlog(tmp_path)
    times = [r["time"] for r in log]
    assert log[-1]["status"] == "completed" and max(b - a for a, b in zip(times, times[1:], strict=False)) >= 3 * timeout, log


def test_a_suspension_past_the_engines_own_timeout_ends_the_attempt_as_stalled(records_dir, tmp_path):
    """The tf engine's coordination service gives up on its workers once a suspension outlasts
    its heartbeat timeout (--stall-timeout plus a minute): the collective that fails then is
    said to have failed for the suspension, and the run log ends `stalled` (the templates
    requeue it; it used to end `failed`, which they do not). Horovod over MPI and Gloo went on
    after 140 s and 80 s at a 5 s timeout."""
    proc, out = suspended(records_dir, tmp_path, "chexnet_hvd.launch", 10, 10 + stall.ENGINE_MARGIN + 8)
    assert proc.returncode == stall.EXIT_STALLED, out[-3000:]
    assert re.search(r"^error: stalled: a collective failed \(.*\) after the job was suspended for [78]\d s, longer than "
                     r"the engine's own timeout", out, re.M), out[-3000:]
    end = read_runlog(tmp_path)[-1]
    assert (end["status"], end["ranks"]) == ("stalled", []) and "suspended for" in end["error"], end
    assert end["suspended"] > 10 and stalled_in_a_row(tmp_path) == 0  # requeued, whatever came before


def reading(pid: int, folder) -> bool:
    """Whether process `pid` has a file of `folder` open (a rank reading its records)."""
    try:
        return any(os.readlink(f"/proc/{pid}/fd/{fd}").startswith(str(folder)) for fd in os.listdir(f"/proc/{pid}/fd"))
    except OSError:  # an fd closed while looked at
        return False


def test_a_rank_stopped_while_evaluating_ends_the_job_by_name_and_a_long_report_does_not(
        checkpoint, records_dir, tmp_path):
    """evaluate --stall-timeout: rank 1 stopped while it reads the test records (one image per
    batch, ten crops: seconds of scoring) ends the job within the bound, naming rank 1, exit 76;
    a bootstrap (shared by the ranks) and report longer than the timeout are no stall (they
    used to end a healthy job mid-report)."""
    evaluate = [sys.executable, "-m", "chexnet_hvd.launch", "-np", "2", sys.executable, "-m", "chexnet_hvd.evaluate",
                "--checkpoint", str(checkpoint), "--data", str(records_dir), "--engine", "tf"]
    # a timeout twice the first batch's trace on a busy machine, a bootstrap longer than it
    long_report = run([*evaluate, "--stall-timeout", "6", "--bootstrap", "3000", "--out", tmp_path / "long"],
                      timeout=600)
    assert long_report.returncode == 0 and (tmp_path / "long" / "report.json").is_file(), long_report.stderr[-3000:]
    assert json.loads((tmp_path / "long" / "report.json").read_text())["bootstrap"]["seconds"] > 6  # > the timeout
    env = os.environ | {"PATH": f"{VENV_BIN}:{os.environ['PATH']}"}
    proc = subprocess.Popen([*evaluate, "--stall-timeout", "3", "--batch-size", "1", "--tta", "tencrop",
                             "--out", str(tmp_path / "stopped")],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not ((pid := ranks_of(tmp_path / "stopped", "chexnet_hvd.evaluate").get(1)) and reading(pid, records_dir)):
            assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()[0][-3000:]
            time.sleep(0.01)
        os.kill(pid, signal.SIGSTOP)
        stopped = time.monotonic()
        out, _ = proc.communicate(timeout=BOUND + 60)
        ended = time.monotonic() - stopped
    finally:
        for leftover in ranks_of(tmp_path / "stopped", "chexnet_hvd.evaluate").values():
            os.kill(leftover, signal.SIGKILL)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    print(f"evaluate, rank 1 stopped: the job ended after {ended:.1f} s")
    assert proc.returncode == stall.EXIT_STALLED and ended < BOUND, (ended, out[-3000:])
    assert re.search(r"error: stalled: .*rank 1 ", out), out[-3000:]
    assert not (tmp_path / "stopped" / "report.json").exists()


def test_a_tf_worker_paused_for_less_than_the_stall_timeout_goes_on_and_keeps_its_thread_count(
        records_dir, tmp_path):
    """A worker of the tf engine stopped for 15 s in epoch 2 (a loaded node, a short freeze)
    with --stall-timeout 30: beyond TF's own default heartbeat timeout of 10 s, which ended such
    a job; the engine sets that one above the watchdog's bound, so the run goes on and
    completes. Its thread count stays flat: TF gives each collective with a timeout a thread
    that sleeps out the whole timeout, and with the collectives' timeout set above the stall
    timeout each worker of a 100-step run grew past 1,200 threads (a dozen a step; this run's
    96 would pass 1,000), and on 4 nodes x 2 over slow links a worker died at ~3,800
    ("Resource temporarily unavailable"), as a fast GPU job would within minutes. The tf
    engine's collectives have no timeout of their own; TF's pools stay ~140. A model with batch
    normalisation, whose statistics the workers average at every epoch's end."""
    env = os.environ | {"PATH": f"{VENV_BIN}:{os.environ['PATH']}"}
    run_dir, log = tmp_path / "run", tmp_path / "out.txt"
    with open(log, "w") as out:
        proc = subprocess.Popen([*LAUNCHERS["chexnet_hvd.launch"][0], sys.executable, "-m", "chexnet_hvd.train",
                                 "--data", str(records_dir), "--run-dir", str(run_dir), "--model",
                                 BATCH_NORM_MODEL, "--image-size", "32", "--batch-size", "4", "--threads", "1",
                                 "--verbose", "0", "--engine", "tf", "--epochs", "4", "--steps-per-epoch", "24",
                                 "--stall-timeout", "30"],
                                cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    peak, victim, stopped, deadline = {}, None, 0.0, time.monotonic() + 600  # 57 s alone, 122 s beside 16 ranks
    runlog = run_dir / "runlog.jsonl"
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            workers = ranks_of(run_dir)
            for rank, pid in workers.items():
                with contextlib.suppress(OSError):  # a worker that has just ended
                    status = open(f"/proc/{pid}/status").read()
                    peak[rank] = max(peak.get(rank, 0), int(re.search(r"Threads:\s+(\d+)", status)[1]))
            if victim is None and len(workers) == 2 and runlog.is_file() and '"event": "epoch"' in runlog.read_text():
                victim, stopped = workers[1], time.monotonic()
                os.kill(victim, signal.SIGSTOP)
            elif stopped and time.monotonic() - stopped > 15:
                os.kill(victim, signal.SIGCONT)
                stopped = 0.0
            time.sleep(0.3)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        if stopped:  # a worker still stopped when the job ended (a failure): not left behind
            with contextlib.suppress(ProcessLookupError):
                os.kill(victim, signal.SIGKILL)
    assert proc.wait() == 0 and victim and not stopped, log.read_text()[-3000:]
    assert read_runlog(run_dir)[-1]["status"] == "completed"
    print(f"peak threads per worker: {peak}")
    assert len(peak) == 2 and max(peak.values()) < 400, peak
    assert "retracing" not in log.read_text()  # nor a graph per call of its collectives (from the third epoch)


def test_who_a_stalled_rank_names():
    """Silent peers first; else ranks in a training call whose input delivered nothing for their
    step; else ranks validating or writing a checkpoint (or out of a training call) that the
    others wait for; else the ranks
    behind; else every rank (a collective that never completes). A resumed attempt (the
    run's step from its checkpoint, this process's counts from 0) names the rank behind, not
    every rank as starved of input; inside a call of several steps the starved rank is the one
    with fewer batches than the others at its step."""
    now, t = 100.0, 10

    def heard(resumed_at=0, **ranks):
        return {int(r[1:]): {"at": at, "step": resumed_at + step, "taken": step, "delivered": delivered, "idle": 0}
                for r, (at, step, delivered) in ranks.items()}

    assert stall.culprits(now, 0, heard(r0=(99, 5, 6), r1=(80, 5, 6), r2=(99, 5, 6)), t)[0] == [1]
    assert stall.culprits(now, 0, heard(r0=(99, 5, 6), r1=(99, 5, 5), r2=(99, 5, 6)), t)[0] == [1]
    assert stall.culprits(now, 0, heard(r0=(99, 6, 7), r1=(99, 5, 7), r2=(99, 6, 7)), t)[0] == [1]
    names, why = stall.culprits(now, 0, heard(r0=(99, 6, 7), r1=(99, 6, 7)), t)
    assert names == [0, 1] and "collective" in why
    assert stall.culprits(now, 0, heard(400, r0=(99, 20, 22), r1=(99, 19, 21)), t)[0] == [1]
    assert stall.culprits(now, 0, heard(400, r0=(99, 20, 22), r1=(99, 20, 20)), t)[0] == [1]
    # 8 steps per call, all ranks in the call after step 16: rank 1 waits for its 3rd batch of
    # it (18 delivered), the others hold theirs (19) and wait for rank 1 in that step's collective
    names, why = stall.culprits(now, 0, heard(r0=(99, 16, 19), r1=(99, 16, 18), r2=(99, 16, 19)), t)
    assert names == [1] and "input" in why
    names, why = stall.culprits(now, 0, heard(r0=(99, 16, 19), r1=(99, 16, 19)), t)  # a compute hang
    assert names == [0, 1] and "collective" in why
    # out of a training call every batch handed over was taken, which says nothing of the input:
    # both ranks validating (one reading a hung file system, the other waiting for its part)
    phased = {r: h | {"phase": stall.VALIDATING} for r, h in heard(r0=(99, 6, 6), r1=(99, 6, 6)).items()}
    names, why = stall.culprits(now, 0, phased, t)
    assert names == [0, 1] and "validating" in why and "input" not in why
    # the chief writing a checkpoint that does not complete; rank 1 (Horovod: no copy of its
    # own) in the next call, waiting for the chief in that step's collective, its batch in hand
    phased = heard(r0=(99, 6, 6), r1=(99, 6, 7))
    phased[0]["phase"], phased[1]["phase"] = stall.CHECKPOINTING, stall.TRAINING
    names, why = stall.culprits(now, 0, phased, t)
    assert names == [0] and why.startswith("writing a checkpoint, while the others wait")
    # ... at an epoch's end: rank 1 between calls, in the next epoch's stop agreement
    phased[1]["phase"], phased[1]["delivered"] = stall.BETWEEN, 6
    names, why = stall.culprits(now, 0, phased, t)
    assert names == [0] and why.startswith("writing a checkpoint, while the others wait")


def test_a_validation_read_that_never_returns_ends_the_job_saying_so(records_dir, tmp_path):
    """Once the run has started, the validation split's shard becomes a file whose read blocks
    (a named pipe no one writes: a hung file system), 2 ranks: after epoch 1's steps every rank
    is validating (one reading, one waiting for its part) with its processes alive; the job ends
    within the bound, naming both as validating, not as starved of input (every batch handed
    over had been taken)."""
    data = tmp_path / "records"
    data.mkdir()
    manifest = json.loads((records_dir / "manifest.json").read_text())
    hung = [data / s["file"] for s in manifest["splits"]["val"]["shards"]]
    for path in records_dir.iterdir():
        os.symlink(path, data / path.name)
    start, engine = LAUNCHERS["horovodrun"]
    run_dir = tmp_path / "run"
    train = [sys.executable, "-m", "chexnet_hvd.train", "--data", str(data), "--run-dir", str(run_dir),
             "--model", "small_cnn", "--image-size", "32", "--batch-size", "8", "--threads", "1",
             "--steps-per-epoch", "26", "--epochs", "2", "--engine", engine, "--stall-timeout", str(TIMEOUT)]
    env = os.environ | {"PATH": f"{VENV_BIN}:{os.environ['PATH']}"}
    proc = subprocess.Popen([*start, *train], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not (run_dir / "runlog.jsonl").exists():  # its checks of the records are done
            assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()[0][-3000:]
            time.sleep(0.1)
        for path in hung:
            path.unlink()
            os.mkfifo(path)
        began = time.monotonic()
        out, _ = proc.communicate(timeout=BOUND + 120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0 and time.monotonic() - began < BOUND + 60, out[-3000:]
    assert not read_runlog(run_dir)[-2].get("val_n"), out[-3000:]  # no epoch was validated
    end = read_runlog(run_dir)[-1]
    assert (end["event"], end["status"], end["ranks"]) == ("end", "stalled", [0, 1]), end
    assert "validating" in end["error"] and "input" not in end["error"], end


def test_a_peer_that_missed_heartbeats_is_waited_for_until_it_is_silent():
    """Stopped in mid-call (8 steps per call), rank 1 went quiet 4 s after the others' last
    progress: 10 s later the job is idle for the timeout, but rank 1 has been quiet for 6 s only;
    the watch waits until it is silent (then `culprits` names it alone). A peer heard within two
    intervals is not waited for."""
    now, interval, timeout = 100.0, 2.0, 10.0
    heard = {0: {"at": 100.0}, 1: {"at": 94.0}, 2: {"at": 99.0}}
    assert stall.late(now, 0, heard, interval, timeout) == [1]
    assert stall.late(now + 4.5, 0, heard | {2: {"at": 103.0}}, interval, timeout) == []  # silent now
    assert stall.late(now, 0, heard | {1: {"at": 97.0}}, interval, timeout) == []


WATCH_ALONE = """
import sys, time
from chexnet_hvd import stall
dog = stall.Watchdog(0, None, 1.0, lambda message, names: None)
dog.start([dog.announce])
dog.progress(1)  # a step: the watch is armed
if sys.argv[1] == "rest":
    dog.rest()  # fit has ended
time.sleep(4)
"""


@pytest.mark.parametrize("after_fit,code", [("rest", 0), ("no-rest", stall.EXIT_STALLED)])
def test_no_step_is_due_once_fit_has_ended(after_fit, code):
    """A rank idle for 4 x the timeout after its last step: a stall while steps are due, none
    once fit has ended (a pipeline's teardown at the end of fit outlasted a 10 s timeout on a
    loaded node and ended a finished job as stalled)."""
    proc = subprocess.run([sys.executable, "-c", WATCH_ALONE, after_fit], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == code, proc.stderr


# Two watchdogs that find each other through a folder (argv: rank, folder), at TIMEOUT s; each
# prints the ranks it names.
PAIR = """
import ctypes, json, os, sys, time
from pathlib import Path
from chexnet_hvd import stall
rank, folder = int(sys.argv[1]), Path(sys.argv[2])
dog = stall.Watchdog(rank, None, TIMEOUT, lambda message, names: print(json.dumps(names), flush=True))
(folder / f"{rank}.tmp").write_text(json.dumps(dog.announce))
os.replace(folder / f"{rank}.tmp", folder / str(rank))
while not all((folder / str(r)).exists() for r in (0, 1)):
    time.sleep(0.05)
dog.start([tuple(json.loads((folder / str(r)).read_text())) for r in (0, 1)])
"""
PEER = PAIR.replace("TIMEOUT", "15.0") + """
dog.progress(1)  # both armed; rank 1 then waits in a collective, rank 0 works on
if rank == 0:
    time.sleep(8)
    dog.progress()  # its last progress
    time.sleep(5)
    print("holding", flush=True)
    ctypes.PyDLL(None).sleep(8)  # a call that keeps the GIL: no other thread of this rank runs
time.sleep(60)
"""


def test_heartbeats_read_late_by_a_starved_rank_count_from_when_they_arrived(tmp_path):
    """Rank 0 holds the GIL for 8 s of a 15 s timeout (its heartbeat threads cannot run, as when
    a loaded node starves a rank of the CPU); rank 1, idle in a collective, is stopped 4 s in
    (after at least one heartbeat, 3 s apart, has queued at rank 0). Read when rank 0 runs
    again, that heartbeat once looked seconds fresher than it was: rank 1 was not yet late when
    the job's idle time passed the timeout, and rank 0 named every rank. Each now counts from
    its arrival: rank 0 waits until rank 1 is silent and names it alone."""
    procs = [subprocess.Popen([sys.executable, "-c", PEER, str(rank), str(tmp_path)], cwd=ROOT, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for rank in (0, 1)]
    try:
        assert procs[0].stdout.readline() == "holding\n", procs[0].communicate(timeout=60)
        time.sleep(4)
        os.kill(procs[1].pid, signal.SIGSTOP)
        out, err = procs[0].communicate(timeout=60)
    finally:
        for proc in procs:
            proc.kill()
    assert procs[0].returncode == stall.EXIT_STALLED and "did not run" not in err, err
    assert json.loads(out.splitlines()[-1]) == [1], err
    assert "no heartbeat for more than 15 s" in err, err


WAITING = PAIR.replace("TIMEOUT", "3.0") + """
dog.progress(1)  # both armed, then wait in a collective
print("started", flush=True)
time.sleep(60)
"""


def test_a_rank_stopped_alone_and_continued_leaves_where_a_suspended_job_goes_on(tmp_path):
    """Rank 1 stopped for 8 s at a 3 s timeout while rank 0 runs (waiting in a collective):
    rank 0 names it and ends the job; rank 1, continued, finds rank 0's heartbeats of the meantime queued (it was stopped
    alone, not suspended with the job) and leaves saying so, exit 76."""
    procs = [subprocess.Popen([sys.executable, "-c", WAITING, str(rank), str(tmp_path)], cwd=ROOT, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for rank in (0, 1)]
    try:
        assert [p.stdout.readline() for p in procs] == ["started\n"] * 2, procs[0].communicate(timeout=10)
        os.kill(procs[1].pid, signal.SIGSTOP)
        stopped = time.monotonic()
        out, err = procs[0].communicate(timeout=30)
        assert (procs[0].returncode, json.loads(out.splitlines()[-1])) == (stall.EXIT_STALLED, [1]), err
        time.sleep(max(0.0, stopped + 8 - time.monotonic()))
        os.kill(procs[1].pid, signal.SIGCONT)
        _, err = procs[1].communicate(timeout=30)
    finally:
        for proc in procs:
            proc.kill()
    assert procs[1].returncode == stall.EXIT_STALLED, err
    assert re.search(r"^error: stalled: rank 1 did not run for \d+ s \(stopped or frozen\)", err, re.M), err


def test_a_stall_under_gang_scheduling_still_ends_the_job(tmp_path):
    """Two ranks waiting in a collective that never completes (a stall), the whole job paused
    for 1.5 s of every 2 (gang scheduling's time slices, shorter than the 3 s timeout): the
    pauses count as time, so the stall ends the job within about the timeout plus the pauses.
    Pauses of two heartbeat intervals once restarted the clocks, and such a job never ended."""
    procs = [subprocess.Popen([sys.executable, "-c", WAITING, str(rank), str(tmp_path)], cwd=ROOT, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for rank in (0, 1)]
    try:
        assert [p.stdout.readline() for p in procs] == ["started\n"] * 2, procs[0].communicate(timeout=10)
        deadline = time.monotonic() + 20  # the timeout plus its pauses, many times over
        while procs[0].poll() is None and time.monotonic() < deadline:
            for signum, seconds in ((signal.SIGSTOP, 1.5), (signal.SIGCONT, 0.5)):
                for proc in procs:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(proc.pid, signum)
                time.sleep(seconds)
        ended_paused = procs[0].poll() is not None
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGCONT)
        out, err = procs[0].communicate(timeout=30)
    finally:
        for proc in procs:
            proc.kill()
    assert ended_paused and procs[0].returncode == stall.EXIT_STALLED and "error: stalled: " in err, err


def test_a_heartbeat_counts_from_when_it_arrived_not_when_it_was_read():
    """The kernel's stamp of a datagram's arrival: one read 1.5 s after it arrived waited that
    long; without a stamp, no wait is assumed."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as reader, \
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
        reader.bind(("127.0.0.1", 0))
        reader.setsockopt(socket.SOL_SOCKET, stall.SO_TIMESTAMPNS, 1)
        sender.sendto(b"{}", reader.getsockname())
        time.sleep(1.5)
        _, ancillary, _, _ = reader.recvmsg(4096, socket.CMSG_SPACE(16))
    assert 1.4 < stall.queued(ancillary) < 60, ancillary
    assert stall.queued([]) == 0.0


def test_a_heartbeat_queued_unread_is_noted_before_a_stall_is_decided():
    """A starved rank's listener had not read a peer's last beat when its watch decided the
    peer was silent; the beat, read before the names were, made the peer look heard and the
    job named every rank. The watch reads what has queued first, without waiting (an empty
    queue returns at once: a read that waited would hold the watch's own heartbeats): the peer
    is heard, at its newest beat's arrival; an older beat read after it is dropped, and stray
    datagrams are ignored (they once could end the thread that read them)."""
    dog = stall.Watchdog(0, None, 10.0, lambda message, names: None)
    with dog.sock, dog.queue, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as peer:
        dog.heard = {r: {"at": time.monotonic() - 20, "step": 0, "taken": 0, "delivered": 1, "idle": 0.0}
                     for r in (0, 1)}
        began = time.monotonic()
        dog.read_queued()
        assert time.monotonic() - began < 0.1 and dog.silent_peers(10.0) == [1]
        for stray in ({"rank": [1]}, {"rank": 1, "beat": "x"}, {"rank": 1, "beat": 5}):
            peer.sendto(json.dumps(stray).encode(), ("127.0.0.1", dog.announce[1]))
        for number, step in ((2, 3), (1, 2)):  # the newer beat first, then an older one
            beat = {"rank": 1, "beat": number, "step": step, "taken": step, "delivered": step + 1, "idle": 0.5,
                    "phase": stall.TRAINING}
            peer.sendto(json.dumps(beat).encode(), ("127.0.0.1", dog.announce[1]))
        time.sleep(0.5)
        began = time.monotonic()
        dog.read_queued()
        assert time.monotonic() - began < 0.1
    assert dog.silent_peers(10.0) == [] and dog.reached == {1} and dog.heard[1]["step"] == 3
    assert 0.3 < time.monotonic() - dog.heard[1]["at"] < 5, dog.heard[1]
