"""Architecture search workers over one shared Optuna study (the GenNAS space).

    python -m chexnet_hvd.nas --study-dir runs/nas --data RECORDS --n-trials 50 --workers 2
    sbatch --array=0-7 job_submissions/slurm/nas_array.sh      # one worker per task, one GPU each

Every worker loops: claim a candidate (the proposer's pick, or a dead worker's trial), train it
with `python -m chexnet_hvd.train --model nas-<code> --resume` into STUDY_DIR/runs/<code>/ (one
GPU, or one CPU rank), and tell the study its best mean validation AUROC with its parameters,
peak memory and time. Workers may start and stop at any time; the study stops at --n-trials.
On SIGTERM/SIGUSR1 the candidate checkpoints, its trial is re-queued, and the worker exits 75.
"""

from __future__ import annotations

import ctypes
import dataclasses
import os
import random
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from chexnet_hvd import cli, config, recipes, runlog
from chexnet_hvd.nas import proposers, space, study
from chexnet_hvd.nas.study import TrialState
from chexnet_hvd.placement import visible_gpus
from chexnet_hvd.runlog import read_runlog
from chexnet_hvd.stall import EXIT_STALLED

PROPOSERS = ["evolution", "random", "llm"]
TRAINER_FLAGS = ("--data", "--run-dir", "--recipe", "--model", "--image-size", "--batch-size",
                 "--epochs", "--resume", "--threads", "--verbose")
TRAINER_OPTIONS = {f"--{f.name.replace('_', '-')}" for f in dataclasses.fields(config.TrainConfig)}


@dataclasses.dataclass
class NasConfig:
    study_dir: str = cli.field(help="the study: journal.log, runs/<code>/ per candidate, "
                               "llm_log.jsonl (on a filesystem every worker sees)")
    data: str = cli.field(help="records directory the candidates train and validate on")
    storage: str = cli.field("", help="SQLAlchemy URL of the study instead of the journal file, "
                             "e.g. postgresql://user:pass@host/db")
    proposer: str = cli.field("evolution", help="random, regularized evolution, or an LLM "
                              "(endpoint from CHEXNET_LLM_BASE_URL, _MODEL, _API_KEY)",
                              choices=PROPOSERS)
    n_trials: int = cli.field(20, help="the study stops when it holds this many trials, "
                              "counted over all workers (re-queued ones count once)", minimum=1)
    timeout: float = cli.field(0.0, help="seconds after which this worker claims no new "
                               "candidate (0: no limit)", minimum=0)
    workers: int = cli.field(1, help="worker processes to start on this machine (GPUs, when "
                             "there are, dealt out one per worker)", minimum=1)
    image_size: int = cli.field(224, help="candidate input side in pixels (32 in NAS-Bench-Macro)",
                                minimum=1)
    batch_size: int = cli.field(32, help="training batch per candidate", minimum=1)
    epochs: int = cli.field(3, help="training epochs per candidate", minimum=1)
    train_args: str = cli.field("", help="more flags for chexnet_hvd.train, e.g. "
                                "\"--precision mixed_float16 --lr 3e-3\"")
    threads: int = cli.field(0, help="CPU threads per candidate; 0: the CPUs this worker may "
                             "run on (its affinity, e.g. Slurm's binding) / workers", minimum=0)
    bind_cores: bool = cli.field(False, help="pin worker i to its own block of --threads cores "
                                 "(as Slurm's --cpu-bind=cores), so that workers sharing a CPU "
                                 "host, input pipelines included, do not compete")
    population: int = cli.field(10, help="evolution: population (the newest completed trials)",
                                minimum=1)
    sample: int = cli.field(5, help="evolution: tournament size drawn from the population",
                            minimum=1)
    llm_retries: int = cli.field(3, help="llm: questions per proposal before evolution picks",
                                 minimum=1)
    seed: int = cli.field(0, help="proposer seed (each worker adds its index)", minimum=0)
    stale_after: float = cli.field(900.0, help="seconds without a heartbeat after which a "
                                   "worker on another host, outside Slurm, counts as dead",
                                   exclusive_minimum=0)
    heartbeat: float = cli.field(60.0, help="seconds between a worker's heartbeats",
                                 exclusive_minimum=0)
    max_failures: int = cli.field(3, help="stop this worker after this many failed trainings "
                                  "in a row", minimum=1)
    worker_index: int = cli.field(-1, help="this worker's index (seeds, GPU); -1: "
                                  "SLURM_ARRAY_TASK_ID, else 0", minimum=-1)


# ---------------------------------------------------------------- checks ---------------------
def check(cfg: NasConfig) -> None:
    """Flags that would only fail later, inside a candidate's training: one line now."""
    if not (Path(cfg.data) / "manifest.json").is_file():
        raise cli.InputError(cfg.data, "not a records directory (no manifest.json)")
    if cfg.sample > cfg.population:
        raise cli.InputError("--sample", f"{cfg.sample} is more than the population ({cfg.population})")
    clash = [flag for flag in map(searched_flag, shlex.split(cfg.train_args)) if flag]
    if clash:
        raise cli.InputError("--train-args", f"{clash[0]} is set by the search itself")


def searched_flag(word: str) -> str | None:
    """The search's own trainer flag that `word` of --train-args would set, also abbreviated as
    the trainer's parser takes it (--epoch 9 sets --epochs; --no-res clears --resume; an
    ambiguous prefix, which the trainer would refuse, counts as the first it could be); None
    for any other."""
    name = word.split("=")[0]
    if name.startswith("--no-"):  # a boolean's negation: --no-resume
        name = "--" + name[len("--no-"):]
    if not name.startswith("--") or name in TRAINER_OPTIONS - set(TRAINER_FLAGS):
        return None
    return next((flag for flag in TRAINER_FLAGS if flag.startswith(name) and len(name) > 2), None)


def task_of(cfg: NasConfig) -> dict:
    """What makes trials comparable; stored on the study, checked for every later worker."""
    return {"data": str(Path(cfg.data).resolve()), "image_size": cfg.image_size,
            "batch_size": cfg.batch_size, "epochs": cfg.epochs, "train_args": cfg.train_args,
            "recipe": f"nas_candidate v{recipes.get('nas_candidate').version}"}


def worker_index(cfg: NasConfig) -> int:
    return cfg.worker_index if cfg.worker_index >= 0 else int(os.environ.get("SLURM_ARRAY_TASK_ID", 0))


def cpu_threads(cfg: NasConfig) -> int:
    return cfg.threads or max(1, len(os.sched_getaffinity(0)) // cfg.workers)


def core_block(i: int, threads: int) -> set[int] | None:
    """The i-th block of `threads` cores this process may run on; None when there are too few."""
    cores = sorted(os.sched_getaffinity(0))
    block = cores[i * threads:(i + 1) * threads]
    return set(block) if len(block) == threads else None


# ---------------------------------------------------------------- one candidate --------------
def train_command(cfg: NasConfig, code: str, run_dir: Path, threads: int) -> list[str]:
    """The candidate's trainer command: the nas_candidate recipe, the search's settings, then
    --train-args (which `check` keeps off the search's own flags), through the trainer's config."""
    base = config.parse(["--recipe", "nas_candidate", "--data", cfg.data, "--run-dir", str(run_dir)])
    base = dataclasses.replace(base, model=space.model_name(code), image_size=cfg.image_size,
                               batch_size=cfg.batch_size, epochs=cfg.epochs, threads=threads)
    return config.command(config.parse(config.argv_of(base) + shlex.split(cfg.train_args)))


# What makes a process one rank of a larger job, to either engine: the launcher's MPI/PMIx
# variables (Open MPI would try to join that job), horovodrun's rank and rendezvous variables
# (Horovod's tuning knobs stay), TF_CONFIG and a Slurm step's task layout (the tf engine would
# wait for the step's other tasks).
JOB_RANK_PREFIXES = ("OMPI_", "PMIX_", "PMI_", "SLURM_STEP_", "HOROVOD_LOCAL_", "HOROVOD_CROSS_",
                     "HOROVOD_GLOO_")
JOB_RANK_NAMES = ("TF_CONFIG", "SLURM_PROCID", "HOROVOD_RANK", "HOROVOD_SIZE", "HOROVOD_HOSTNAME",
                  "HOROVOD_CONTROLLER", "HOROVOD_CPU_OPERATIONS")


def trainer_env() -> dict:
    """The candidate is a world of one, not a rank of the job that started this worker."""
    return {k: v for k, v in os.environ.items()
            if not (k.startswith(JOB_RANK_PREFIXES) or k in JOB_RANK_NAMES)}


def _die_with_parent() -> None:
    """A killed worker must not leave its candidate training as an orphan (Linux prctl)."""
    ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def outcome(run_dir: Path) -> dict:
    """The candidate's result from its run log: best val mean AUROC over all epochs (and
    attempts), trainable parameters, peak memory."""
    records = read_runlog(run_dir)
    epochs = [r for r in records if r["event"] == "epoch"]
    aurocs = [r["val_mean_auroc"] for r in epochs if r.get("val_mean_auroc") is not None]
    start = [r for r in records if r["event"] == "start"][-1]
    return {"auroc": max(aurocs) if aurocs else None, "params": start.get("trainable_params"),
            "peak_memory_mb": max((r.get("peak_memory_mb") or 0 for r in epochs), default=None),
            "epochs": len(epochs)}


class Stop:
    """SIGTERM/SIGUSR1: ask the running candidate to checkpoint (USR1), then stop the loop."""

    def __init__(self):
        self.requested = False
        self.child: subprocess.Popen | None = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.requested = True
        self.forward()

    def forward(self) -> None:
        if self.child is not None and self.child.poll() is None:
            self.child.send_signal(signal.SIGUSR1)


def run_candidate(cmd: list[str], run_dir: Path, stop: Stop, trial, every: float) -> int:
    """Train; a heartbeat on the trial every `every` seconds while it runs; the exit code."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "train.log", "ab") as log:
        stop.child = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=trainer_env(),
                                      preexec_fn=_die_with_parent)
        if stop.requested:  # the signal came after the worker's last look, before this child was
            stop.forward()
        while True:
            try:
                return stop.child.wait(timeout=every)
            except subprocess.TimeoutExpired:
                trial.set_user_attr("heartbeat", time.time())


def last_line(path: Path) -> str:
    lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    return lines[-1][-300:] if lines else "no output"


def logged_records(run_dir: Path) -> int:
    """How many records the candidate's run log holds (0: none, or none readable)."""
    try:
        return runlog.records(run_dir)
    except runlog.RunLogError:
        return 0


def retry_stalled(rc: int, run_dir: Path, trial, before: int) -> bool:
    """Whether a candidate that ended with `rc` stalled (exit 76, or killed by its start-up's
    bound with this attempt's records, those past the first `before`, ending so) and goes again,
    from its newest checkpoint: once, unless it completed an epoch since its last stall, whichever
    worker ran it (the Slurm templates' rule: a node that stalls every attempt is not retried
    forever); once in a chain of retries where this attempt logged no stall (it could not: a full
    disk, a hung file system)."""
    try:
        logged = runlog.status(run_dir, after=before) == "stalled"
        in_a_row = runlog.stalled_in_a_row(run_dir, per_job=False)
    except runlog.RunLogError:
        logged, in_a_row = False, 0
    if not (rc == EXIT_STALLED or (rc == -signal.SIGKILL and logged)):
        return False
    return in_a_row == 1 if logged else not trial.user_attrs.get("retry_reason", "").startswith("stalled")


def record(the_study, trial, run_dir: Path, rc: int, seconds: float) -> dict:
    """Tell the study how a finished candidate went; its result (auroc None and an error when
    it failed)."""
    result = outcome(run_dir) if rc == 0 else {"auroc": None}
    trial.set_user_attr("seconds", seconds)
    if result["auroc"] is None:
        error = last_line(run_dir / "train.log") if rc else "no validation AUROC"
        trial.set_user_attr("error", error)
        the_study.tell(trial, state=TrialState.FAIL)
        return {"auroc": None, "error": error}
    for key in ("params", "peak_memory_mb", "epochs"):
        trial.set_user_attr(key, result[key])
    the_study.tell(trial, result["auroc"])
    return result


# ---------------------------------------------------------------- the worker loop ------------
def worker(cfg: NasConfig) -> int:
    index = worker_index(cfg)
    study_dir = Path(cfg.study_dir)
    the_study = study.open_study(study_dir, cfg.storage, task_of(cfg))
    proposer = proposers.make_proposer(cfg.proposer, cfg.population, cfg.sample,
                                       log_path=study_dir / "llm_log.jsonl", retries=cfg.llm_retries)
    rng = random.Random(f"{cfg.seed}:{index}")
    me, stop, threads = study.Worker.me(), Stop(), cpu_threads(cfg)
    if cfg.bind_cores and (block := core_block(0, threads)):  # (a spawned worker is bound already)
        os.sched_setaffinity(0, block)
    deadline = time.monotonic() + cfg.timeout if cfg.timeout else float("inf")
    failures = done = 0
    gpu = f", GPU {os.environ['CUDA_VISIBLE_DEVICES']}" if os.environ.get("CUDA_VISIBLE_DEVICES") else ""
    cores = ",".join(map(str, sorted(os.sched_getaffinity(0))))
    print(f"worker {me.name} (index {index}): study {study_dir}, proposer {proposer.name}, "
          f"threads {threads}, cores {cores}{gpu}", flush=True)
    while not stop.requested and time.monotonic() < deadline:
        try:
            claimed = study.claim(the_study, study_dir, proposer, rng, me, cfg.n_trials, cfg.stale_after)
        except proposers.SpaceExhausted:
            break
        if claimed is None:
            break
        trial, code = claimed
        run_dir = study_dir / "runs" / space.canonical(code)
        what = f"worker {me.name}: trial {trial.number} {space.canonical(code)}"
        if stop.requested:  # while the candidate was chosen (an LLM, squeue): no time to train it
            study.requeue(the_study, trial, reason=f"preempted before it trained (worker {me.name})")
            print(f"{what}: preempted before it trained; re-queued", flush=True)
            return cli.EXIT_PREEMPTED
        t0, before = time.monotonic(), logged_records(run_dir)
        rc = run_candidate(train_command(cfg, code, run_dir, threads), run_dir, stop, trial,
                           cfg.heartbeat)
        seconds = round(time.monotonic() - t0, 1)
        if rc == cli.EXIT_PREEMPTED or (stop.requested and rc != 0):  # (one that finished counts)
            study.requeue(the_study, trial, reason=f"preempted (worker {me.name})")
            print(f"{what}: preempted after {seconds} s; checkpointed and re-queued", flush=True)
            return cli.EXIT_PREEMPTED
        if retry_stalled(rc, run_dir, trial, before):
            study.requeue(the_study, trial, reason=f"stalled (worker {me.name})")
            print(f"{what}: stalled after {seconds} s ({last_line(run_dir / 'train.log')}); re-queued to "
                  "resume from its newest checkpoint", file=sys.stderr, flush=True)
            continue
        result = record(the_study, trial, run_dir, rc, seconds)
        if result["auroc"] is None:
            failures += 1
            print(f"{what}: failed (exit {rc}): {result['error']}", file=sys.stderr, flush=True)
            if failures >= cfg.max_failures:
                print(f"error: {run_dir / 'train.log'}: {failures} candidates failed in a row; "
                      "stopping this worker", file=sys.stderr)
                return 1
            continue
        failures, done = 0, done + 1
        print(f"{what} ({trial.user_attrs.get('proposer')}): AUROC {result['auroc']:.4f}, "
              f"{result['params']:,} params, {result['peak_memory_mb']:.0f} MB, {seconds} s", flush=True)
    print(f"worker {me.name}: {done} candidates trained", flush=True)
    if stop.requested:
        return cli.EXIT_PREEMPTED
    if failures and not done:  # a job that trained nothing must not look complete
        print(f"error: {study_dir}: every candidate this worker trained failed ({failures}); "
              "see their train.log", file=sys.stderr)
        return 1
    return 0


# ---------------------------------------------------------------- several workers -----------
def spawn_workers(cfg: NasConfig, argv: list[str]) -> int:
    """--workers N: N worker processes of this same command, one GPU each where there are
    GPUs; signals are passed on; the exit code is the worst of theirs."""
    gpus, threads = visible_gpus(), cpu_threads(cfg)
    procs = []
    for i in range(cfg.workers):
        env = os.environ | ({"CUDA_VISIBLE_DEVICES": gpus[i % len(gpus)]} if gpus else {})
        index = worker_index(cfg) * cfg.workers + i
        block = core_block(i, threads) if cfg.bind_cores else None
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "chexnet_hvd.nas", *argv, "--workers", "1",
             "--worker-index", str(index), "--threads", str(threads)], env=env,
            preexec_fn=(lambda b=block: os.sched_setaffinity(0, b)) if block else None))

    def forward(signum, frame):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, forward)
    codes = [p.wait() for p in procs]
    return cli.EXIT_PREEMPTED if cli.EXIT_PREEMPTED in codes else max(codes)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    cfg = cli.parse_config(NasConfig, __doc__, argv, prog="python -m chexnet_hvd.nas")
    check(cfg)
    if cfg.workers > 1:
        study.open_study(cfg.study_dir, cfg.storage, task_of(cfg))  # refuse a wrong task once, here
        return spawn_workers(cfg, argv)
    return worker(cfg)


if __name__ == "__main__":
    cli.run(main)
