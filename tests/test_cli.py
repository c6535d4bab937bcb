"""Every CLI answers --help; synthetic data is reproducible; the lr schedule follows its formula."""

import hashlib
import sys

import pytest
from conftest import ROOT, module, run

MODULES = ["synthetic", "records", "train", "download"]
SCRIPTS = ["tools/scaling_report.py", "write_tfrecords.sh", "download_dataset.sh"]


@pytest.mark.parametrize("name", MODULES)
def test_module_help(name):
    proc = module(name, "--help")
    assert proc.returncode == 0 and "usage:" in proc.stdout and "--" in proc.stdout


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_help(script):
    proc = run([str(ROOT / script), "--help"])
    assert proc.returncode == 0 and "usage:" in proc.stdout


def test_unknown_flag_is_a_usage_error():
    proc = module("synthetic", "--out", "x", "--imagez", "3")
    assert proc.returncode == 2 and "unrecognized arguments: --imagez" in proc.stderr


def test_synthetic_same_seed_same_bytes(tmp_path):
    digests = []
    for name in ("a", "b"):
        module("synthetic", "--out", tmp_path / name, "--images", 20, "--size", 24, "--seed", 5, check=True)
        files = sorted((tmp_path / name).rglob("*.*"))
        digests.append([(f.name, hashlib.sha256(f.read_bytes()).hexdigest()) for f in files])
    assert digests[0] == digests[1] and len(digests[0]) == 22


@pytest.mark.parametrize("world", [1, 2])
def test_lr_warmup_and_scaling_formula(world):
    from chexnet_hvd.schedules import WarmupSchedule

    base, ref, local = 1e-3, 16, 16
    peak = base * local * world / ref
    sched = WarmupSchedule(peak, world, warmup_steps=10, total_steps=100, schedule="cosine")
    assert float(sched(0)) == pytest.approx(peak / world)
    assert float(sched(5)) == pytest.approx(peak / world + (peak - peak / world) * 0.5)
    assert float(sched(10)) == pytest.approx(peak)
    assert float(sched(55)) == pytest.approx(peak * 0.5, rel=1e-5)
    assert float(sched(100)) == pytest.approx(0.0, abs=1e-9)
    assert sys.modules["chexnet_hvd.schedules"].WarmupSchedule.from_config(sched.get_config()).peak == peak
