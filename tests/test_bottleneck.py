"""Why a run does not scale (chexnet_hvd.bottleneck): every epoch record carries the step time,
each rank's compute probe and how often its input was empty, and a verdict, which the scaling
report's row repeats. Real runs made input-bound (large stored images, a tiny model, one
thread) and with one CPU-starved rank; network-bound on a slowed rehearsal link:
tests/test_slurm.py."""

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, VENV_BIN, module, ranks_of, reported_bottleneck

from chexnet_hvd import bottleneck
from chexnet_hvd.runlog import read_runlog


def test_the_verdict_names_what_holds_the_step():
    assert bottleneck.verdict(0.10, [0.09, 0.09], [0.0, 0.1])["bottleneck"] == "compute-bound"
    assert bottleneck.verdict(0.10, [0.02, 0.02], [0.9, 0.0])["bottleneck"] == "input-bound"
    assert bottleneck.verdict(0.10, [0.02, 0.02], [0.0, 0.0])["bottleneck"] == "network-bound"
    slow = bottleneck.verdict(0.10, [0.03, 0.09, 0.03], [0.0, 0.0, 0.9])
    assert slow["bottleneck"] == "straggler (rank 1)" and slow["communication_seconds"] == pytest.approx(0.01)
    # of two ranks, the other's compute is the measure: 0.04 s of waiting, 2x its compute
    assert bottleneck.verdict(0.10, [0.08, 0.04], [0.0, 0.0])["bottleneck"] == "straggler (rank 0)"
    # a slower probe whose excess is a sliver of a long step is noise beside the network's share
    assert bottleneck.verdict(0.17, [0.009, 0.004], [0.0, 0.0])["bottleneck"] == "network-bound"
    assert bottleneck.verdict(0.10, [0.02], [0.0])["bottleneck"] == "compute-bound"  # one rank: no network


@pytest.mark.slow
def test_large_images_for_a_tiny_model_on_one_thread_are_input_bound(tmp_path):
    """768-px PNG files read through a raw-image index, each decoded and resized to 32 px on
    one CPU thread, for a model that computes little: the input is what the steps wait for.
    (Fixed-size records would resize in the model's graph, which here runs on the CPU too.)"""
    module("synthetic", "--out", tmp_path / "syn", "--images", 200, "--size", 768, "--seed", 3, check=True)
    module("records", "--csv", tmp_path / "syn" / "Data_Entry_2017.csv", "--images", tmp_path / "syn" / "images",
           "--out", tmp_path / "records", "--format", "raw", "--no-progress", check=True)
    module("train", "--data", tmp_path / "records", "--run-dir", tmp_path / "run", "--model", "small_cnn",
           "--image-size", 32, "--batch-size", 8, "--epochs", 2, "--threads", 1, "--verbose", 0,
           "--no-tensorboard", check=True, timeout=600)
    last = [r for r in read_runlog(tmp_path / "run") if r["event"] == "epoch"][-1]
    assert last["bottleneck"] == "input-bound", bottleneck.summary(last)
    assert last["input_starved"][0] > bottleneck.STARVED
    assert reported_bottleneck(tmp_path / "run") == "input-bound"


CPU_CGROUPS = Path("/sys/fs/cgroup/cpu")  # the cgroup (v1) cpu controller, writable by root here


@contextlib.contextmanager
def cpu_quota(pid: int, share: float, period_us: int = 50_000):
    """Process `pid` (every thread of it, and those it starts) held to `share` of one CPU by the
    kernel's CFS bandwidth control: `share` * 50 ms of CPU in every 50 ms, whatever else the
    machine runs. (A process stopping and continuing it from user space is itself late to wake
    on a loaded machine and can leave the rank whole tenths of a second unslowed.)"""
    group = CPU_CGROUPS / f"chexnet-starved-{os.getpid()}-{pid}"
    group.mkdir()
    try:
        (group / "cpu.cfs_period_us").write_text(str(period_us))
        (group / "cpu.cfs_quota_us").write_text(str(int(share * period_us)))
        (group / "cgroup.procs").write_text(str(pid))
        yield
    finally:  # what still runs in the group (the rank, any child of it) back to the root
        for left in (group / "cgroup.procs").read_text().split():
            with contextlib.suppress(OSError):  # (ended meanwhile)
                (CPU_CGROUPS / "cgroup.procs").write_text(left)
        group.rmdir()


@pytest.mark.slow
@pytest.mark.mpi
@pytest.mark.skipif(not (os.access(CPU_CGROUPS, os.W_OK) and (CPU_CGROUPS / "cpu.cfs_quota_us").is_file()),
                    reason=f"needs a cgroup-v1 cpu controller with CFS quotas at {CPU_CGROUPS}, as root")
def test_a_cpu_starved_rank_is_named_the_straggler(records_dir, tmp_path):
    """Rank 1 held to a fifth of a CPU after the first epoch: its compute takes several times
    rank 0's, and the report's verdict (its epochs' most frequent) names it. The
    model computes more per step than its gradients take to average (64-px inputs, batches of
    16), so the wait for the slow rank is a large part of a step."""
    env = os.environ | {"PATH": f"{VENV_BIN}:{os.environ['PATH']}"}
    proc = subprocess.Popen(["horovodrun", "--gloo", "-np", "2", sys.executable, "-m", "chexnet_hvd.train",
                             "--data", str(records_dir), "--run-dir", str(tmp_path), "--model", "small_cnn",
                             "--image-size", "64", "--batch-size", "16", "--epochs", "4", "--threads", "1",
                             "--verbose", "0", "--no-tensorboard"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not (tmp_path / "runlog.jsonl").is_file() or '"event": "epoch"' not in (tmp_path / "runlog.jsonl").read_text():
            assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()[0][-3000:]
            time.sleep(0.1)  # soon after the first epoch: the second is short
        with cpu_quota(ranks_of(tmp_path)[1], 0.2):
            out, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, out[-3000:]
    epochs = [r for r in read_runlog(tmp_path) if r["event"] == "epoch"]
    said = "; ".join(f"{bottleneck.summary(e)} ({e.get('compute_seconds')})" for e in epochs)
    assert reported_bottleneck(tmp_path) == "straggler (rank 1)", said
