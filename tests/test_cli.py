"""Every CLI answers --help; unknown flags are usage errors; a config turns into the command line that parses back to it."""

import pytest
from conftest import ROOT, assert_one_line_error, module, run

# the CLIs that load TensorFlow to answer take seconds each: in the slow set
MODULES = ["synthetic", "records", "download", "nas", "weights",
           *(pytest.param(name, marks=pytest.mark.slow) for name in ("train", "evaluate", "predict", "export"))]
SCRIPTS = ["tools/scaling_report.py", "tools/dataset_stats.py", "tools/nas_report.py", "write_tfrecords.sh", "download_dataset.sh"]


@pytest.mark.parametrize("name", MODULES)
def test_module_help(name):
    proc = module(name, "--help")
    assert proc.returncode == 0 and "usage:" in proc.stdout and "--config FILE" in proc.stdout


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


def test_a_settings_file_sets_what_flags_set_and_flags_override_it(tmp_path):
    """--config FILE on every CLI: TOML or JSON, keys the config's fields; flags win."""
    from chexnet_hvd import cli
    from chexnet_hvd.synthetic import SyntheticConfig

    (tmp_path / "s.toml").write_text('out = "data/x"\nimages = 50\nsize = 24\n')
    (tmp_path / "s.json").write_text('{"out": "data/x", "images": 50, "size": 24}')
    for name in ("s.toml", "s.json"):
        cfg = cli.parse_config(SyntheticConfig, "", ["--config", str(tmp_path / name), "--size", "16"])
        assert (cfg.out, cfg.images, cfg.size) == ("data/x", 50, 16)


def test_a_settings_file_with_unknown_keys_or_wrong_types_is_one_line(tmp_path):
    (tmp_path / "bad.toml").write_text('out = "x"\nimagez = 5\nsize = "big"\nseed = true\n')
    proc = module("synthetic", "--config", tmp_path / "bad.toml")
    assert_one_line_error(proc, "bad.toml", "unknown settings imagez")
    (tmp_path / "types.toml").write_text('out = "x"\nsize = "big"\nseed = true\n')
    assert_one_line_error(module("synthetic", "--config", tmp_path / "types.toml"), "types.toml",
                          "size = 'big' is not a whole number", "seed = True is not a whole number")
    (tmp_path / "broken.json").write_text("{")
    assert_one_line_error(module("synthetic", "--config", tmp_path / "broken.json"), "broken.json",
                          "not a TOML or JSON settings file")
    assert_one_line_error(module("synthetic", "--config", tmp_path / "none.toml"), "none.toml", "cannot read")


@pytest.mark.slow
def test_a_runs_config_json_trains_that_run_again(records_dir, tmp_path):
    """RUN_DIR/config.json given back with --config: the new run's config.json is the old one
    but for the run directory."""
    import json

    module("train", "--data", records_dir, "--run-dir", tmp_path / "a", "--model", "small_cnn",
           "--image-size", 24, "--batch-size", 32, "--epochs", 1, "--steps-per-epoch", 2, "--lr", "3e-4",
           "--schedule", "cosine", "--no-augment", "--verbose", 0, check=True, timeout=300)
    module("train", "--config", tmp_path / "a" / "config.json", "--run-dir", tmp_path / "b", check=True,
           timeout=300)
    old, new = (json.loads((tmp_path / d / "config.json").read_text()) for d in "ab")
    assert new.pop("run_dir") == str(tmp_path / "b") and old.pop("run_dir") == str(tmp_path / "a")
    assert new == old and (old["lr"], old["augment"]) == (3e-4, False)
