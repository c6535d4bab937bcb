"""Every CLI answers --help; unknown flags are usage errors; a config turns into the command line that parses back to it."""

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
