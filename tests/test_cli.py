"""Every CLI answers --help with a `python -m` usage line and a description in whole sentences;
usage errors and out-of-range numbers are one line and exit 2; a config turns into the command
line that parses back to it."""

import dataclasses
import importlib
import importlib.util
import os
import re
import sys
import typing

import pytest
from conftest import ROOT, assert_one_line_error, module, run

from chexnet_hvd import cli

# the CLIs that load TensorFlow to answer take seconds each: in the slow set
MODULES = ["synthetic", "records", "download", "nas", "weights", "runlog", "check", "launch",
           *(pytest.param(name, marks=pytest.mark.slow) for name in ("train", "evaluate", "predict", "export"))]
TOOLS = ["tools/scaling_report.py", "tools/dataset_stats.py", "tools/nas_report.py"]
SCRIPTS = ["write_tfrecords.sh", "download_dataset.sh"]
WITHOUT_SETTINGS_FILES = {"launch"}  # its flags are mpirun's, passed through; no config dataclass


def description(help_text: str) -> str:
    """The description paragraph of an argparse --help: after the usage block, before the first
    section heading."""
    paragraphs = help_text.split("\n\n")
    return " ".join(paragraphs[1].split()) if not paragraphs[1].endswith(":") else ""


def assert_whole_sentences(text: str) -> None:
    assert text and text[0].isupper() and text[-1] in ".?!", text


@pytest.mark.parametrize("name", MODULES + TOOLS)
def test_help_says_how_to_start_the_command_and_describes_it_in_whole_sentences(name):
    """The usage line is the command a user types (it said `train.py`, `__main__.py`), and the
    description is a docstring's whole first paragraph (it stopped at its first line break,
    e.g. "..., with Horovod or"); every CLI built on a config takes --config FILE."""
    proc = run([str(ROOT / name), "--help"]) if name.startswith("tools/") else module(name, "--help")
    assert proc.returncode == 0, proc.stderr[-2000:]
    command = f"python {name}" if name.startswith("tools/") else f"python -m chexnet_hvd.{name}"
    assert proc.stdout.startswith(f"usage: {command} "), proc.stdout[:200]
    assert_whole_sentences(description(proc.stdout))
    assert "--" in proc.stdout
    assert ("--config FILE" in proc.stdout) == (name not in WITHOUT_SETTINGS_FILES)


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_help(script):
    proc = run([str(ROOT / script), "--help"])
    assert proc.returncode == 0 and "usage:" in proc.stdout
    assert_whole_sentences(description(proc.stdout))


def test_usage_errors_are_one_line():
    proc = module("synthetic", "--out", "x", "--imagez", "3")
    assert proc.returncode == 2 and proc.stderr.strip() == (
        "error: python -m chexnet_hvd.synthetic: unrecognized arguments: --imagez 3 "
        "(see python -m chexnet_hvd.synthetic --help)")


def test_a_config_turns_into_the_command_line_that_parses_back_to_it():
    """cli.to_argv is parse_config's inverse: how the NAS worker, the GPU check and the
    benchmarks build trainer commands (config.command) instead of writing flags by hand."""
    from chexnet_hvd import config
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


def test_a_settings_files_numbers_are_range_checked_as_flags_are(tmp_path):
    """A number out of its field's range is the same one-line error from a settings file as
    from its flag, for the generic parser and the trainer's (recipe, file, flags)."""
    from chexnet_hvd import config

    (tmp_path / "s.toml").write_text('out = "x"\nimages = 0\n')
    assert_one_line_error(module("synthetic", "--config", tmp_path / "s.toml"), "--images",
                          "must be at least 1, not 0")
    (tmp_path / "t.toml").write_text('data = "d"\nrun_dir = "r"\nkeep_checkpoints = 0\n')
    with pytest.raises(cli.InputError, match="at least 1, not 0"):
        config.parse(["--config", str(tmp_path / "t.toml")])


# ---------------------------------------------------------------- numeric ranges -------------
# Every CLI built on a config dataclass: (entry module, config class (module:name), the
# arguments it needs to parse). Its main is run in-process: ranges are checked while parsing,
# before anything else happens.
CLIS = {
    "synthetic": ("chexnet_hvd.synthetic", "chexnet_hvd.synthetic:SyntheticConfig", ["--out", "o"]),
    "records": ("chexnet_hvd.records.writer", "chexnet_hvd.records.writer:RecordsConfig", ["--csv", "c", "--out", "o"]),
    "train": ("chexnet_hvd.train", "chexnet_hvd.config:TrainConfig", ["--data", "d", "--run-dir", "r"]),
    "evaluate": ("chexnet_hvd.evaluate", "chexnet_hvd.evaluate:EvalConfig", ["--checkpoint", "c", "--data", "d"]),
    "predict": ("chexnet_hvd.predict", "chexnet_hvd.predict:PredictConfig", ["x.png", "--checkpoint", "c"]),
    "export": ("chexnet_hvd.export", "chexnet_hvd.export:ExportConfig", ["--checkpoint", "c"]),
    "nas": ("chexnet_hvd.nas.__main__", "chexnet_hvd.nas.__main__:NasConfig", ["--study-dir", "s", "--data", "d"]),
    "weights": ("chexnet_hvd.weights", "chexnet_hvd.weights:WeightsConfig", ["path"]),
    "runlog": ("chexnet_hvd.runlog", "chexnet_hvd.runlog:StatusConfig", ["r"]),
    "check": ("chexnet_hvd.check", "chexnet_hvd.check:CheckConfig", []),
    "download": ("chexnet_hvd.download", "chexnet_hvd.download:DownloadConfig", ["--out", "o"]),
    "tools/scaling_report.py": ("tools/scaling_report.py", "ReportConfig", []),
    "tools/dataset_stats.py": ("tools/dataset_stats.py", "StatsConfig", ["--csv", "c"]),
    "tools/nas_report.py": ("tools/nas_report.py", "NasReportConfig", ["s"]),
}
# Numeric fields that take any value, each with the reason. A new numeric field must get a
# range in its cli.field (minimum=, maximum=, exclusive_minimum=, exclusive_maximum=, or
# choices=) or be listed here.
UNBOUNDED: dict[str, str] = {}


def entry(name: str):
    """(the CLI's module, its config class)."""
    where, config_name, _ = CLIS[name]
    if where.startswith("tools/"):
        spec = importlib.util.spec_from_file_location(where.replace("/", "_")[:-3], ROOT / where)
        mod = sys.modules[spec.name] = importlib.util.module_from_spec(spec)  # for its dataclass
        spec.loader.exec_module(mod)
        return mod, getattr(mod, config_name)
    config_module, _, cls = config_name.partition(":")
    return importlib.import_module(where), getattr(importlib.import_module(config_module), cls)


def numeric_fields(config_cls) -> list[tuple[dataclasses.Field, type]]:
    """The int and float fields (lists of them and optional ones included), with their type."""
    found = []
    hints = typing.get_type_hints(config_cls)
    for f in dataclasses.fields(config_cls):
        kinds = [hints[f.name], *typing.get_args(hints[f.name])]
        kind = next((k for k in kinds if k in (int, float)), None)
        if kind is not None:
            found.append((f, kind))
    return found


def out_of_range(f: dataclasses.Field, kind: type) -> list:
    """A value just past each bound of the field, one outside its choices, and for a float
    "inf" and "nan" (argparse's float() takes both; --stall-timeout inf was an overflow deep in
    an engine)."""
    step = 1 if kind is int else 0.5
    past = {"minimum": lambda b: b - step, "maximum": lambda b: b + step,
            "exclusive_minimum": lambda b: b, "exclusive_maximum": lambda b: b}
    values = [past[key](bound) for key, bound in cli.range_of(f).items()]
    choices = f.metadata.get("choices")
    return values + ([max(choices) + 1] if choices else []) + (["inf", "nan"] if kind is float else [])


def run_main(mod, argv, capsys) -> tuple[int, list[str]]:
    """Run a CLI's main in-process as its __main__ does; (exit code, stderr's lines)."""
    with pytest.raises(SystemExit) as stop:
        cli.run(lambda: mod.main(argv))
    return stop.value.code, [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def required(config_cls) -> dict:
    """Values for the fields without a default, so the config can be built."""
    hints = typing.get_type_hints(config_cls)
    values = {}
    for f in dataclasses.fields(config_cls):
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            value = (f.metadata.get("choices") or ["x"])[0]
            values[f.name] = [value] if typing.get_origin(hints[f.name]) is list else value
    return values


@pytest.mark.parametrize("name", list(CLIS))
def test_every_number_of_every_cli_out_of_range_is_one_line_naming_its_flag(name, capsys):
    """Each int/float field of the CLI's config, given a value just past each bound of its range
    (or outside its choices), ends the command with one line naming the flag and exit 2, before
    anything starts (e.g. --shuffle-buffer 0 was a TensorFlow traceback, --keep-checkpoints 0
    kept every checkpoint). The bounds themselves and the defaults are accepted, and a numeric
    field without a range fails here unless UNBOUNDED says why it has none."""
    mod, config_cls = entry(name)
    argv = CLIS[name][2]
    problems, tried = [], 0
    base = config_cls(**required(config_cls))
    cli.check_values(base)  # the defaults are in range
    for f, kind in numeric_fields(config_cls):
        key = f"{config_cls.__name__}.{f.name}"
        if not cli.range_of(f) and not f.metadata.get("choices"):
            if key not in UNBOUNDED:
                problems.append(f"{key}: no range (cli.field(minimum=...) or UNBOUNDED)")
            continue
        for key, bound in cli.range_of(f).items():  # an inclusive bound is itself accepted
            if key in ("minimum", "maximum"):
                value = [bound] if isinstance(getattr(base, f.name), list) else bound
                cli.check_values(dataclasses.replace(base, **{f.name: value}))
        flag = "--" + f.name.replace("_", "-")
        for bad in out_of_range(f, kind):
            tried += 1
            code, lines = run_main(mod, [*argv, flag, str(bad)], capsys)
            if code != 2 or len(lines) != 1 or not re.match(rf"error: {flag}: ", lines[0]):
                problems.append(f"{flag} {bad}: exit {code}, stderr {lines}")
    assert not problems, "\n".join(problems)
    assert tried or not numeric_fields(config_cls)
    assert not {k for k in UNBOUNDED if k.startswith(config_cls.__name__ + ".")} - {
        f"{config_cls.__name__}.{f.name}" for f, _ in numeric_fields(config_cls)}  # none stale


def bad_settings(config_cls) -> list[tuple[str, object]]:
    """(field, value) pairs a settings file could hold that its flag would refuse: one outside
    each field's choices (any type), and each number past its range (not the required fields:
    the command line of CLIS gives them, and the command line wins)."""
    hints = typing.get_type_hints(config_cls)
    pairs = []
    for f in dataclasses.fields(config_cls):
        if f.name in required(config_cls):
            continue
        listed = typing.get_origin(hints[f.name]) in (list, tuple)
        kinds = [hints[f.name], *typing.get_args(hints[f.name])]
        kind = next((k for k in kinds if k in (int, float, str)), None)
        values = []
        if f.metadata.get("choices"):
            choices = f.metadata["choices"]
            values.append(max(choices) + 1 if kind in (int, float) else "not-a-choice")
        if kind in (int, float):
            values += [kind(v) for v in out_of_range(f, kind) if not f.metadata.get("choices")]
        pairs += [(f.name, [v] if listed else v) for v in values]
    return pairs


@pytest.mark.parametrize("name", list(CLIS))
def test_every_choice_and_number_from_a_settings_file_is_checked_as_its_flag_is(name, tmp_path, capsys):
    """argparse checks a flag's choices, not a default's, and a settings file's values arrive as
    defaults: `optimizer = "adamw"` in a file trained with SGD without a word. Each value the
    flag would refuse is, from a file too, one line naming the flag and exit 2."""
    import tomli_w

    mod, config_cls = entry(name)
    problems = []
    for i, (key, bad) in enumerate(bad_settings(config_cls)):
        path = tmp_path / f"s{i}.toml"
        path.write_text(tomli_w.dumps({key: bad}))
        code, lines = run_main(mod, ["--config", str(path), *CLIS[name][2]], capsys)
        flag = "--" + key.replace("_", "-")
        if code != 2 or len(lines) != 1 or not re.match(rf"error: {flag}: ", lines[0]):
            problems.append(f"{key} = {bad!r}: exit {code}, stderr {lines}")
    assert not problems, "\n".join(problems)


def test_config_abbreviated_as_argparse_allows_is_read(tmp_path):
    """`--conf FILE` is --config to argparse: its settings were dropped without a word."""
    from chexnet_hvd.synthetic import SyntheticConfig

    (tmp_path / "s.toml").write_text('out = "data/x"\nimages = 50\n')
    for argv in (["--conf", str(tmp_path / "s.toml")], [f"--confi={tmp_path / 's.toml'}"]):
        assert cli.parse_config(SyntheticConfig, "", argv).images == 50


def test_a_recipe_flag_beside_a_settings_file_applies_its_settings(tmp_path):
    """Flags win over the file, a --recipe flag's settings too (they were recorded as the recipe
    and not applied); a recipe named in the file is under the file's own settings."""
    from chexnet_hvd import config

    chexnet = config.recipe_defaults("chexnet")
    (tmp_path / "c.toml").write_text('data = "d"\nrun_dir = "r"\nepochs = 3\nschedule = "constant"\n')
    cfg = config.parse(["--config", str(tmp_path / "c.toml"), "--recipe", "chexnet", "--lr", "0.5"])
    assert cfg.recipe == "chexnet" and cfg.lr == 0.5
    assert all(getattr(cfg, key) == value for key, value in chexnet.items() if key != "lr")
    (tmp_path / "r.toml").write_text('data = "d"\nrun_dir = "r"\nrecipe = "chexnet"\nepochs = 3\n')
    cfg = config.parse(["--config", str(tmp_path / "r.toml")])
    assert cfg.epochs == 3 and cfg.schedule == chexnet["schedule"]


def test_a_failed_write_removes_its_partial_copy_and_is_one_line(tmp_path):
    """cli.writing: a full disk while writing a file or a folder by way of a temporary one; a
    device (/dev/full) given as the output is never removed."""
    import errno

    (tmp_path / ".file.tmp").write_text("half")
    (tmp_path / ".folder.tmp" / "sub").mkdir(parents=True)
    for partial in (tmp_path / ".file.tmp", tmp_path / ".folder.tmp"):
        with pytest.raises(cli.InputError, match=r"^.*/final: cannot write this: No space left on device$"):
            with cli.writing(partial, tmp_path / "final", "this"):
                raise OSError(errno.ENOSPC, "No space left on device")
        assert not partial.exists()
    with pytest.raises(cli.InputError, match="/dev/full: cannot write this file: No space left on device"):
        with cli.output("/dev/full") as fh:
            fh.write("x" * 100_000)
    assert os.path.exists("/dev/full")


def test_launch_refuses_fewer_than_one_worker(capsys):
    from chexnet_hvd import launch

    code, lines = run_main(launch, ["-np", "0", "true"], capsys)
    assert code == 2 and lines == ["error: -np: must be at least 1, not 0"]


def test_ranges_are_checked_for_configs_built_in_code_too():
    """The trainer's check_config (what runs before training, whoever built the config)."""
    from chexnet_hvd import config

    with pytest.raises(cli.InputError, match="at least 1, not 0"):
        config.check_config(config.TrainConfig(data="d", run_dir="r", keep_checkpoints=0))
    with pytest.raises(cli.InputError, match="more than 0 and less than 1, not 1.0"):
        config.check_config(config.TrainConfig(data="d", run_dir="r", plateau_factor=1.0))


@pytest.mark.parametrize("argv, message", [
    (["--model", "small_cnn", "--image-size", "7"], "error: --image-size: 7: small_cnn takes at least 8 px"),
    (["--model", "densenet121", "--image-size", "31"], "error: --image-size: 31: densenet121 takes at least 32 px"),
    (["--model", "resnet50", "--image-size", "16"], "error: --image-size: 16: resnet50 takes at least 32 px"),
    (["--warmup-epochs", "-0.5"], "error: --warmup-epochs: -0.5: give -1 (proportional to the global batch) "
                                  "or a number of epochs, at least 0"),
])
def test_a_number_in_its_flags_range_that_the_model_or_flag_cannot_take_is_one_line(argv, message, capsys):
    """Within --image-size's range, a side the model cannot take (was a Keras or TensorFlow
    traceback, or, with --weights, an error blaming the file); between --warmup-epochs' -1 and 0
    (was silently -1)."""
    from chexnet_hvd import models, train

    code, lines = run_main(train, ["--data", "d", "--run-dir", "r", *argv], capsys)
    assert (code, lines) == (2, [message])
    models.check_model("small_cnn", 8)  # the smallest sides are taken
    models.check_model("densenet121", 32)
