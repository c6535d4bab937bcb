"""Resume and preemption with real 2-rank jobs under both engines (horovodrun; the tf engine's
launcher), at the defaults the Slurm templates use (no --deterministic); resumes onto another
batch or world size; a killed rank fails the job promptly, and so does a full disk at a
checkpoint; a kill in the middle of a checkpoint's write loses nothing (under the tf engine); a
rank gone at the last barrier leaves the other's exit code."""

import contextlib
import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import (
    ENGINES,
    ROOT,
    VENV_BIN,
    assert_one_line_error,
    assert_ranks_identical,
    fill,
    launcher,
    module,
    ranks,
    ranks_of,
    run,
    small_disk,
)

from chexnet_hvd import checkpoints, data
from chexnet_hvd.runlog import read_runlog

pytestmark = [pytest.mark.slow, pytest.mark.mpi]


def train_cmd(records_dir, run_dir, *extra, engine="horovod"):
    """2 ranks of the small CNN at 8 px (from the 32-px records): mixed_float16 is emulated on a
    CPU, and its 2-epoch runs at 16 px took 1.4x the time (20 s against 14 s)."""
    return ranks(engine, 2, sys.executable, "-m", "chexnet_hvd.train", "--data", records_dir,
                 "--run-dir", run_dir, "--model", "small_cnn", "--image-size", 8, "--batch-size", 8,
                 "--verbose", 0, "--threads", 1, "--warmup-epochs", 1, *extra)


def one_process(cmd: list[str]) -> list[str]:
    """A 2-rank command as one process, no launcher (a world of one), under the default engine
    (tf where Horovod is not installed)."""
    cmd = cmd[cmd.index(sys.executable, 1):]
    return cmd[:-2] if cmd[-2] == "--engine" else cmd


def start(cmd):
    env = os.environ | {"PATH": f"{VENV_BIN}:{os.environ['PATH']}"}
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def wait_for(predicate, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return False


# mixed_float16: the loss scale and its count of good steps are resumed state too. No
# --deterministic: the templates do not pass it, and a resume must be exact without it.
EXACT = ["--audit", "--precision", "mixed_float16"]


@pytest.fixture(scope="module", params=ENGINES)
def engine(request):
    return request.param


@pytest.fixture(scope="module")
def straight(records_dir, tmp_path_factory, engine):
    """2 epochs, uninterrupted, on 2 ranks: what every resumed run must end bitwise equal to."""
    run_dir = tmp_path_factory.mktemp("straight")
    run(train_cmd(records_dir, run_dir, "--epochs", 2, *EXACT, engine=engine), timeout=300, check=True)
    return run_dir


@pytest.fixture(scope="module")
def preempted(records_dir, tmp_path_factory, engine):
    """The same 2 epochs in two attempts at 4 steps per call (--steps-per-execution 4: Keras
    runs 4 steps per call of its train function, an epoch's 26 steps on 2 ranks x 8 as 6 calls
    of 4 and one of 2): 1 epoch (a completed run), then resumed for 2 and stopped by
    --preempt-at-step 33, agreed on at the end of the first call that passes step 40 (39..42):
    16 batches into epoch 2. Tests resume copies of it (resume_a_copy)."""
    run_dir = tmp_path_factory.mktemp("preempted")
    calls = ["--steps-per-execution", 4, *EXACT]
    run(train_cmd(records_dir, run_dir, "--epochs", 1, *calls, engine=engine), timeout=300, check=True)
    proc = run(train_cmd(records_dir, run_dir, "--epochs", 2, "--resume", *calls, "--preempt-at-step", 33,
                         engine=engine), timeout=300)
    for rank in (0, 1):
        assert f"rank {rank}: preempted after step 42" in proc.stderr, proc.stderr[-2000:]
    return run_dir


def resume_a_copy(records_dir, preempted, tmp_path, engine, *extra, alone: bool = False) -> Path:
    """A copy of the preempted run (its links kept as links: best/ is one) resumed to the end of
    epoch 2 by `engine` on 2 ranks (`alone`: as one process, no launcher), at one step per call
    unless `extra` says otherwise."""
    split = tmp_path / "split"
    shutil.copytree(preempted, split, symlinks=True)
    cmd = train_cmd(records_dir, split, "--epochs", 2, *EXACT, "--resume", *extra, engine=engine)
    run(one_process(cmd) if alone else cmd, timeout=300, check=True)
    return split


def assert_same_weights(a, b, within: float = 0.0) -> None:
    """Each rank's weights and optimizer state (slots, step, loss scale, good steps): bitwise
    (the same ops on the same CPU), or each array within `within` of the other's norm (another
    engine's allreduce)."""
    for rank in (0, 1):
        for name in (f"rank{rank}.npz", f"rank{rank}-optimizer.npz"):
            x, y = (np.load(d / "audit" / name) for d in (a, b))
            assert len(x.files) == len(y.files), name
            for key in x.files:
                if within:
                    gap = np.linalg.norm((x[key] - y[key]).ravel()) / np.linalg.norm(y[key].ravel())
                    assert gap <= within, (name, key, gap)
                else:
                    np.testing.assert_array_equal(x[key], y[key], f"{name} {key}")


def test_sigterm_checkpoints_and_exits_75(records_dir, tmp_path, engine):
    """SIGTERM stops every rank after the same step, with a step checkpoint, and the job exits
    75. (It only sets the stop flag --preempt-at-step sets too: resuming from such a checkpoint
    is test_resumes_at_an_epochs_end_and_in_mid_epoch_are_exact's.)"""
    run_dir = tmp_path / "run"
    proc = start(train_cmd(records_dir, run_dir, "--epochs", 200, engine=engine))
    assert wait_for(lambda: (run_dir / "checkpoints" / "epoch-0001").is_dir(), 240), proc.communicate()[0][-3000:]
    proc.send_signal(signal.SIGTERM)  # what scancel / a Slurm time limit sends
    t0 = time.monotonic()
    out, _ = proc.communicate(timeout=60)
    assert time.monotonic() - t0 < 30
    # the tf launcher passes the ranks' 75 on; horovodrun's own report after it forwarded a
    # SIGTERM varies (README), so there each rank's own line is what is asserted, and below the
    # run log's end
    if engine == "horovod":
        assert out.count("exiting 75 once the checkpoint is written") == 2, out[-3000:]
    else:
        assert proc.returncode == 75, out[-3000:]
    end = read_runlog(run_dir)[-1]
    assert end["event"] == "end" and end["status"] == "preempted"
    ckpt = checkpoints.newest(run_dir / "checkpoints")
    assert ckpt.name == f"step-{end['step']:09d}" and checkpoints.read_meta(ckpt)["step"] == end["step"]


@pytest.mark.parametrize("engine, ending", [("tf", "preempted"), ("horovod", "preempted"), ("horovod", "completed")])
def test_a_rank_gone_at_the_last_barrier_leaves_the_others_exit_code(tmp_path, engine, ending):
    """The other rank gone when rank 0 reaches the last barrier (as when the tf engine's ring
    let it through its part first and it exited): rank 0's barrier fails as a peer's leaving
    does; it says so in one warning and exits as its run ended (75 preempted: requeue; 0
    completed), without a traceback."""
    proc = run([*launcher(engine, 2), sys.executable, "tests/barrier_worker.py", engine, ending], timeout=120)
    out = proc.stdout + proc.stderr
    assert f"warning: rank 0: another rank left at the end of a {ending} run (" in out, out[-3000:]
    ranks_out = out if engine == "tf" else "\n".join(re.findall(r"^\[\d\]<std\w+>:.*$", out, re.M))  # not horovodrun's own
    assert "Traceback" not in ranks_out, out[-3000:]
    code = 0 if ending == "completed" else 75
    if engine == "horovod" and code:  # horovodrun names the first rank that exited non-zero
        assert re.search(rf"Process name: 0\nExit code: {code}$", out, re.M), out[-3000:]
    else:
        assert proc.returncode == code, out[-3000:]


def test_single_process_sigusr1_exits_75(records_dir, tmp_path):
    run_dir = tmp_path / "one"
    proc = start(one_process(train_cmd(records_dir, run_dir, "--epochs", 200)))
    assert wait_for(lambda: (run_dir / "checkpoints" / "epoch-0001").is_dir(), 240)
    proc.send_signal(signal.SIGUSR1)
    assert proc.wait(timeout=60) == 75


def test_killed_rank_fails_the_job_promptly(records_dir, tmp_path, engine):
    run_dir = tmp_path / "kill"
    proc = start(train_cmd(records_dir, run_dir, "--epochs", 200, engine=engine))
    assert wait_for(lambda: (run_dir / "checkpoints" / "epoch-0001").is_dir(), 240)
    victim = ranks_of(run_dir)[1]  # by its launcher's environment: pids wrap around
    os.kill(victim, signal.SIGKILL)
    t0 = time.monotonic()
    proc.communicate(timeout=120)
    assert proc.returncode != 0 and time.monotonic() - t0 < 60
    assert checkpoints.read_meta(run_dir / "checkpoints" / "epoch-0001")["epoch"] == 1  # still usable
    assert wait_for(lambda: subprocess.run(["pgrep", "-f", f"chexnet_hvd.train.*{run_dir}"]).returncode != 0, 30)


def test_mixed_float16_on_two_ranks_end_to_end(records_dir, straight, tmp_path, engine):
    """The Slurm templates' default precision (the straight run's), 2 ranks: trains, checkpoints
    the loss scale, weights identical on both ranks; the fp16 + accumulation combination is
    refused."""
    import tensorflow as tf

    assert_ranks_identical(straight)
    log = read_runlog(straight)
    assert log[0]["precision"] == "mixed_float16" and log[-1]["status"] == "completed"
    names = [n for n, _ in tf.train.list_variables(str(straight / "checkpoints" / "epoch-0002" / "ckpt"))]
    assert any("loss_scale" in n for n in names), names
    if engine == "horovod":  # the trainer's refusal, before any engine starts: once
        refused = module("train", "--data", records_dir, "--run-dir", tmp_path / "no", "--precision",
                         "mixed_float16", "--backward-passes-per-step", 2)
        assert_one_line_error(refused, "error: --backward-passes-per-step")


def test_resumes_at_an_epochs_end_and_in_mid_epoch_are_exact(records_dir, straight, preempted, tmp_path, engine):
    """Resumed after epoch 1, and again 16 batches into epoch 2 at 3 steps per call (the
    attempts before at 4): the run skips exactly the batches it trained, and ends with the same
    52 steps, the same records and, bitwise, the same weights and optimizer state as 2 epochs
    straight at one step per call."""
    split = resume_a_copy(records_dir, preempted, tmp_path, engine, "--steps-per-execution", 3)
    log = read_runlog(split)
    starts = [r for r in log if r["event"] == "start"]
    assert [(s["initial_epoch"], s["initial_step"]) for s in starts] == [(0, 0), (1, 26), (1, 42)]
    assert starts[1]["resumed_from"].endswith("epoch-0001") and starts[2]["resumed_parts"] == [[2, 8, 26, 16]]
    assert [(r["epoch"], r["steps"]) for r in log if r["event"] == "epoch"] == [(1, 26), (2, 10)]
    metas = [checkpoints.read_meta(d / "checkpoints" / "epoch-0002") for d in (straight, split)]
    assert metas[0]["step"] == metas[1]["step"] == 52
    assert trained(straight, 2) == trained(split, 2)
    assert_same_weights(straight, split)


WRITING = re.compile(r"\.step-(\d+)\.tmp\d+")


def leftovers(ckpt_dir: Path) -> list[str]:
    """The hidden names a kill in the middle of a checkpoint write leaves."""
    return [n for n in os.listdir(ckpt_dir) if checkpoints.LEFTOVER.fullmatch(n)]


def kill_in_a_write(proc, run_dir: Path, after_step: int, timeout: float = 240) -> list[str]:
    """SIGKILL every process of the job the moment the chief is seen writing a step checkpoint
    past `after_step` (its hidden `.step-N.tmpPID`): what a node's loss or scancel at the end
    of a grace period does. The hidden names on disk after the kill."""
    ckpt_dir, deadline, pids = run_dir / "checkpoints", time.monotonic() + timeout, {}

    def kill() -> None:
        for pid in [*(pids[r] for r in sorted(pids)), *ranks_of(run_dir).values()]:  # the chief first
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher too
        proc.wait()

    while proc.poll() is None and time.monotonic() < deadline:
        names = os.listdir(ckpt_dir) if ckpt_dir.is_dir() else []
        if len(pids) < 2:  # the ranks' pids once they write (looked up before the race begins)
            pids = ranks_of(run_dir) if names else {}
        elif any((m := WRITING.fullmatch(n)) and int(m[1]) > after_step for n in names):
            kill()
            return leftovers(ckpt_dir)
        time.sleep(0.001)
    kill()
    raise AssertionError(f"the run ended ({proc.poll()}) or hung before step {after_step}: "
                         f"{proc.stdout.read()[-2000:]}")


def test_a_sigkill_in_the_middle_of_a_checkpoint_write_loses_nothing(records_dir, straight, tmp_path, engine):
    """A checkpoint every step (--checkpoint-every-steps 1), and the whole job SIGKILLed while
    the chief writes one, again after each resume, until a kill has left a partial copy on disk
    (a kill that lands after the rename leaves none, and the run is killed again further on).
    Each resume deletes the partial copy, says so, and goes on from the newest complete
    checkpoint; the run ends with the same weights, bitwise, as 2 epochs straight."""
    if engine == "horovod":
        pytest.skip("the chief's write and a resume's clean-up are the same under both engines; the tf "
                    "engine's other ranks also write scratch copies, so its run is the one kept")
    run_dir = tmp_path / "killed"
    cmd = train_cmd(records_dir, run_dir, "--epochs", 2, *EXACT, "--checkpoint-every-steps", 1, engine=engine)
    partial, kills, after = [], 0, 8
    while not partial and kills < 6:
        proc = start([*cmd, "--resume"] if kills else cmd)
        partial = kill_in_a_write(proc, run_dir, after)
        kills, after = kills + 1, after + 7
    assert partial, f"none of {kills} kills landed inside a write"
    resumed = run([*cmd, "--resume"], timeout=300, check=True)
    assert f"resume: {partial[0]}: deleted" in resumed.stdout + resumed.stderr
    assert not leftovers(run_dir / "checkpoints")
    assert checkpoints.read_meta(run_dir / "checkpoints" / "epoch-0002")["step"] == 52
    assert module("runlog", run_dir, check=True).stdout.strip() == "completed"
    assert_same_weights(straight, run_dir)


def test_a_run_resumes_under_the_other_engine(records_dir, straight, preempted, tmp_path, engine):
    """Preempted 16 batches into epoch 2 under one engine's launcher and resumed under the
    other's (a template's ENGINE changed between attempts): the checkpoint holds the plain
    model and optimizer, so the run completes with the straight run's records and weights, to
    the rounding the two engines' allreduce arithmetic gives (each array within 1e-4 of its
    norm: up to 2e-5 measured, in an Adam moment; the records trained are compared exactly)."""
    other = "tf" if engine == "horovod" else "horovod"
    split = resume_a_copy(records_dir, preempted, tmp_path, other)
    starts = [r for r in read_runlog(split) if r["event"] == "start"]
    assert [(s["engine"], s["initial_step"]) for s in starts] == [(engine, 0), (engine, 26), (other, 42)]
    assert trained(straight, 2) == trained(split, 2)
    assert_same_weights(straight, split, within=1e-4)


def trained(run_dir, ranks: int) -> dict[int, list[str]]:
    """--audit's record ids each epoch trained, over all ranks and attempts: {epoch: sorted ids}."""
    out: dict[int, list[str]] = {}
    for rank in range(ranks):
        path = run_dir / "audit" / f"rank{rank}-trained.jsonl"
        for line in path.read_text().splitlines() if path.is_file() else []:
            part = json.loads(line)
            out.setdefault(part["epoch"], []).extend(part["ids"])
    return {epoch: sorted(ids) for epoch, ids in out.items()}


def epoch_lrs(run_dir) -> list[float]:
    return [r["lr"] for r in read_runlog(run_dir) if r["event"] == "epoch"]


# A schedule of the step, with warmup: tests/test_schedules.py has every schedule with and
# without warmup through a resumed part, which the trainer resumes as it does this one (plateau
# multiplies it by a scale its checkpoint keeps, whatever the batch). An lr too small to move
# the weights: the lrs compare exactly.
def test_a_resume_at_twice_the_batch_keeps_the_schedule_and_trains_each_record_once(records_dir, tmp_path):
    """Preempted 18 batches into epoch 2 (52 steps of 8) and resumed at batch 16: every epoch
    ends at the straight run's lr times 2 (the global-batch ratio), and epoch 2 trains each
    record once: the 144 the first attempt took, then 17 steps of 16 of the other 276 (the 4
    left over are fewer than one new global batch)."""
    cmd = one_process(train_cmd(records_dir, tmp_path / "straight", "--epochs", 3, "--lr", 1e-9,
                                "--schedule", "cosine", "--warmup-epochs", 1.5, "--no-tensorboard", "--audit"))
    run(cmd, timeout=300, check=True)
    split = [str(tmp_path / "split") if a == str(tmp_path / "straight") else a for a in cmd]
    assert run([*split, "--preempt-at-step", "61"], timeout=300).returncode == 75  # agreed at step 70
    run([*split, "--resume", "--batch-size", "16"], timeout=300, check=True)
    straight_lr, split_lr = epoch_lrs(tmp_path / "straight"), epoch_lrs(tmp_path / "split")
    assert split_lr[0] == straight_lr[0]
    assert split_lr[1:] == pytest.approx([2 * lr for lr in straight_lr[1:]], rel=1e-6, abs=1e-30)
    log = read_runlog(tmp_path / "split")
    assert [(r["epoch"], r["steps"]) for r in log if r["event"] == "epoch"] == [(1, 52), (2, 17), (3, 26)]
    epoch2 = trained(tmp_path / "split", 1)[2]
    assert len(epoch2) == len(set(epoch2)) == 144 + 17 * 16
    assert trained(tmp_path / "split", 1)[1] == trained(tmp_path / "straight", 1)[1]


def test_an_epoch_a_resume_leaves_empty_ends_as_epochs_do_without_throughput_or_loss(records_dir, tmp_path):
    """Preempted after 51 of epoch 2's 52 steps of 8 (12 of its 420 records left) and resumed at
    batch 16: epoch 2 has no step left. It still ends as epochs do (validated, checkpointed,
    logged), with 0 steps and no img/s or train loss: null, not NaN (the log stays strict JSON).
    The scaling report leaves it out: that attempt trained nothing to time, so it has no row."""
    cmd = one_process(train_cmd(records_dir, tmp_path, "--epochs", 2, "--stop-check-steps", 1,
                                "--no-tensorboard"))
    assert run([*cmd, "--preempt-at-step", "103"], timeout=300).returncode == 75
    resumed = run([*cmd, "--resume", "--batch-size", "16", "--verbose", "2"], timeout=300, check=True)

    def strict(constant):
        raise AssertionError(f"{constant} in the run log")

    log = [json.loads(line, parse_constant=strict)
           for line in (tmp_path / "runlog.jsonl").read_text().splitlines()]
    last = [r for r in log if r["event"] == "epoch"][-1]
    assert (last["epoch"], last["steps"], last["images_per_sec"], last["train_loss"]) == (2, 0, None, None)
    assert last["val_n"] > 0 and log[-1]["status"] == "completed"
    assert checkpoints.read_meta(tmp_path / "checkpoints" / "epoch-0002")["epoch"] == 2
    assert "epoch 2: no step left to train" in resumed.stdout, resumed.stdout[-2000:]
    report = run([sys.executable, str(ROOT / "tools" / "scaling_report.py"), str(tmp_path)], check=True).stdout
    assert "batch 8 per rank" in report and "batch 16 per rank" not in report, report


def test_a_resume_on_another_world_size_keeps_the_schedule_and_trains_each_record_once(
        records_dir, straight, preempted, tmp_path, engine):
    """Preempted in epoch 2 on 2 ranks, resumed as one process: epoch 2 ends at half the
    straight run's lr (global batch 8, not 16), and its records are trained once each."""
    split = resume_a_copy(records_dir, preempted, tmp_path, engine, alone=True)
    assert epoch_lrs(split) == pytest.approx([epoch_lrs(straight)[0], epoch_lrs(straight)[1] / 2])
    log = read_runlog(split)
    assert [(r["epoch"], r["steps"]) for r in log if r["event"] == "epoch"] == [(1, 26), (2, 20)]  # (420 - 256) // 8
    epoch2 = trained(split, 2)[2]
    assert len(epoch2) == len(set(epoch2)) == 2 * 16 * 8 + 20 * 8


def test_a_best_a_kill_kept_from_being_set_is_set_by_the_resume(records_dir, preempted, tmp_path, engine):
    """The preempted run's best/ taken away, as a kill between epoch 1's checkpoint and its best/
    would leave it: the resume sets it from the epoch checkpoint whose score its meta holds as
    the best, and says so (the run, counting from that score, would otherwise leave best/ missing,
    or on an older epoch, unless a later epoch beat it). One engine: the chief's work alone."""
    if engine != ENGINES[-1]:
        pytest.skip("the chief alone mends best/, the same under both engines")
    split = tmp_path / "split"
    shutil.copytree(preempted, split, symlinks=True)
    best = split / "checkpoints" / "best"
    shutil.rmtree(best.resolve())
    best.unlink()
    by, score = (checkpoints.read_meta(split / "checkpoints" / "epoch-0001")[k] for k in ("best_by", "best"))
    assert score is not None
    cmd = train_cmd(records_dir, split, "--epochs", 2, *EXACT, "--resume", engine=engine)
    resumed = run(one_process(cmd), timeout=300, check=True)
    assert "resume: best: now epoch-0001, the best epoch" in resumed.stderr, resumed.stderr[-2000:]
    final = checkpoints.read_meta(split / "checkpoints" / "epoch-0002")["best"]
    assert checkpoints.read_meta(best)[by] == final  # epoch 1's, or epoch 2's where it beat it


def test_a_resume_on_another_world_size_keeps_the_default_warmup_of_the_first_attempt(records_dir, tmp_path):
    """At the default --warmup-epochs (proportional to the global batch: 32 / 2 / 8 = 2 epochs,
    from the peak over 2 ranks), preempted in epoch 1 on 2 ranks and resumed as one process:
    the warmup keeps its length and start (a resume used to derive its own: 1 epoch from the
    full peak), so every epoch ends at half the straight run's lr, inside the warmup too."""
    common = ["--epochs", 3, "--batch-size", 16, "--reference-batch", 2, "--warmup-epochs", -1,
              "--schedule", "cosine"]
    run(train_cmd(records_dir, tmp_path / "straight", *common), timeout=300, check=True)
    split = train_cmd(records_dir, tmp_path / "split", *common)
    preempted = run([*split, "--preempt-at-step", "3"], timeout=300)
    assert "rank 0: preempted after step 10" in preempted.stderr, preempted.stderr[-2000:]  # of 13
    run([*one_process(split), "--resume"], timeout=300, check=True)
    straight_lr, split_lr = epoch_lrs(tmp_path / "straight"), epoch_lrs(tmp_path / "split")
    assert len(split_lr) == 3 and split_lr == pytest.approx([lr / 2 for lr in straight_lr], rel=1e-5, abs=1e-12)
    warmup = [r["warmup_epochs"] for r in read_runlog(tmp_path / "split") if r["event"] == "start"]
    assert warmup == [2.0, 2.0]


def test_a_mid_epoch_resume_refuses_other_records_and_takes_a_staged_copy(records_dir, synthetic, tmp_path):
    """Stopped in mid-epoch, a run resumed on records rewritten with another shard size (its
    parts would index into other shards: records trained twice or never), or by a version that
    reads epochs in another order (a checkpoint without its record order: written by the block
    shuffle's), is a one-line error; resumed on a copy of its records at another path (staged
    to a node's disk) it completes."""
    cmd = one_process(train_cmd(records_dir, tmp_path / "run", "--epochs", 2))
    assert run([*cmd, "--preempt-at-step", "5"], timeout=300).returncode == 75

    def on(data):
        return [*cmd[:cmd.index("--data") + 1], str(data), *cmd[cmd.index("--data") + 2:], "--resume"]

    meta_file = next((tmp_path / "run" / "checkpoints").glob("step-*")) / "meta.json"
    meta = json.loads(meta_file.read_text())
    assert meta["record_order"] == data.RECORD_ORDER
    meta_file.write_text(json.dumps({k: v for k, v in meta.items() if k != "record_order"}))
    assert_one_line_error(run(on(records_dir), timeout=300), "step-", "stopped in mid-epoch reading its records in "
                          "order 1", "resume from an epoch checkpoint")
    meta_file.write_text(json.dumps(meta))

    module("records", "--csv", synthetic / "Data_Entry_2017.csv", "--images", synthetic / "images", "--out",
           tmp_path / "rewritten", "--shard-size", 32, "--no-progress", check=True)
    assert_one_line_error(run(on(tmp_path / "rewritten"), timeout=300), "--data", "stopped in mid-epoch on",
                          "resume with those records, or from an epoch checkpoint")
    shutil.copytree(records_dir, tmp_path / "staged")
    run(on(tmp_path / "staged"), timeout=300, check=True)
    assert [r["epoch"] for r in read_runlog(tmp_path / "run") if r["event"] == "epoch"] == [1, 2]


def test_a_torn_run_log_line_loses_nothing(records_dir, tmp_path):
    """A kill (or a full disk) in the middle of a run-log write leaves a line without its end;
    the next attempt ends that line before it appends, so the requeue decision (the runlog CLI,
    which the Slurm templates ask), the next resume and the scaling report all still read the
    run, the torn line counted, never lost. The partial checkpoint such a kill leaves is
    deleted by the next attempt, which says so. At lr 0 the val AUROC never improves after
    epoch 1, so --early-stopping 2 ends the run after epoch 3 of 6: still so when it is
    preempted in epoch 3 and resumed (the count is in the checkpoint)."""
    cmd = one_process(train_cmd(records_dir, tmp_path, "--steps-per-epoch", 5, "--stop-check-steps", 1,
                                "--lr", 0, "--early-stopping", 2))
    run([*cmd, "--epochs", "1"], timeout=300, check=True)
    torn = '{"schema": "chexnet_hvd.runlog/1", "event": "epoch", "epo'
    with open(tmp_path / "runlog.jsonl", "a") as fh:
        fh.write(torn)
    partial = tmp_path / "checkpoints" / ".epoch-0002.tmp999999"  # a kill in a checkpoint's write, too
    partial.mkdir()
    (partial / "ckpt.data-00000-of-00001").write_bytes(b"\0" * 4096)
    first = run([*cmd, "--epochs", "6", "--resume", "--preempt-at-step", "13"], timeout=300)
    assert first.returncode == 75 and not partial.exists()
    assert "resume: .epoch-0002.tmp999999: deleted" in first.stdout + first.stderr
    assert module("runlog", tmp_path, check=True).stdout.strip() == "preempted"
    run([*cmd, "--epochs", "6", "--resume"], timeout=300, check=True)
    assert module("runlog", tmp_path, check=True).stdout.strip() == "completed"
    lines = (tmp_path / "runlog.jsonl").read_text().splitlines()
    assert torn in lines  # kept as it was, on a line of its own
    log = read_runlog(tmp_path)
    assert [r["status"] for r in log if r["event"] == "end"] == ["completed", "preempted", "completed"]
    assert [r["epoch"] for r in log if r["event"] == "epoch"] == [1, 2, 3]
    report = run([sys.executable, str(ROOT / "tools" / "scaling_report.py"), str(tmp_path), "--skip-epochs", "0"])
    assert report.returncode == 0 and "| 1 |" in report.stdout, report.stderr
    assert f"skipped unreadable line(s) {lines.index(torn) + 1}" in report.stderr


def test_a_checkpoint_torn_on_disk_is_passed_over_for_the_next_newest(records_dir, tmp_path):
    """A node that crashed after a checkpoint's rename, before its files reached the disk (or a
    copy cut short), leaves a complete-looking checkpoint whose data is cut short: the resume
    says so and goes on from the next newest, and the run completes; with every checkpoint
    torn, one line and exit 2, as evaluating one gives."""
    cmd = one_process(train_cmd(records_dir, tmp_path, "--steps-per-epoch", 3))
    run([*cmd, "--epochs", "2"], timeout=300, check=True)
    ckpts = tmp_path / "checkpoints"

    def tear(name: str) -> None:
        [data] = (ckpts / name).glob("ckpt.data-*")
        cut = data.read_bytes()[: data.stat().st_size // 2]
        data.unlink()  # a file of its own: `best` may be a hard link to it
        data.write_bytes(cut)

    tear("epoch-0002")
    resumed = run([*cmd, "--epochs", "3", "--resume"], timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert re.search(rf"^warning: resume: {ckpts}/epoch-0002: cannot be read: a file torn or corrupt "
                     r"\(IndexError: .*\); going on from the next newest, epoch-0001 \(this one kept as "
                     r"\.epoch-0002\.unreadable-\d+\)$", resumed.stderr, re.M), resumed.stderr[-3000:]
    assert len(list(ckpts.glob(".epoch-0002.unreadable-*/ckpt.data-*"))) == 1  # kept, out of the way
    log = read_runlog(tmp_path)
    assert [r["resumed_from"] for r in log if r["event"] == "start"] == [None, str(ckpts / "epoch-0001")]
    assert [r["epoch"] for r in log if r["event"] == "epoch"] == [1, 2, 2, 3] and log[-1]["status"] == "completed"
    for name in ("epoch-0001", "epoch-0002", "epoch-0003"):
        tear(name)
    assert_one_line_error(run([*cmd, "--epochs", "4", "--resume"], timeout=300), f"{ckpts}/epoch-0001",
                          "cannot be read: a file torn or corrupt")
    assert [p.name for p in ckpts.glob("epoch-*")] == ["epoch-0001"]  # the others set aside on the way
    assert_one_line_error(module("evaluate", "--checkpoint", ckpts / "epoch-0001", "--data", records_dir,
                                 timeout=300), f"{ckpts}/epoch-0001", "cannot be read")


def test_a_full_disk_at_a_checkpoint_ends_the_job_with_one_line_and_loses_nothing(records_dir, tmp_path, engine):
    """The checkpoints' file system fills up after epoch 1: the job (2 ranks) ends at epoch 2's
    checkpoint with one line naming it and the reason, no traceback from a rank, no partial copy
    left to hold space, the run log's end "failed" (the log is on another file system here; on
    the full one that record is lost and the next attempt reads the log as it was); epoch 1's
    checkpoint is whole, and once space is freed the run resumes from it and completes."""
    run_dir = tmp_path / "full"
    cmd = train_cmd(records_dir, run_dir, "--epochs", 3, engine=engine)
    with small_disk(run_dir / "checkpoints") as ckpts:
        proc = start(cmd)
        assert wait_for(lambda: checkpoints.read_meta(ckpts / "epoch-0001") is not None, 240)
        filler = fill(ckpts)
        out, _ = proc.communicate(timeout=180)
        assert proc.returncode not in (0, 75), out
        line = f"error: {ckpts / 'epoch-0002'}: cannot write this checkpoint: No space left on device"
        # the ranks' lines (horovodrun's own traceback aside)
        ours = [x for x in out.splitlines() if x.startswith("[")] if engine == "horovod" else out.splitlines()
        assert any(x.endswith(line) for x in ours) and not [x for x in ours if "Traceback" in x], out
        if engine == "tf":  # its launcher gives the others time to say why they end (horovodrun kills them)
            assert "error: rank 1: another rank left the job (" in out, out
        assert not [p.name for p in ckpts.iterdir() if ".tmp" in p.name]  # no partial copy
        assert checkpoints.read_meta(ckpts / "epoch-0001")["epoch"] == 1
        assert read_runlog(run_dir)[-1]["status"] == "failed"
        filler.unlink()
        run([*cmd, "--resume"], timeout=300, check=True)
        log = read_runlog(run_dir)
        assert [r["epoch"] for r in log if r["event"] == "epoch"] == [1, 2, 3]
        assert [r["status"] for r in log if r["event"] == "end"] == ["failed", "completed"]


def test_a_full_scratch_disk_on_a_tf_worker_ends_the_job_naming_its_host_and_copy(records_dir, tmp_path):
    """The tf engine's other workers each write a copy of every checkpoint under $TMPDIR (its
    variable reads are collectives), thrown away once written. That file system fills up once the
    run's epoch 1 is written (the worker's own copy of epoch 1 may still be in flight, so either
    copy may be the one refused): the job ends with one line naming the host, the scratch
    directory and that it was the worker's own copy (it named a directory already deleted, as if
    it were the run's), and the run's checkpoints are whole."""
    run_dir = tmp_path / "run"
    cmd = train_cmd(records_dir, run_dir, "--epochs", 3, engine="tf")
    with small_disk(tmp_path / "scratch") as scratch:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=os.environ | {"PATH": f"{VENV_BIN}:{os.environ['PATH']}",
                                                                  "TMPDIR": str(scratch)},
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        assert wait_for(lambda: checkpoints.read_meta(run_dir / "checkpoints" / "epoch-0001") is not None, 240)
        fill(scratch)
        out, _ = proc.communicate(timeout=180)
    assert proc.returncode not in (0, 75), out
    line = re.search(r"error: [^:\s]+:(\S+): this worker's own copy of checkpoint epoch-000[12], thrown away "
                     r"once written \(the tf engine's workers each write one, under \$TMPDIR\): cannot write "
                     r"this checkpoint: No space left on device", out)
    assert line and line[1].startswith(str(scratch)), out[-3000:]
    assert checkpoints.read_meta(run_dir / "checkpoints" / "epoch-0001")["epoch"] == 1


@pytest.mark.horovod
def test_chaos_preempted_at_random_steps_and_resumed_at_random_world_sizes(records_dir, tmp_path):
    """One run of 5 epochs, preempted twice and resumed each time, its 3 attempts on the world
    sizes 1, 2 and 4 in a seeded order (a change of size at each resume, up and down), each
    stopped at a random step (seeded) past an epoch of its own (so every size finishes an
    epoch): every epoch trains each record at most once and leaves out fewer than one global
    batch; each epoch ends at the lr of a straight one-process run times the global-batch
    ratio; the run log lists every attempt; the scaling report credits each epoch to the world
    size that trained it."""
    rng, total = np.random.default_rng(17), 420
    common = ["--epochs", "5", "--schedule", "cosine", "--warmup-epochs", "1", "--stop-check-steps", "1",
              "--no-tensorboard", "--audit"]
    straight = one_process(train_cmd(records_dir, tmp_path / "straight", *common))
    run(straight, timeout=300, check=True)

    def attempt(world: int, *extra: str):
        cmd = one_process(train_cmd(records_dir, tmp_path / "chaos", *common, *extra))
        return run(cmd if world == 1 else [*launcher("horovod", world), *cmd], timeout=600)

    worlds = [int(w) for w in rng.permutation([1, 2, 4])]

    def stop_after(step: int, world: int) -> str:  # an epoch at `world` and 3 to 10 steps more
        return str(step + total // (8 * world) + int(rng.integers(3, 11)))

    assert attempt(worlds[0], "--preempt-at-step", stop_after(0, worlds[0])).returncode != 0
    step = read_runlog(tmp_path / "chaos")[-1]["step"]
    assert attempt(worlds[1], "--resume", "--preempt-at-step", stop_after(step, worlds[1])).returncode != 0
    proc = attempt(worlds[2], "--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]

    log = read_runlog(tmp_path / "chaos")
    starts = [r for r in log if r["event"] == "start"]
    assert [s["world_size"] for s in starts] == worlds
    assert [r["status"] for r in log if r["event"] == "end"] == ["preempted"] * 2 + ["completed"]
    epochs = [r for r in log if r["event"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [1, 2, 3, 4, 5]
    credited = {}  # epoch -> the world size of the attempt that finished it
    for record in log:
        if record["event"] == "start":
            world = record["world_size"]
        elif record["event"] == "epoch":
            credited[record["epoch"]] = world
    assert sorted(set(credited.values())) == [1, 2, 4]
    straight_lr = epoch_lrs(tmp_path / "straight")
    assert epoch_lrs(tmp_path / "chaos") == pytest.approx(
        [lr * credited[e + 1] for e, lr in enumerate(straight_lr)], rel=1e-6, abs=1e-12)
    for epoch, ids in trained(tmp_path / "chaos", 4).items():
        assert len(ids) == len(set(ids)), epoch  # no record twice
        assert total - len(ids) < 8 * credited[epoch], (epoch, total - len(ids))
    report = run([sys.executable, str(ROOT / "tools" / "scaling_report.py"), str(tmp_path / "chaos"),
                  "--skip-epochs", "0", "--csv", str(tmp_path / "scaling.csv")], check=True)
    rows = {int(r["ranks"]): int(r["epochs"]) for r in csv.DictReader(open(tmp_path / "scaling.csv"))}
    assert rows == {w: sum(1 for e in credited.values() if e == w) for w in set(credited.values())}, report.stdout
