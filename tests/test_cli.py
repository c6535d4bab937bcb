"""Every CLI answers --help; synthetic data is reproducible; the lr schedules follow their formulas."""

import hashlib
import sys

import pytest
from conftest import ROOT, module, run

MODULES = ["synthetic", "records", "train", "download", "evaluate", "predict", "export", "nas", "weights"]
SCRIPTS = ["tools/scaling_report.py", "tools/dataset_stats.py", "tools/nas_report.py", "write_tfrecords.sh", "download_dataset.sh"]


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


def test_plateau_update_waits_patience_epochs_then_scales_down():
    from chexnet_hvd.schedules import PLATEAU_START, plateau_update

    state, scales = dict(PLATEAU_START), []
    for auroc in [0.70, 0.75, 0.74, 0.75, None, 0.80, 0.79, 0.78]:
        state = plateau_update(state, auroc, patience=2, factor=0.1, min_scale=0.005)
        scales.append(state["scale"])
    # 0.74, 0.75 (not > best) -> drop; None, 0.80 -> new best resets; 0.79, 0.78 -> drop, floored
    assert scales == pytest.approx([1, 1, 1, 0.1, 0.1, 0.1, 0.1, 0.01])
    assert state["best"] == 0.80 and state["wait"] == 0
    assert plateau_update(state, None, 1, 0.1, 0.005)["scale"] == pytest.approx(0.005)


@pytest.mark.slow
def test_plateau_schedule_lowers_the_lr_and_resume_keeps_it(records_dir, tmp_path):
    """With an lr too small to move the weights, val AUROC never improves after epoch 1, so
    patience 1 drops the lr x0.5 (--plateau-factor) after every later epoch; a resumed run keeps
    the dropped lr."""
    from chexnet_hvd.runlog import read_runlog

    args = ["--data", records_dir, "--run-dir", tmp_path, "--model", "small_cnn", "--image-size", 32,
            "--batch-size", 32, "--steps-per-epoch", 2, "--lr", 1e-12, "--warmup-epochs", 0,
            "--schedule", "plateau", "--plateau-patience", 1, "--plateau-factor", 0.5, "--verbose", 0]
    module("train", *args, "--epochs", 2, check=True, timeout=300)
    module("train", *args, "--epochs", 4, "--resume", check=True, timeout=300)
    lrs = [r["lr"] for r in read_runlog(tmp_path) if r["event"] == "epoch"]
    assert lrs == pytest.approx([1e-12, 1e-12, 5e-13, 2.5e-13], rel=1e-4)


def test_a_config_turns_into_the_command_line_that_parses_back_to_it():
    """cli.to_argv is parse_config's inverse: how the NAS worker, the GPU check and the
    benchmarks build trainer commands (config.command) instead of writing flags by hand."""
    from chexnet_hvd import cli, config
    from chexnet_hvd.check import CheckConfig

    cfg = config.TrainConfig(data="d", run_dir="r", model="small_cnn", augment=False, xla=True,
                            lr=0.002, precision="mixed_bfloat16", steps_per_epoch=7)
    argv = config.command(cfg)
    assert argv[1:3] == ["-m", "chexnet_hvd.train"] and "--no-augment" in argv and "--xla" in argv
    assert cli.parse_config(config.TrainConfig, "", argv[3:]) == cfg
    check = CheckConfig(precisions=["fp32"], steps=4)
    assert cli.parse_config(CheckConfig, "", cli.to_argv(check)) == check


def test_synthetic_mean_images_per_patient(tmp_path):
    import pandas as pd

    patients = {}
    for mean in (1.0, 5.0):
        module("synthetic", "--out", tmp_path / str(mean), "--images", 200, "--size", 16,
               "--mean-images-per-patient", mean, check=True)
        patients[mean] = pd.read_csv(tmp_path / str(mean) / "Data_Entry_2017.csv")["Patient ID"].nunique()
    assert patients[1.0] > 150 and 25 < patients[5.0] < 60, patients
