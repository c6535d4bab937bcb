"""The job templates on a real single-node Slurm (tools/slurm_local.sh: slurmctld + slurmd +
munge): every template parses (`bash -n`, `#SBATCH` lines first, `sbatch --test-only`), the CPU
template runs a 2-rank Horovod training to completion, and a USR1 before the time limit ends in
a checkpoint, a requeue and a resumed run that completes."""

import os
import re
import time

import pytest
from conftest import ROOT, run

from chexnet_hvd.runlog import read_runlog

pytestmark = [pytest.mark.slurm, pytest.mark.slow]
TEMPLATES = sorted((ROOT / "job_submissions" / "slurm").glob("*.sh"))
JOBS = [t for t in TEMPLATES if t.name != "common.sh"]


@pytest.fixture(scope="module")
def slurm():
    if os.geteuid() != 0:
        pytest.skip("the local Slurm needs root (slurmd, munged)")
    run(["bash", "tools/slurm_local.sh", "up"], check=True, timeout=600)
    return True


def test_the_job_templates_are_all_there():
    names = {t.name for t in JOBS}
    assert {"raw_1gpu.sh", "cpu.sh", "records_mpi.sh"} | {f"tfrec_{n}gpu.sh" for n in (1, 2, 4, 8, 16)} <= names


@pytest.mark.parametrize("template", TEMPLATES, ids=lambda t: t.name)
def test_template_syntax_and_sbatch_lines_first(template):
    assert run(["bash", "-n", str(template)]).returncode == 0
    lines = template.read_text().splitlines()
    directives = [i for i, line in enumerate(lines) if line.startswith("#SBATCH")]
    commands = [i for i, line in enumerate(lines) if line.strip() and not line.startswith("#")]
    if template.name != "common.sh":  # Slurm stops reading #SBATCH at the first command
        assert directives and max(directives) < min(commands), template.name
        sources = [lines[i] for i in commands if lines[i].startswith("source ")]
        assert len(sources) == 1 and "job_submissions/slurm/common.sh" in sources[0]
        assert len(commands) <= 5, f"{template.name}: the body belongs in common.sh"


@pytest.mark.parametrize("template", JOBS, ids=lambda t: t.name)
def test_sbatch_test_only_accepts_every_template(slurm, template):
    """The directives are parsed by sbatch itself; only the resource counts this one 2-CPU node
    cannot offer are scaled down on the command line (command-line options override #SBATCH)."""
    proc = run(["sbatch", "--test-only", "--nodes=1", "--ntasks-per-node=1", "--cpus-per-task=1",
                "--gres=none", str(template)])
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"Job \d+ to start at", proc.stderr), proc.stderr


def wait_job(job_id: str, timeout: float) -> dict:
    """Poll scontrol until the job is finished; its fields as a dict."""
    deadline = time.monotonic() + timeout
    while True:
        text = run(["scontrol", "show", "job", job_id]).stdout
        fields = dict(re.findall(r"(\w+)=(\S+)", text))
        if fields.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"):
            return fields
        if time.monotonic() > deadline:
            run(["scancel", job_id])
            raise AssertionError(f"job {job_id} still {fields.get('JobState')} after {timeout} s")
        time.sleep(1)


def submit_cpu_job(records_dir, tmp_path, epochs: int) -> str:
    env = {"DATA_DIR": str(records_dir), "RUN_ROOT": str(tmp_path / "runs"), "MODEL": "small_cnn",
           "IMAGE_SIZE": "32", "BATCH_SIZE": "8", "EPOCHS": str(epochs), "TRAIN_ARGS": "--verbose 0"}
    proc = run(["sbatch", "--parsable", f"--output={tmp_path}/%x-%j.out",
                "job_submissions/slurm/cpu.sh"], env=env, check=True)
    return proc.stdout.strip().split(";")[0]


def test_cpu_template_trains_two_ranks_to_completion(slurm, records_dir, tmp_path):
    job = submit_cpu_job(records_dir, tmp_path, epochs=2)
    fields = wait_job(job, timeout=300)
    output = next(tmp_path.glob(f"*-{job}.out")).read_text()
    assert (fields["JobState"], fields["ExitCode"]) == ("COMPLETED", "0:0"), output[-3000:]
    run_dir = tmp_path / "runs" / "chexnet-cpu" / job
    log = read_runlog(run_dir)
    start = log[0]
    assert (start["world_size"], start["horovod_backend"], start["slurm_job_id"]) == (2, "mpi", job)
    assert [r["epoch"] for r in log if r["event"] == "epoch"] == [1, 2]
    assert log[-1] == log[-1] | {"event": "end", "status": "completed"}
    assert (run_dir / "job.log").is_file() and "2 ranks via srun" in (run_dir / "job.log").read_text()


def test_usr1_checkpoints_requeues_and_the_job_resumes(slurm, records_dir, tmp_path):
    job = submit_cpu_job(records_dir, tmp_path, epochs=12)
    runlog = tmp_path / "runs" / "chexnet-cpu" / job / "runlog.jsonl"
    deadline = time.monotonic() + 180
    while not (runlog.is_file() and '"event": "epoch"' in runlog.read_text()):
        assert time.monotonic() < deadline, "the job never finished an epoch"
        time.sleep(0.5)
    # What Slurm does at --signal=B:USR1@300: USR1 to the batch shell only.
    run(["scancel", "--batch", "--signal=USR1", job], check=True)
    deadline = time.monotonic() + 120
    while "Restarts=1" not in run(["scontrol", "show", "job", job]).stdout:
        assert time.monotonic() < deadline, "the job was not requeued"
        time.sleep(0.5)
    # Slurm holds a requeued job back for about 2 minutes before it may start again, so that the
    # node finishes cleaning up the old attempt; wait for that cleanup (the job's slurmstepd
    # processes gone), then let it start at once.
    while run(["pgrep", "-f", f"slurmstepd: \\[{job}\\."]).returncode == 0:
        assert time.monotonic() < deadline + 120, "the old attempt's steps never ended"
        time.sleep(0.5)
    run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=True)
    # Between the two attempts scontrol may show a finished state: wait for the second run's end.
    deadline = time.monotonic() + 600
    while '"status": "completed"' not in runlog.read_text():
        assert time.monotonic() < deadline, "the requeued job did not complete"
        time.sleep(1)
    fields = wait_job(job, timeout=120)
    assert (fields["JobState"], fields["Restarts"]) == ("COMPLETED", "1")
    log = read_runlog(runlog.parent)
    ends = [r["status"] for r in log if r["event"] == "end"]
    starts = [r for r in log if r["event"] == "start"]
    assert ends == ["preempted", "completed"] and len(starts) == 2
    assert "/checkpoints/step-" in starts[1]["resumed_from"] and starts[1]["initial_epoch"] >= 1
    assert max(r["epoch"] for r in log if r["event"] == "epoch") == 12


def test_nas_array_runs_two_candidates(slurm, records_dir, tmp_path):
    """Two array tasks, one search worker each, on one study: two candidates, one per task."""
    from chexnet_hvd.nas import study

    env = {"DATA_DIR": str(records_dir), "STUDY_DIR": str(tmp_path / "study"), "N_TRIALS": "2",
           "IMAGE_SIZE": "32", "BATCH_SIZE": "32", "EPOCHS": "1", "PRECISION": "fp32"}
    proc = run(["sbatch", "--parsable", "--array=0-1", "--gres=none", "--cpus-per-task=1",
                f"--output={tmp_path}/%x-%A_%a.out", "job_submissions/slurm/nas_array.sh"],
               env=env, check=True)
    array = proc.stdout.strip().split(";")[0]
    job_ids = set()
    for task in (0, 1):
        fields = wait_job(f"{array}_{task}", timeout=300)
        job_ids.add(fields["JobId"])
        output = (tmp_path / f"chexnet-nas-{array}_{task}.out").read_text()
        assert (fields["JobState"], fields["ExitCode"]) == ("COMPLETED", "0:0"), output[-3000:]
        assert f"array task {task}): NAS worker" in output
    rows = study.results(study.open_study(tmp_path / "study"))
    assert [r["state"] for r in rows] == ["complete", "complete"]
    assert len({r["architecture"] for r in rows}) == 2
    trials = study.open_study(tmp_path / "study").get_trials()
    assert {t.user_attrs["slurm_job"] for t in trials} <= job_ids
