"""`python -m chexnet_hvd.check` on this machine without GPUs, under each engine: it says so
plainly, fails the GPU checks, and still times the trainer on CPU ranks (2 by default)."""

import re

import pytest
from conftest import ENGINES, module

# (ranks given, batch, steps, precisions). Horovod: the default ranks (2 without GPUs) at batch 8,
# in both precisions. tf: 4 ranks at the check's default batch, 32: as on an 8-GPU node, more
# ranks x batch than its tiny records set holds (the timing runs on the in-memory batch all the
# same); fp32 only (fp16 is emulated on a CPU: 4 ranks of it took minutes; the tf engine's
# mixed_float16 training is tests/test_resume_preemption.py's).
SETTINGS = {"horovod": (None, 8, 6, ["fp32", "mixed_float16"]), "tf": (4, 32, 3, ["fp32"])}


@pytest.mark.slow
@pytest.mark.mpi
@pytest.mark.parametrize("engine", ENGINES)
def test_check_without_gpus_reports_and_still_runs_the_steps(engine):
    n, batch, steps, precisions = SETTINGS[engine]
    proc = module("check", "--model", "small_cnn", "--image-size", 32, *["--ranks", n] * bool(n),
                  "--batch-size", batch, "--steps", steps, "--precisions", *precisions, "--engine", engine,
                  timeout=600)
    lines = proc.stdout.splitlines()
    verdicts = [line for line in lines if re.match(r"\[(PASS|WARN|FAIL)\] ", line)]
    assert proc.returncode == 1, proc.stdout + proc.stderr[-2000:]
    built = {"horovod": "[FAIL] Horovod was built without NCCL", "tf": "[PASS] the tf engine: "}[engine]
    assert any(line.startswith(built) for line in verdicts)
    assert any(line.startswith("[FAIL] no GPU found") for line in verdicts)
    assert f"[WARN] {n or 2} ranks of the {engine} engine; no GPUs to give them" in verdicts
    rates = [(m.group(1), float(m.group(2))) for line in verdicts
             if (m := re.match(rf"\[PASS\] small_cnn 32 px (\w+), batch {batch} per CPU "
                               r"rank: ([\d.]+) img/s per CPU rank", line))]
    assert [p for p, _ in rates] == precisions and all(r > 0 for _, r in rates), proc.stdout
    assert bool(re.search(r"mixed_float16.*[\d.]+x fp32", proc.stdout)) == ("mixed_float16" in precisions)
    failed = {"horovod": 2, "tf": 1}[engine]  # no GPU; Horovod also lacks NCCL
    assert lines[-1] == f"verdict: {failed} check(s) failed"


def test_check_refuses_too_few_steps():
    from conftest import assert_one_line_error

    assert_one_line_error(module("check", "--steps", 1), "--steps")


def test_the_placement_verdict_is_printed_when_every_timing_run_fails(monkeypatch, capsys):
    """A trainer that started (its run log's start says where the ranks ran) and then failed:
    the placement verdict still comes, before the failure, and the failures are counted. (The
    trainer's run is stood in for: what is checked is the report's logic.)"""
    from chexnet_hvd import check

    start = {"world_size": 2, "engine": "tf", "ranks": [{"host": "gpu1", "gpu": 0}, {"host": "gpu1", "gpu": 0}]}
    monkeypatch.setattr(check, "stack", lambda engine: [])
    monkeypatch.setattr(check, "synthetic_records", lambda root, size: root)
    monkeypatch.setattr(check, "time_precision", lambda *args: (start, None, "exit 1: out of memory"))
    assert check.main(["--ranks", "2"]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "[FAIL] ranks share or lack a GPU (gpu1: 0,0): start one rank per GPU"
    assert [line.startswith("[FAIL] densenet121 224 px") and line.endswith("(exit 1: out of memory)")
            for line in lines[1:3]] == [True, True]
    assert lines[-1] == "verdict: 3 check(s) failed"
