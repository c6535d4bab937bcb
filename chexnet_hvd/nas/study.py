"""The shared Optuna study every worker coordinates through (core Optuna, no TensorFlow).

Storage: a journal file in the study directory by default (an append-only log that works on a
shared filesystem without a server) or any SQLAlchemy URL, e.g. postgresql://user@host/db.
A trial's params are the 8 layer ops L1..L8; its value the best mean validation AUROC; its user
attributes who trains it (host, pid, Slurm job and task) and what it cost (params, memory, time).

Claiming a candidate happens under a lock file in the study directory, so that no two workers
ever train the same network: re-queue the trials of dead workers, count the budget, pop a
re-queued trial or enqueue the proposer's pick, and `ask` for it. A dead worker's trial is told
FAIL and enqueued again with `retry_of`; the retry resumes from the candidate's checkpoints.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import random
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import optuna
from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock, JournalStorage
from optuna.trial import FrozenTrial, TrialState

from chexnet_hvd.cli import InputError
from chexnet_hvd.nas import space
from chexnet_hvd.nas.proposers import Proposer, Tried, tried_keys

STUDY_NAME = "chexnet_nas"
JOURNAL = "journal.log"
LOCK = "claim.lock"
LOCK_GRACE_S = 60  # a lock file older than this was left by a killed worker: break it
SLURM_ALIVE = {"RUNNING", "COMPLETING", "CONFIGURING", "SUSPENDED", "STOPPED", "RESIZING"}

optuna.logging.set_verbosity(optuna.logging.WARNING)


# ---------------------------------------------------------------- storage --------------------
def open_study(study_dir: str | Path, storage_url: str = "", task: dict | None = None) -> optuna.Study:
    """Create or load the study. `task` (data, image size, epochs, ...) is stored when the study
    is created; a worker started with another task is refused, so one study compares like with like."""
    study_dir = Path(study_dir)
    if not storage_url and task is None and not (study_dir / JOURNAL).is_file():
        raise InputError(study_dir, f"no study here ({JOURNAL} not found)")
    study_dir.mkdir(parents=True, exist_ok=True)
    with claim_lock(study_dir):  # workers starting together: one creates tables, study, task
        storage = (optuna.storages.RDBStorage(storage_url) if storage_url
                   else JournalStorage(JournalFileBackend(str(study_dir / JOURNAL))))
        study = optuna.create_study(study_name=STUDY_NAME, storage=storage, direction="maximize",
                                    sampler=optuna.samplers.RandomSampler(), load_if_exists=True)
        if task is not None and "task" not in study.user_attrs:
            study.set_user_attr("task", task)
    if task is not None:
        stored = study.user_attrs.get("task", task)  # (a study made outside these workers has none)
        if stored != task:
            diff = ", ".join(f"{k}: {stored.get(k)!r} here, {task.get(k)!r} asked"
                             for k in sorted(set(stored) | set(task)) if stored.get(k) != task.get(k))
            raise InputError(study_dir, f"the study was started with another task ({diff})")
    return study


@contextlib.contextmanager
def claim_lock(study_dir: Path) -> Iterator[None]:
    """An exclusive lock file (created with O_EXCL, as Optuna's journal lock, so it holds on
    NFS); one left behind by a killed worker is broken after LOCK_GRACE_S."""
    lock = JournalFileOpenLock(str(study_dir / LOCK), grace_period=LOCK_GRACE_S)
    lock.acquire()
    try:
        yield
    finally:
        lock.release()


def params_of(code: str) -> dict[str, int]:
    return {f"L{i + 1}": int(op) for i, op in enumerate(code)}


def code_of(params: dict) -> str:
    return "".join(str(params[f"L{i + 1}"]) for i in range(space.NUM_LAYERS))


def trial_code(trial: FrozenTrial) -> str | None:
    """A trial's code: its params, or for a waiting (enqueued) trial the params it will get."""
    params = trial.params or trial.system_attrs.get("fixed_params")
    return code_of(params) if params else None


def suggest_code(trial: optuna.Trial) -> str:
    """The code of a trial created by enqueue_trial (suggest returns the enqueued values)."""
    return "".join(str(trial.suggest_categorical(f"L{i + 1}", [0, 1, 2]))
                   for i in range(space.NUM_LAYERS))


# ---------------------------------------------------------------- history --------------------
def requeued(trials: Sequence[FrozenTrial]) -> set[int]:
    """Numbers of failed trials that were enqueued again (a dead worker's, or preempted)."""
    return {t.user_attrs["retry_of"] for t in trials if "retry_of" in t.user_attrs}


def history(trials: Sequence[FrozenTrial]) -> list[Tried]:
    """What proposers see: completed trials in completion order, then running, waiting and
    failed ones without a value. Re-queued failures are left out (their retry stands for them)."""
    gone = requeued(trials)
    done = sorted((t for t in trials if t.state == TrialState.COMPLETE),
                  key=lambda t: t.datetime_complete)
    rest = [t for t in trials if t.state != TrialState.COMPLETE and t.number not in gone
            and trial_code(t)]
    return ([Tried(trial_code(t), t.value, t.user_attrs.get("params")) for t in done]
            + [Tried(trial_code(t)) for t in rest])


def budget_used(trials: Sequence[FrozenTrial]) -> int:
    """Trials that count against --n-trials: all but the re-queued failures (waiting ones count,
    and are trained even past the budget)."""
    gone = requeued(trials)
    return sum(t.number not in gone for t in trials)


# ---------------------------------------------------------------- workers --------------------
def process_start(pid: int) -> str | None:
    """The start time of a process (field 22 of /proc/PID/stat), None when there is no such
    process; pid and start time together name a process even after its pid is reused."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def slurm_job_state(job: str) -> str | None:
    """squeue's state of a job ("" once it has left the queue), None when squeue cannot tell."""
    try:
        proc = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True,
                              text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if proc.returncode != 0:
        return "" if "Invalid job id" in proc.stderr else None
    return proc.stdout.strip()


@dataclasses.dataclass(frozen=True)
class Worker:
    """Who trains a trial, stored on it as user attributes."""
    host: str
    pid: int
    proc_start: str | None
    slurm_job: str | None
    slurm_task: str | None

    @classmethod
    def me(cls) -> Worker:
        pid = os.getpid()
        return cls(socket.gethostname(), pid, process_start(pid), os.environ.get("SLURM_JOB_ID"),
                   os.environ.get("SLURM_PROCID"))

    @property
    def name(self) -> str:
        return f"{self.host}:{self.pid}"

    def attrs(self) -> dict:
        return dataclasses.asdict(self) | {"worker": self.name}


def worker_alive(attrs: dict, me: Worker, now: float, stale_after: float,
                 pid_start: Callable[[int], str | None] = process_start,
                 job_state: Callable[[str], str | None] = slurm_job_state) -> bool:
    """Whether the worker that claimed a trial still runs: on this host by its pid and start
    time; elsewhere by its Slurm job (the same job and task as ours means it was requeued: the
    old worker is gone); without either, by a heartbeat younger than `stale_after` seconds."""
    if attrs.get("host") == me.host:
        return pid_start(int(attrs["pid"])) == attrs.get("proc_start")
    job = attrs.get("slurm_job")
    if job:
        if job == me.slurm_job and attrs.get("slurm_task") == me.slurm_task:
            return False
        state = job_state(job)
        if state is not None:
            return state in SLURM_ALIVE
    return now - float(attrs.get("heartbeat", now)) < stale_after


def find_dead(study: optuna.Study, me: Worker, stale_after: float) -> dict[int, str]:
    """Running trials whose worker is gone, {number: worker}. Asking Slurm (squeue) can take
    seconds per trial, so this runs outside the claim lock; `requeue_dead` re-checks under it."""
    dead = {}
    now = time.time()
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        attrs = t.user_attrs
        if "heartbeat" not in attrs:
            # Written last by `claim`: another worker is claiming it right now (its attributes
            # half written), or died doing so. Only its age can tell those apart.
            attrs = {"heartbeat": t.datetime_start.timestamp()}
        if not worker_alive(attrs, me, now, stale_after):
            dead[t.number] = attrs.get("worker", "?")
    return dead


def requeue_dead(study: optuna.Study, dead: dict[int, str]) -> list[int]:
    """Under the lock: FAIL and enqueue again each trial of `dead` that is still running under
    the same worker (another claimant may have requeued it meanwhile); their numbers."""
    done = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if t.number in dead and t.user_attrs.get("worker", "?") == dead[t.number]:
            requeue(study, t, reason=f"worker {dead[t.number]} is gone")
            done.append(t.number)
    return done


def requeue(study: optuna.Study, trial: FrozenTrial, reason: str) -> None:
    """FAIL a running trial and enqueue its architecture again (retried from its checkpoints)."""
    study.tell(trial.number, state=TrialState.FAIL)
    study.enqueue_trial(trial.params, user_attrs={
        "retry_of": trial.number, "retry_reason": reason,
        "proposer": trial.user_attrs.get("proposer", "?")})


def claim(study: optuna.Study, study_dir: Path, proposer: Proposer, rng: random.Random,
          me: Worker, n_trials: int, stale_after: float) -> tuple[optuna.Trial, str] | None:
    """Take the next candidate and its code, or None when the study's budget is spent. A
    re-queued trial goes first; otherwise the proposal is made outside the lock (an LLM may take
    a minute) and, if another worker took that network meanwhile, the proposer's instant
    fallback (evolution) picks again under the lock."""
    code = source = None
    while True:
        dead = find_dead(study, me, stale_after)  # slow checks first, outside the lock
        with claim_lock(study_dir):
            requeue_dead(study, dead)
            trials = study.get_trials(deepcopy=False)
            waiting = any(t.state == TrialState.WAITING for t in trials)  # already in the budget
            if not waiting and budget_used(trials) >= n_trials:
                return None
            if waiting or code is not None:
                if not waiting:
                    seen = history(trials)
                    if space.canonical(code) in tried_keys(seen):
                        quick = getattr(proposer, "fallback", proposer)
                        code, source = quick.propose(seen, rng), f"{quick.name} (after a race)"
                    study.enqueue_trial(params_of(code), user_attrs={"proposer": source})
                trial = study.ask()  # pops the oldest waiting trial: a retry, or the one just enqueued
                code = suggest_code(trial)  # under the lock: the next claimant must see it
                for key, value in me.attrs().items():
                    trial.set_user_attr(key, value)
                trial.set_user_attr("heartbeat", time.time())
                return trial, code
        code = proposer.propose(history(trials), rng)
        source = getattr(proposer, "last_source", proposer.name)


# ---------------------------------------------------------------- results --------------------
def results(study: optuna.Study) -> list[dict]:
    """One row per trial, the report's table: number, state, architecture, AUROC, cost, worker."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        if not t.params:
            continue
        a = t.user_attrs
        rows.append({
            "trial": t.number, "state": t.state.name.lower(),
            "architecture": space.canonical(code_of(t.params)), "code": code_of(t.params),
            "auroc": t.value, "params": a.get("params"), "memory_mb": a.get("peak_memory_mb"),
            "seconds": a.get("seconds"), "proposer": a.get("proposer"), "worker": a.get("worker"),
            "retry_of": a.get("retry_of"), "error": a.get("error"),
            "start": t.datetime_start.timestamp() if t.datetime_start else None,
            "complete": t.datetime_complete.timestamp() if t.datetime_complete else None,
        })
    return rows
