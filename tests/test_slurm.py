"""The job templates on the rehearsal cluster (tools/slurm_local.sh up: one slurmctld; node1..4,
each its own slurmd with its own hostname, network namespace and address, and 4 stand-in GPUs
as gres; cores1, this machine's real cores with task/affinity binding).

Every template runs UNCHANGED: plain `sbatch <template>` with only workload variables in the
environment (data, model, image size, epochs, where runs go; PRECISION=fp32 at 4 ranks and more,
whose emulated fp16 costs minutes; cpu.sh also given the partition of real cores); its #SBATCH
resources and launcher are its own. Per template: exit 0, the world size and node count its
#SBATCH lines ask for, one GPU per rank distinct within a node, one line per epoch in job.log.
Then: CPU binding on real cores, preemption (USR1 -> checkpoint after the same step on every
rank -> requeue -> resume to completion) across 2 nodes under srun and on one node under
mpirun, a user's scancel, and the launcher the templates refuse."""

import contextlib
import json
import os
import re
import shutil
import signal
import time
from collections import defaultdict

import pytest
from conftest import ROOT, reported_bottleneck, run

from chexnet_hvd import bottleneck, recipes
from chexnet_hvd.runlog import read_runlog

pytestmark = [pytest.mark.slurm, pytest.mark.slow]
SLURM_DIR = ROOT / "job_submissions" / "slurm"
TEMPLATES = sorted(SLURM_DIR.glob("*.sh"))
JOBS = [t for t in TEMPLATES if t.name != "common.sh"]
TRAINING = [t for t in JOBS if "run_training" in t.read_text()]
PREEMPTED = SLURM_DIR / "tfrec_8gpu.sh"  # the preemption test's, on 2 ranks a node (FOUR_RANKS); also run unchanged
# 16 px from the 32-px records: the GPU templates' mixed_float16 is emulated on a CPU, and the
# small CNN at 32 px took twice the CPU time.
WORKLOAD = {"MODEL": "small_cnn", "IMAGE_SIZE": "16", "BATCH_SIZE": "8", "EPOCHS": "1"}
# Where a test is about what happens between or around epochs, not the template's precision:
# the GPU templates' mixed_float16 is emulated on a CPU, 20-30x slower than fp32 here.
FP32 = {"PRECISION": "fp32"}


def directives(template) -> dict[str, str]:
    """The template's #SBATCH options as {name: value}."""
    found = re.findall(r"^#SBATCH --([\w-]+)(?:=(\S+))?", template.read_text(), re.M)
    return {k: v for k, v in found}


def layout(template) -> tuple[int, int, int]:
    """(nodes, ranks, GPUs per node) the template asks for."""
    d = directives(template)
    nodes = int(d.get("nodes", 1))
    ranks = nodes * int(d["ntasks-per-node"]) if "ntasks-per-node" in d else int(d.get("ntasks", 1))
    gpus = int(d["gres"].split(":")[-1]) if d.get("gres", "").startswith("gpu") else 0
    return nodes, ranks, gpus


def default_precision(template) -> str:
    """PRECISION as the template resolves it: its own default, else common.sh's."""
    for text in (template.read_text(), (SLURM_DIR / "common.sh").read_text()):
        if found := re.search(r"PRECISION:=(\w+)", text):
            return found.group(1)
    raise AssertionError("no PRECISION default")


def submit(template, env: dict, out_dir, *sbatch_args: str, output: str = "%x-%j.out") -> str:
    proc = run(["sbatch", "--parsable", f"--output={out_dir}/{output}", *sbatch_args,
                str(template.relative_to(ROOT))], env={k: str(v) for k, v in env.items()}, check=True)
    return proc.stdout.strip().split(";")[0]


def job_fields(job_id: str) -> dict:
    return dict(re.findall(r"(\w+)=(\S+)", run(["scontrol", "show", "job", job_id]).stdout))


ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")


def wait_job(job_id: str, timeout: float) -> dict:
    """Poll scontrol until the job is finished; its fields as a dict."""
    deadline = time.monotonic() + timeout
    while True:
        fields = job_fields(job_id)
        if fields.get("JobState") in ENDED:
            return fields
        if time.monotonic() > deadline:
            run(["scancel", job_id])
            raise AssertionError(f"job {job_id} still {fields.get('JobState')} after {timeout} s")
        time.sleep(1)


def wait_until(predicate, timeout: float, what) -> None:
    """Poll `predicate` until it holds; else fail with `what` (or what it returns, if callable:
    e.g. the job's log as it stands then)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what() if callable(what) else what
        time.sleep(0.5)


def log_tail(run_dir, what: str):
    """A `what` for wait_until: `what`, and the end of the run's job.log when it fails."""
    def message() -> str:
        path = run_dir / "job.log"
        return f"{what}; job.log ends:\n{path.read_text()[-3000:] if path.exists() else '(none)'}"
    return message


def output_of(out_dir, job_id: str) -> str:
    return next(out_dir.glob(f"*-{job_id}.out")).read_text()


def failure_of(out_dir, job_id: str) -> str:
    """A failed job's story: its first line, each crash or traceback with the 30 lines after it
    (a native crash's Python stacks, from PYTHONFAULTHANDLER), and the end of its output."""
    lines = output_of(out_dir, job_id).splitlines()
    starts = [i for i, line in enumerate(lines)
              if re.search(r"Fatal Python error|Traceback|received signal|^error: ", line)]
    shown = sorted({j for i in starts[:4] for j in range(i, min(i + 30, len(lines)))})
    return "\n".join(lines[:1] + [lines[j] for j in shown] + ["[...]"] + lines[-40:])


def run_job(template, env: dict, out_dir) -> tuple[str, dict]:
    """Submit and wait; (job id, its fields)."""
    job = submit(template, env, out_dir)
    return job, wait_job(job, timeout=900)


def assert_ranks_placed(start: dict, nodes: int, ranks: int, gpus: int) -> None:
    """World size and hosts as asked; per host local ranks 0..n-1, each on its own GPU."""
    assert start["world_size"] == len(start["ranks"]) == ranks
    assert len(start["hostnames"]) == nodes
    by_host = defaultdict(list)
    for r in start["ranks"]:
        by_host[r["host"]].append(r)
    for host, mine in by_host.items():
        assert sorted(r["local_rank"] for r in mine) == list(range(ranks // nodes)), host
        if gpus:
            assert all(len(r["cuda_visible_devices"]) == gpus for r in mine)
            used = [r["gpu"] for r in mine]
            assert used == [r["cuda_visible_devices"][r["local_rank"]] for r in mine]
            assert len(set(used)) == len(used), (host, used)  # one GPU per rank
        else:
            assert all(r["gpu"] is None for r in mine)


def test_the_job_templates_are_all_there():
    names = {t.name for t in JOBS}
    assert {"raw_1gpu.sh", "cpu.sh", "records_mpi.sh", "nas_array.sh"} | {
        f"tfrec_{n}gpu.sh" for n in (1, 2, 4, 8, 16)} <= names


@pytest.mark.parametrize("template", TEMPLATES, ids=lambda t: t.name)
def test_template_syntax_and_sbatch_lines_first(template):
    assert run(["bash", "-n", str(template)]).returncode == 0
    lines = template.read_text().splitlines()
    directives_at = [i for i, line in enumerate(lines) if line.startswith("#SBATCH")]
    commands = [i for i, line in enumerate(lines) if line.strip() and not line.startswith("#")]
    if template.name != "common.sh":  # Slurm stops reading #SBATCH at the first command
        assert directives_at and max(directives_at) < min(commands), template.name
        sources = [lines[i] for i in commands if lines[i].startswith("source ")]
        assert len(sources) == 1 and "job_submissions/slurm/common.sh" in sources[0]
        assert len(commands) <= 5, f"{template.name}: the body belongs in common.sh"


def assert_template_run(template, job: str, run_dir, epochs: int, precision: str = "",
                        placed: tuple[int, int, int] | None = None) -> None:
    """What every template's run must show: its own precision default (or the PRECISION
    given), the world size, nodes and one GPU per rank its #SBATCH lines ask for (or `placed`,
    where sbatch's flags overrode them; each attempt), common.sh's 8 training steps per call,
    completion, and a batch log of one line per epoch, no progress bars."""
    nodes, ranks, gpus = placed or layout(template)
    log = read_runlog(run_dir)
    for start in (r for r in log if r["event"] == "start"):
        assert (start["slurm_job_id"], start["precision"]) == (job, precision or default_precision(template))
        assert_ranks_placed(start, nodes, ranks, gpus)
        assert start["config"]["steps_per_execution"] == 8
    assert log[-1]["status"] == "completed"
    job_log = (run_dir / "job.log").read_text()
    assert "\r" not in job_log and "[====" not in job_log  # no progress bars in batch output
    assert len(re.findall(r"^epoch \d+: [\d.]+ img/s", job_log, re.M)) == epochs


CPU = SLURM_DIR / "cpu.sh"  # runs unchanged but for its partition in the CPU binding test


@pytest.mark.parametrize("template", [t for t in TRAINING if t is not CPU], ids=lambda t: t.name)
def test_training_template_runs_unchanged(cluster, template, records_dir, raw_dir, tmp_path):
    """Each at its own precision but 4, 8 and 16 ranks, at fp32 (16 emulated mixed_float16 ranks on
    2 cores took 22 s a step; the default is common.sh's, which 1 and 2 ranks run). tfrec_1gpu.sh
    also takes RECIPE=chexnet: the recipe's settings (its batch size, as BATCH_SIZE is unset),
    overridden by the workload's and TRAIN_ARGS' (no ImageNet file here, and no --crop: these
    records keep their source sizes; the recipe's crop is tests/test_views.py's), at the
    template's own precision."""
    data = raw_dir if template.name.startswith("raw_") else records_dir
    recipe = ({"RECIPE": "chexnet", "TRAIN_ARGS": "--weights none --no-crop"}
              if template.name == "tfrec_1gpu.sh" else {})
    workload = {k: v for k, v in WORKLOAD.items() if not (recipe and k == "BATCH_SIZE")}
    workload |= FP32 if template.name in ("tfrec_4gpu.sh", "tfrec_8gpu.sh", "tfrec_16gpu.sh") else {}
    job, fields = run_job(template, workload | recipe | {"DATA_DIR": data, "RUN_ROOT": tmp_path / "runs"}, tmp_path)
    assert (fields["JobState"], fields["ExitCode"]) == ("COMPLETED", "0:0"), failure_of(tmp_path, job)
    run_dir = tmp_path / "runs" / directives(template)["job-name"] / job
    assert_template_run(template, job, run_dir, int(WORKLOAD["EPOCHS"]), workload.get("PRECISION", ""))
    if recipe:
        start = read_runlog(run_dir)[0]
        assert (start["recipe"], start["config"]["schedule"], start["config"]["class_weights"]) == \
            ("chexnet", "plateau", "manifest")
        assert (start["model"], start["config"]["weights"]) == (WORKLOAD["MODEL"], "none")
        assert start["local_batch"] == recipes.get("chexnet").train["batch_size"]  # BATCH_SIZE unset
        assert not start["config"]["crop"]


def test_cpu_binding_gives_each_rank_its_cpus(cluster, records_dir, tmp_path):
    """On the node of real cores: --cpus-per-task=2 gives the rank both cores (srun alone would
    give it one since Slurm 22.05), and 2 tasks x 1 CPU get one core each; threads follow. The
    latter is cpu.sh as it stands, given the partition (and checked as every template is)."""
    env = WORKLOAD | {"DATA_DIR": records_dir, "RUN_ROOT": tmp_path / "runs"}
    wide = submit(CPU, env, tmp_path, "--partition=cores", "--ntasks-per-node=1", "--cpus-per-task=2")
    narrow = submit(CPU, env, tmp_path, "--partition=cores")
    for job in (wide, narrow):
        fields = wait_job(job, timeout=600)
        assert (fields["JobState"], fields["ExitCode"]) == ("COMPLETED", "0:0"), failure_of(tmp_path, job)
    assert_template_run(CPU, narrow, tmp_path / "runs" / "chexnet-cpu" / narrow, int(WORKLOAD["EPOCHS"]))
    ranks = {job: read_runlog(tmp_path / "runs" / "chexnet-cpu" / job)[0]["ranks"] for job in (wide, narrow)}
    assert [(r["host"], r["cpus"], r["threads"]) for r in ranks[wide]] == [("cores1", [0, 1], 2)]
    assert sorted(tuple(r["cpus"]) for r in ranks[narrow]) == [(0,), (1,)]
    assert all(r["threads"] == 1 for r in ranks[narrow])


PREEMPTED_EPOCHS = 8
# 2 nodes x 2 ranks (sbatch's flags override the template's 2 x 4): ranks that share a node and
# ranks across nodes, in half the processes (every rank stops, checkpoints and resumes as the
# others do; tfrec_16gpu.sh's run has 4 ranks a node, and a tf worker at local rank 2 or 3 takes
# its GPU and port as the one at local rank 1 does)
FOUR_RANKS = (["--ntasks-per-node=2"], (2, 4, 4))


@pytest.mark.parametrize("launcher,engine,template,override", [
    ("srun", "horovod", PREEMPTED, FOUR_RANKS), ("srun", "tf", PREEMPTED, FOUR_RANKS),
    ("mpirun", "horovod", SLURM_DIR / "tfrec_2gpu.sh", ([], None))],
    ids=["srun-tfrec_8gpu-4-ranks", "srun-tfrec_8gpu-4-ranks-ENGINE=tf", "mpirun-tfrec_2gpu"])
def test_preemption_requeues_and_resumes(cluster, launcher, engine, template, override, records_dir, tmp_path):
    """A template gets USR1 as Slurm sends it before a time limit: every rank stops after the
    same step, one checkpoint, the job requeues itself and the second attempt resumes from that
    checkpoint to completion. Under srun: tfrec_8gpu.sh, across 2 nodes on 2 ranks per node
    (FOUR_RANKS; otherwise checked as every template is) under either engine; under mpirun,
    which forwards the signal itself: tfrec_2gpu.sh. 8 epochs: the signal comes after the
    first, and epochs of the small CNN take a fraction of a second at 8 steps per call (at 3, a
    signal after the last stop check of the last epoch let the run complete, rightly not
    requeued)."""
    sbatch_args, placed = override
    env = WORKLOAD | FP32 | {"DATA_DIR": records_dir, "RUN_ROOT": tmp_path / "runs", "EPOCHS": PREEMPTED_EPOCHS,
                             "LAUNCHER": launcher, "ENGINE": engine}
    job = submit(template, env, tmp_path, *sbatch_args)
    run_dir = tmp_path / "runs" / directives(template)["job-name"] / job
    runlog = run_dir / "runlog.jsonl"
    first_epoch(run_dir, job)
    run(["scancel", "--batch", "--signal=USR1", job], check=True)  # what --signal=B:USR1@300 does
    wait_until(lambda: "Restarts=1" in run(["scontrol", "show", "job", job]).stdout, 180,
               log_tail(run_dir, "the job was not requeued"))
    start_early(job)
    wait_until(lambda: '"status": "completed"' in runlog.read_text(), 900,
               log_tail(run_dir, "the requeued job did not complete"))
    fields = wait_job(job, timeout=120)
    assert (fields["JobState"], fields["Restarts"]) == ("COMPLETED", "1")

    log = read_runlog(run_dir)
    starts = [r for r in log if r["event"] == "start"]
    ends = [r for r in log if r["event"] == "end"]
    assert [e["status"] for e in ends] == ["preempted", "completed"] and len(starts) == 2
    assert {s["engine"] for s in starts} == {engine}
    assert_template_run(template, job, run_dir, epochs=PREEMPTED_EPOCHS, precision="fp32", placed=placed)
    job_log = (run_dir / "job.log").read_text()
    stopped = re.findall(r"rank (\d+): preempted after step (\d+)", job_log)
    assert sorted(int(r) for r, _ in stopped) == list(range((placed or layout(template))[1])), job_log[-3000:]
    assert {int(s) for _, s in stopped} == {ends[0]["step"]}  # the same step on every rank
    assert starts[1]["resumed_from"].endswith(f"/checkpoints/step-{ends[0]['step']:09d}")
    assert [p.name for p in (run_dir / "checkpoints").glob("step-*")] == [f"step-{ends[0]['step']:09d}"]
    assert [r["epoch"] for r in log if r["event"] == "epoch"] == list(range(1, PREEMPTED_EPOCHS + 1))


def test_scancel_checkpoints_and_does_not_requeue(cluster, records_dir, tmp_path):
    """A user's scancel (TERM) also stops the ranks at a checkpoint, but the job stays cancelled;
    a new job given its run directory (CHEXNET_RUN_DIR) continues the run from that checkpoint."""
    env = WORKLOAD | FP32 | {"DATA_DIR": records_dir, "RUN_ROOT": tmp_path / "runs", "EPOCHS": 50}
    job = submit(SLURM_DIR / "tfrec_1gpu.sh", env, tmp_path)
    runlog = tmp_path / "runs" / "chexnet-tfrec_1gpu" / job / "runlog.jsonl"
    first_epoch(runlog.parent, job)
    run(["scancel", job], check=True)
    fields = wait_job(job, timeout=120)
    assert (fields["JobState"], fields["Restarts"]) == ("CANCELLED", "0")
    time.sleep(5)  # nothing may requeue it afterwards
    assert job_fields(job)["JobState"] == "CANCELLED"
    end = read_runlog(runlog)[-1]
    assert (end["event"], end["status"]) == ("end", "preempted")
    assert (runlog.parent / "checkpoints" / f"step-{end['step']:09d}").is_dir()
    epochs = end["epoch"] + 2
    again = submit(SLURM_DIR / "tfrec_1gpu.sh", env | {"CHEXNET_RUN_DIR": runlog.parent, "EPOCHS": epochs}, tmp_path)
    fields = wait_job(again, timeout=300)
    assert (fields["JobState"], fields["ExitCode"]) == ("COMPLETED", "0:0"), failure_of(tmp_path, again)
    log = read_runlog(runlog)
    start = [r for r in log if r["event"] == "start"][-1]
    assert (start["slurm_job_id"], start["resumed_from"]) == (again, str(runlog.parent / "checkpoints" / f"step-{end['step']:09d}"))
    assert [r["epoch"] for r in log if r["event"] == "epoch"] == list(range(1, epochs + 1))
    assert log[-1]["status"] == "completed" and not (tmp_path / "runs" / "chexnet-tfrec_1gpu" / again).exists()


@pytest.mark.parametrize("setting,error", [
    ({"LAUNCHER": "horovodrun"}, "error: LAUNCHER: horovodrun"),  # passes no USR1 on: runs lost
    ({"LAUNCHER": "mpirun", "ENGINE": "tf"}, "error: ENGINE: the tf engine's workers are started by srun"),
    ({"ENGINE": "mxnet"}, "error: ENGINE: unknown engine 'mxnet'")], ids=str)
def test_settings_that_cannot_work_are_refused_in_batch_jobs(cluster, records_dir, tmp_path, setting, error):
    env = WORKLOAD | {"DATA_DIR": records_dir, "RUN_ROOT": tmp_path / "runs"} | setting
    job = submit(SLURM_DIR / "tfrec_1gpu.sh", env, tmp_path)
    fields = wait_job(job, timeout=120)
    assert (fields["JobState"], fields["ExitCode"]) == ("FAILED", "2:0")
    errors = [line for line in output_of(tmp_path, job).splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith(error)
    assert not (tmp_path / "runs").exists()


def test_horovod_under_srun_without_pmix_starts_no_worlds_of_one(cluster, records_dir, tmp_path):
    """srun --mpi=none starts N processes that MPI does not join: each would be a world of one
    training alone into one run directory. Open MPI here refuses to start without Slurm's PMI
    (an MPI that starts anyway meets the trainer's own refusal, tests/test_two_ranks.py): either
    way the step fails and writes nothing."""
    proc = run(["srun", "-N1", "-n2", "--mpi=none", ".venv/bin/python", "-m", "chexnet_hvd.train", "--data",
                str(records_dir), "--run-dir", str(tmp_path / "run"), "--model", "small_cnn", "--engine",
                "horovod"], timeout=300)
    assert proc.returncode != 0 and not (tmp_path / "run" / "runlog.jsonl").exists(), proc.stderr[-2000:]
    assert "PMI" in proc.stdout + proc.stderr or "sees a world of 1" in proc.stderr


def test_records_mpi_template_writes_records_on_two_nodes(cluster, synthetic, records_dir, tmp_path):
    out = tmp_path / "records"
    env = {"CSV": synthetic / "Data_Entry_2017.csv", "IMAGES": synthetic / "images", "DATA_DIR": out}
    job = submit(SLURM_DIR / "records_mpi.sh", env, tmp_path)
    fields = wait_job(job, timeout=600)
    assert (fields["JobState"], fields["ExitCode"]) == ("COMPLETED", "0:0"), failure_of(tmp_path, job)
    assert fields["NodeList"] == "node[1-2]"
    manifest = json.loads((out / "manifest.json").read_text())
    reference = json.loads((records_dir / "manifest.json").read_text())
    assert manifest["writer_ranks"] == 2
    assert {s: v["count"] for s, v in manifest["splits"].items()} == \
        {s: v["count"] for s, v in reference["splits"].items()}


def test_nas_array_runs_one_worker_per_task_each_on_its_gpu(cluster, records_dir, tmp_path):
    """nas_array.sh unchanged: 4 array tasks, one search worker and one GPU each, one study
    with a budget of 2 candidates (the other workers find it spent). Candidates train 2 steps
    in fp32 (the template's mixed_float16 is emulated slowly on a CPU)."""
    from chexnet_hvd.nas import study

    env = FP32 | {"DATA_DIR": records_dir, "STUDY_DIR": tmp_path / "study", "N_TRIALS": 2,
                  "IMAGE_SIZE": 32, "BATCH_SIZE": 32, "EPOCHS": 1, "TRAIN_ARGS": "--steps-per-epoch 2"}
    array = submit(SLURM_DIR / "nas_array.sh", env, tmp_path, output="%x-%A_%a.out")
    job_ids, placed = set(), set()
    for task in range(4):
        fields = wait_job(f"{array}_{task}", timeout=1200)
        job_ids.add(fields["JobId"])
        output = (tmp_path / f"chexnet-nas-{array}_{task}.out").read_text()
        assert (fields["JobState"], fields["ExitCode"]) == ("COMPLETED", "0:0"), output[-3000:]
        host = re.search(rf"array task {task}\): NAS worker on (\S+),", output).group(1)
        gpu = re.search(r"cores [\d,-]+, GPU (\S+)", output).group(1)
        placed.add((host, gpu))
    assert len(placed) == 4  # each worker on a GPU of its own
    rows = study.results(study.open_study(tmp_path / "study"))
    assert [r["state"] for r in rows] == ["complete"] * 2
    assert len({r["architecture"] for r in rows}) == 2
    trials = study.open_study(tmp_path / "study").get_trials()
    assert {t.user_attrs["slurm_job"] for t in trials} <= job_ids



# ---------------------------------------------------------------- faults ----------------------
# tfrec_8gpu.sh on 2 ranks, one per node (sbatch's flags override the template's), so that
# what fails is one node's rank, or the link between the nodes.
TWO_NODES = ["--nodes=2", "--ntasks-per-node=1", "--nodelist=node[1-2]"]
STALL = 10  # --stall-timeout, seconds
BOUND = STALL + 60


def rank_pids(run_dir) -> dict[int, int]:
    """{SLURM_PROCID: pid} of the job's trainer processes (srun, which names the same command,
    left out)."""
    found = {}
    pids = run(["pgrep", "-f", f"chexnet_hvd.train.*{run_dir}"]).stdout.split()
    for pid in map(int, pids):
        try:
            if "python" not in os.readlink(f"/proc/{pid}/exe"):
                continue
            env = dict(kv.split("=", 1) for kv in open(f"/proc/{pid}/environ").read().split("\0") if "=" in kv)
        except OSError:
            continue
        found[int(env["SLURM_PROCID"])] = pid
    return found


def start_early(job: str) -> None:
    """A requeued job is held back about 2 minutes so its nodes can clean up; once the old
    attempt's steps are gone, let it start (not within the second of the requeue: slurmd refuses
    a credential made in the second its old one was revoked)."""
    wait_until(lambda: run(["pgrep", "-f", f"slurmstepd: \\[{job}\\."]).returncode != 0, 180,
               "the old attempt's steps never ended")
    time.sleep(2)
    run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=True)


def first_epoch(run_dir, job: str) -> None:
    """Wait for the job's first epoch record; fail at once, with its log, if the job ends first
    (a job that cannot start would otherwise hold the test for the whole wait)."""
    runlog = run_dir / "runlog.jsonl"

    def epoch() -> bool:
        return runlog.is_file() and '"event": "epoch"' in runlog.read_text()

    def epoch_or_end() -> bool:
        if epoch():
            return True
        state = job_fields(job).get("JobState")
        assert state not in ENDED or epoch(), log_tail(run_dir, f"the job ended ({state}) before an epoch")()
        return False

    wait_until(epoch_or_end, 600, log_tail(run_dir, "the job never finished an epoch"))


@contextlib.contextmanager
def stopped(pid: int):
    """Process `pid` stopped (SIGSTOP) for the block, which gets the time it was; killed after
    it (a stopped task outlives srun's TERM)."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield time.monotonic()
    finally:
        if os.path.exists(f"/proc/{pid}"):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("engine", ["horovod", "tf"])
def test_a_stopped_rank_ends_the_job_which_requeues_and_completes(cluster, engine, records_dir, tmp_path):
    """Rank 1 (node2) stopped in mid-epoch: the job ends within the bound with a line naming
    rank 1 on node2 and `end: stalled` in the run log, the template requeues it once, and the
    requeued attempt (the same job id: under the tf engine, the same ports) resumes from the
    last epoch's checkpoint and completes every epoch."""
    # epochs enough that the job is still training when the fault lands, as soon as epoch 1
    # is logged (an epoch: ~0.5 s)
    env = WORKLOAD | FP32 | {"DATA_DIR": records_dir, "RUN_ROOT": tmp_path / "runs", "EPOCHS": 12, "ENGINE": engine,
                      "TRAIN_ARGS": f"--stall-timeout {STALL}"}
    job = submit(PREEMPTED, env, tmp_path, *TWO_NODES)
    run_dir = tmp_path / "runs" / directives(PREEMPTED)["job-name"] / job
    first_epoch(run_dir, job)
    with stopped(rank_pids(run_dir)[1]) as when:
        wait_until(lambda: '"status": "stalled"' in (run_dir / "runlog.jsonl").read_text(), BOUND,
                   log_tail(run_dir, "no stall recorded"))
        recorded = time.monotonic() - when
        wait_until(lambda: "Restarts=1" in run(["scontrol", "show", "job", job]).stdout, 180,
                   log_tail(run_dir, "not requeued"))
    print(f"{engine} under srun, rank 1 stopped: stall recorded after {recorded:.1f} s")
    job_log = (run_dir / "job.log").read_text()
    assert re.search(r"error: stalled: .*rank 1 \(node2\)", job_log), job_log[-3000:]
    assert "stalled (see the error above); requeueing to resume" in job_log
    start_early(job)
    wait_until(lambda: '"status": "completed"' in (run_dir / "runlog.jsonl").read_text(), 600,
               log_tail(run_dir, "the requeued job did not complete"))
    fields = wait_job(job, timeout=120)
    assert (fields["JobState"], fields["Restarts"]) == ("COMPLETED", "1")
    log = read_runlog(run_dir)
    ends = [r for r in log if r["event"] == "end"]
    assert [(r["status"], r.get("ranks"), r.get("hosts")) for r in ends] == \
        [("stalled", [1], ["node2"]), ("completed", None, None)]
    resumed = [r for r in log if r["event"] == "start"][1]["resumed_from"]
    assert re.search(r"/checkpoints/epoch-\d{4}$", resumed), resumed
    assert sorted({r["epoch"] for r in log if r["event"] == "epoch"}) == list(range(1, env["EPOCHS"] + 1))


def test_a_rank_stuck_in_its_start_up_is_logged_and_the_job_requeued(cluster, records_dir, tmp_path):
    """Rank 1 (node2) stopped as its process starts (before the watch runs: a node whose file
    system hangs): past the stall timeout plus a minute a start-up watcher writes the run log's
    stalled end and kills its rank, srun ends the step, the template requeues the job once and
    the requeued attempt completes. Such a job used to end unrequeued."""
    env = WORKLOAD | FP32 | {"DATA_DIR": records_dir, "RUN_ROOT": tmp_path / "runs", "EPOCHS": 2,
                             "TRAIN_ARGS": f"--stall-timeout {STALL}"}
    job = submit(PREEMPTED, env, tmp_path, *TWO_NODES)
    run_dir = tmp_path / "runs" / directives(PREEMPTED)["job-name"] / job
    deadline = time.monotonic() + 180
    while 1 not in (pids := rank_pids(run_dir)):
        assert time.monotonic() < deadline, log_tail(run_dir, "rank 1 never started")()
        time.sleep(0.01)
    with stopped(pids[1]):
        wait_until(lambda: "Restarts=1" in run(["scontrol", "show", "job", job]).stdout, BOUND + 180,
                   log_tail(run_dir, "not requeued"))
    job_log = (run_dir / "job.log").read_text()
    assert re.search(rf"error: stalled: node[12] \(pid \d+\) still .* after {BOUND} s of start-up", job_log), job_log[-3000:]
    assert "stalled (see the error above); requeueing to resume" in job_log, job_log[-3000:]
    start_early(job)
    fields = wait_job(job, timeout=600)
    assert (fields["JobState"], fields["Restarts"]) == ("COMPLETED", "1"), (run_dir / "job.log").read_text()[-3000:]
    ends = [(r["status"], r.get("before_start")) for r in read_runlog(run_dir) if r["event"] == "end"]
    assert ends == [("stalled", True), ("completed", None)], ends


def test_a_job_suspended_for_longer_than_the_stall_timeout_resumes_and_completes(cluster, records_dir, tmp_path):
    """scontrol suspend (what gang scheduling and suspend-preemption do: every process of the
    job stopped) for 3x the stall timeout, then scontrol resume: the ranks see their peers were
    stopped with them, so no stall; the job completes in its first attempt, job.log saying it
    was suspended. Each rank used to take the pause for a stall and exit 76, with no end record
    (not requeued)."""
    env = WORKLOAD | FP32 | {"DATA_DIR": records_dir, "RUN_ROOT": tmp_path / "runs", "EPOCHS": 12,
                             "TRAIN_ARGS": f"--stall-timeout {STALL}"}
    job = submit(PREEMPTED, env, tmp_path, *TWO_NODES)
    run_dir = tmp_path / "runs" / directives(PREEMPTED)["job-name"] / job
    first_epoch(run_dir, job)
    run(["scontrol", "suspend", job], check=True)
    time.sleep(3 * STALL)
    run(["scontrol", "resume", job], check=True)
    fields = wait_job(job, timeout=300)
    job_log = (run_dir / "job.log").read_text()
    assert (fields["JobState"], fields["Restarts"]) == ("COMPLETED", "0"), job_log[-3000:]
    assert re.search(r"note: stall watch: the job did not run for (29|3\d) s \(suspended with every rank", job_log), \
        job_log[-3000:]
    assert "error: stalled" not in job_log, job_log[-3000:]
    assert [r["status"] for r in read_runlog(run_dir) if r["event"] == "end"] == ["completed"]


@pytest.mark.parametrize("second", ["stalls before an epoch", "fails before its start"])
def test_a_requeued_attempt_is_judged_by_what_it_wrote(cluster, second, records_dir, tmp_path):
    """Rank 1 stopped after epoch 1: the job requeues. Its second attempt then stalls again
    before it completes an epoch (rank 1 stopped as the attempt's start record is written): the
    job ends, not requeued again (a bad node is not retried for the whole time limit). Or it
    fails before its start record (its records moved away): the job ends with that error's exit
    code, not requeued again, though the run log's last end (the first attempt's) says stalled
    (such an attempt was requeued for the whole time limit)."""
    data = tmp_path / "records"
    shutil.copytree(records_dir, data)
    env = WORKLOAD | FP32 | {"DATA_DIR": data, "RUN_ROOT": tmp_path / "runs", "EPOCHS": 12,
                             "TRAIN_ARGS": f"--stall-timeout {STALL}"}
    job = submit(PREEMPTED, env, tmp_path, *TWO_NODES)
    run_dir = tmp_path / "runs" / directives(PREEMPTED)["job-name"] / job
    runlog = run_dir / "runlog.jsonl"
    first_epoch(run_dir, job)
    with stopped(rank_pids(run_dir)[1]):
        wait_until(lambda: "Restarts=1" in run(["scontrol", "show", "job", job]).stdout, BOUND + 180,
                   log_tail(run_dir, "not requeued"))
    if second == "fails before its start":
        data.rename(tmp_path / "moved")
        start_early(job)
        fields = wait_job(job, timeout=300)
    else:
        start_early(job)
        wait_until(lambda: runlog.read_text().count('"event": "start"') == 2, 300,
                   log_tail(run_dir, "the requeued attempt never started"))
        with stopped(rank_pids(run_dir)[1]):
            fields = wait_job(job, timeout=BOUND + 120)
    job_log = (run_dir / "job.log").read_text()
    assert (fields["JobState"], fields["Restarts"]) == ("FAILED", "1"), job_log[-3000:]
    assert job_log.count("requeueing to resume from the newest checkpoint") == 1, job_log[-3000:]
    ends = [r["status"] for r in read_runlog(run_dir) if r["event"] == "end"]
    if second == "fails before its start":
        # srun's code is its tasks' highest: 2, or 143 for a rank it ended after the other's 2
        assert fields["ExitCode"] in ("2:0", "143:0") and ends == ["stalled"], job_log[-3000:]
        assert re.search(rf"^error: {data}\S*: ", job_log, re.M), job_log[-3000:]
    else:
        assert ends == ["stalled", "stalled"], job_log[-3000:]
        assert "stalled again before an epoch completed (2 attempts in a row); not requeueing" in job_log


def test_a_cut_link_ends_the_job_within_the_bound_naming_the_node(cluster, records_dir, tmp_path):
    """node2's link cut in mid-epoch (packets dropped, as with a pulled cable): the chief on
    node1 hears no more from rank 1 and ends the job within the bound, naming node2, and the
    template requeues it (a requeued attempt's resume is the preemption test's)."""
    env = WORKLOAD | FP32 | {"DATA_DIR": records_dir, "RUN_ROOT": tmp_path / "runs", "EPOCHS": 30,
                      "TRAIN_ARGS": f"--stall-timeout {STALL}"}
    job = submit(PREEMPTED, env, tmp_path, *TWO_NODES)
    run_dir = tmp_path / "runs" / directives(PREEMPTED)["job-name"] / job
    first_epoch(run_dir, job)
    run(["bash", "tools/slurm_local.sh", "link", "node2", "down"], check=True)
    cut = time.monotonic()
    try:
        wait_until(lambda: '"status": "stalled"' in (run_dir / "runlog.jsonl").read_text(), BOUND,
                   log_tail(run_dir, "no stall recorded"))
        recorded = time.monotonic() - cut
    finally:
        run(["bash", "tools/slurm_local.sh", "link", "node2", "up"], check=True)
    print(f"node2's link cut: stall recorded after {recorded:.1f} s")
    end = [r for r in read_runlog(run_dir) if r["event"] == "end"][0]
    assert (end["status"], end["ranks"], end["hosts"]) == ("stalled", [1], ["node2"]), end
    wait_until(lambda: "Restarts=1" in run(["scontrol", "show", "job", job]).stdout, 300,
               log_tail(run_dir, "not requeued"))
    job_log = (run_dir / "job.log").read_text()  # the message a user reads
    assert re.search(r"error: stalled: .*waiting for rank 1 \(node2\): no heartbeat", job_log), job_log[-3000:]
    assert "stalled (see the error above); requeueing to resume" in job_log
    run(["scancel", job])


def test_a_slow_link_is_network_bound(cluster, records_dir, tmp_path):
    """Both nodes' links at 10 Mbit/s: each step's allreduce of the small CNN's 180 KB of
    gradients (140 ms or more) takes far longer than its compute in fp32 (about 20 ms here;
    the template's mixed_float16 is emulated on a CPU, 0.4 s a step), and the scaling report
    (its epochs' most frequent verdict, the first left out) says network-bound."""
    env = WORKLOAD | FP32 | {"DATA_DIR": records_dir, "RUN_ROOT": tmp_path / "runs", "EPOCHS": 4}
    for node in ("node1", "node2"):
        run(["bash", "tools/slurm_local.sh", "link", node, "rate", "10mbit"], check=True)
    try:
        job = submit(PREEMPTED, env, tmp_path, *TWO_NODES)
        fields = wait_job(job, timeout=900)
    finally:
        for node in ("node1", "node2"):
            run(["bash", "tools/slurm_local.sh", "link", node, "rate", "unlimited"], check=True)
    assert (fields["JobState"], fields["ExitCode"]) == ("COMPLETED", "0:0"), failure_of(tmp_path, job)
    run_dir = tmp_path / "runs" / directives(PREEMPTED)["job-name"] / job
    said = [bottleneck.summary(r) for r in read_runlog(run_dir) if r["event"] == "epoch"]
    assert reported_bottleneck(run_dir) == "network-bound", said
