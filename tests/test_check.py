"""`python -m chexnet_hvd.check` on this machine without GPUs: it says so plainly, fails the GPU
checks, and still times the trainer on 2 CPU ranks in both precisions."""

import re

import pytest
from conftest import module

pytestmark = [pytest.mark.slow, pytest.mark.mpi, pytest.mark.horovod]  # horovodrun


def test_check_without_gpus_reports_and_still_runs_the_steps():
    proc = module("check", "--model", "small_cnn", "--image-size", 32, "--batch-size", 8,
                  "--steps", 6, timeout=600)
    lines = proc.stdout.splitlines()
    verdicts = [line for line in lines if re.match(r"\[(PASS|WARN|FAIL)\] ", line)]
    assert proc.returncode == 1, proc.stdout + proc.stderr[-2000:]
    assert any(line.startswith("[FAIL] Horovod was built without NCCL") for line in verdicts)
    assert any(line.startswith("[FAIL] no GPU found") for line in verdicts)
    assert any(line.startswith("[WARN] horovodrun started 2 ranks; no GPUs") for line in verdicts)
    rates = [float(m.group(2)) for line in verdicts
             if (m := re.match(r"\[PASS\] small_cnn 32 px (fp32|mixed_float16), batch 8 per CPU rank: "
                               r"([\d.]+) img/s per CPU rank", line))]
    assert len(rates) == 2 and all(r > 0 for r in rates)
    assert re.search(r"mixed_float16.*[\d.]+x fp32", proc.stdout)
    assert lines[-1] == "verdict: 2 check(s) failed"


def test_check_refuses_too_few_steps():
    from conftest import assert_one_line_error

    assert_one_line_error(module("check", "--steps", 1), "--steps")
