"""Every flag of `python -m chexnet_hvd.train --help` runs end to end, asserting what would fail if
the flag did nothing. FLAG_TESTS names the test that exercises each flag; a flag without one
fails `test_every_trainer_flag_has_an_end_to_end_test`.

Most runs here are one process of the small CNN on 32-px records, `--deterministic`, compared with
one baseline run that differs only in the flag under test; the distributed flags run under
`horovodrun --gloo -np 2`. fp16 loss scaling gets its own 2-rank test in which only rank 1's
gradients overflow on one step."""

import json
import os
import re
import shutil
import sys
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import (
    ENGINES,
    ROOT,
    assert_one_line_error,
    assert_ranks_identical,
    launcher,
    module,
    run,
)

from chexnet_hvd import checkpoints, cli, config, records, resume
from chexnet_hvd.runlog import read_runlog

pytestmark = [pytest.mark.slow]

BASE = ["--model", "small_cnn", "--image-size", 32, "--batch-size", 16, "--epochs", 2,
        "--steps-per-epoch", 4, "--warmup-epochs", 0, "--deterministic", "--audit", "--verbose", 0]
HERE = "tests/test_train_flags.py"
FLAG_TESTS = {
    "data": "tests/test_two_ranks.py::test_run_log_describes_the_job",
    "engine": "tests/test_two_ranks.py::test_run_log_describes_the_job",
    "workers": "tests/test_evaluate.py::test_workers_flags_make_one_job_of_processes_started_by_hand",
    "worker_index": "tests/test_evaluate.py::test_workers_flags_make_one_job_of_processes_started_by_hand",
    "run_dir": "tests/test_two_ranks.py::test_run_log_describes_the_job",
    "model": f"{HERE}::test_lr_reference_batch_threads_timing_validation_and_output",
    "image_size": f"{HERE}::test_lr_reference_batch_threads_timing_validation_and_output",
    "batch_size": "tests/test_two_ranks.py::test_run_log_describes_the_job",
    "epochs": "tests/test_two_ranks.py::test_run_log_describes_the_job",
    "steps_per_epoch": f"{HERE}::test_lr_reference_batch_threads_timing_validation_and_output",
    "optimizer": f"{HERE}::test_optimizer_sgd",
    "lr": f"{HERE}::test_lr_reference_batch_threads_timing_validation_and_output",
    "reference_batch": f"{HERE}::test_lr_reference_batch_threads_timing_validation_and_output",
    "warmup_epochs": f"{HERE}::test_fp16_allreduce_and_warmup_on_two_ranks",
    "schedule": f"{HERE}::test_schedules_cosine_and_step",
    "step_epochs": f"{HERE}::test_schedules_cosine_and_step",
    "plateau_patience": "tests/test_schedules.py::test_plateau_schedule_lowers_the_lr_and_resume_keeps_it",
    "plateau_factor": "tests/test_schedules.py::test_plateau_schedule_lowers_the_lr_and_resume_keeps_it",
    "class_weights": f"{HERE}::test_flags_that_change_what_is_learned",
    "precision": "tests/test_resume_preemption.py::test_mixed_float16_on_two_ranks_end_to_end",
    "xla": f"{HERE}::test_xla_compiles_clusters",
    "fp16_allreduce": f"{HERE}::test_fp16_allreduce_and_warmup_on_two_ranks",
    "backward_passes_per_step": f"{HERE}::test_backward_passes_per_step_and_keep_checkpoints",
    "weights": f"{HERE}::test_weights_early_stopping_and_step_checkpoints",
    "tensorboard": f"{HERE}::test_lr_reference_batch_threads_timing_validation_and_output",
    "profile_steps": f"{HERE}::test_lr_reference_batch_threads_timing_validation_and_output",
    "recipe": "tests/test_recipes_weights.py::"
              "test_fetch_verifies_caches_and_recipe_chexnet_trains_from_the_cache_offline",
    "seed": f"{HERE}::test_flags_that_change_what_is_learned",
    "augment": f"{HERE}::test_flags_that_change_what_is_learned",
    "synthetic_input": f"{HERE}::test_flags_that_change_what_is_learned",
    "shuffle_buffer": f"{HERE}::test_flags_that_change_what_is_learned",
    "deterministic": f"{HERE}::test_baseline_is_reproducible",
    "val_split": f"{HERE}::test_lr_reference_batch_threads_timing_validation_and_output",
    "val_batch_size": f"{HERE}::test_lr_reference_batch_threads_timing_validation_and_output",
    "early_stopping": f"{HERE}::test_weights_early_stopping_and_step_checkpoints",
    "resume": "tests/test_resume_preemption.py::test_resumes_at_an_epochs_end_and_in_mid_epoch_are_exact",
    "checkpoint_every_steps": f"{HERE}::test_weights_early_stopping_and_step_checkpoints",
    "stop_check_steps": f"{HERE}::test_stop_check_steps_and_preempt_at_step",
    "steps_per_execution": f"{HERE}::test_stop_check_steps_and_preempt_at_step",
    "stall_timeout": "tests/test_stalls.py::test_a_stopped_rank_ends_the_job_by_name",
    "heartbeat": "tests/test_two_ranks.py::test_a_batch_log_starts_with_a_line_and_beats_during_epochs",
    "preempt_at_step": f"{HERE}::test_stop_check_steps_and_preempt_at_step",
    "keep_checkpoints": f"{HERE}::test_backward_passes_per_step_and_keep_checkpoints",
    "threads": f"{HERE}::test_lr_reference_batch_threads_timing_validation_and_output",
    "timing_warmup_steps": f"{HERE}::test_lr_reference_batch_threads_timing_validation_and_output",
    "audit": "tests/test_two_ranks.py::test_weights_bitwise_identical_on_both_ranks",
    "verbose": f"{HERE}::test_lr_reference_batch_threads_timing_validation_and_output",
    "crop": "tests/test_views.py::test_a_crop_model_sees_the_centre_window_and_ten_crop_is_at_the_same_scale",
}


def test_every_trainer_flag_has_an_end_to_end_test():
    import dataclasses

    flags = {f.name for f in dataclasses.fields(config.TrainConfig)}
    assert flags == set(FLAG_TESTS), sorted(flags ^ set(FLAG_TESTS))
    for name, where in FLAG_TESTS.items():
        path, test = where.split("::")
        assert re.search(rf"^def {test}\(", (ROOT / path).read_text(), re.M), (name, where)


def trainer(records_dir, run_dir, *extra, **kwargs):
    return module("train", "--data", records_dir, "--run-dir", run_dir, *BASE, *extra, **kwargs)


def weights(run_dir, suffix="", rank=0) -> list[np.ndarray]:
    saved = np.load(run_dir / "audit" / f"rank{rank}{suffix}.npz")
    return [saved[k] for k in saved.files]


def same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def epochs(run_dir) -> list[dict]:
    return [r for r in read_runlog(run_dir) if r["event"] == "epoch"]


# TensorFlow's own log at every level: the XLA test reads what the baseline's says
LOG_ALL = {"TF_CPP_MIN_LOG_LEVEL": "0"}


@pytest.fixture(scope="module")
def baseline(records_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("baseline")
    (run_dir / "stderr.txt").write_text(trainer(records_dir, run_dir, env=LOG_ALL, check=True).stderr)
    return run_dir


def test_baseline_is_reproducible(records_dir, baseline, tmp_path):
    """The comparisons below rest on this: the same flags give bitwise the same weights."""
    trainer(records_dir, tmp_path, check=True)
    assert same(weights(baseline), weights(tmp_path))
    assert not same(weights(baseline), weights(baseline, "-initial"))


@pytest.mark.parametrize("flag", [["--class-weights", "manifest"], ["--seed", 7], ["--no-augment"],
                                  ["--synthetic-input"], ["--shuffle-buffer", 1],
                                  ["--precision", "mixed_bfloat16"]], ids=lambda f: f[0])
def test_flags_that_change_what_is_learned(records_dir, baseline, tmp_path, flag):
    """Each flag alone, against the baseline: other weights after the same steps."""
    trainer(records_dir, tmp_path, *flag, check=True)
    assert not same(weights(baseline), weights(tmp_path)), flag
    if flag[0] == "--seed":  # a different start, too
        assert not same(weights(baseline, "-initial"), weights(tmp_path, "-initial"))
    key = flag[0][2:].removeprefix("no-").replace("-", "_")
    assert read_runlog(tmp_path)[0]["config"][key] != read_runlog(baseline)[0]["config"][key]


def test_optimizer_sgd(records_dir, baseline, tmp_path):
    """SGD with momentum keeps one slot per weight in its checkpoint, Adam two (m and v); a
    resume with the other, or between mixed_float16 and another precision, or with another
    model, is refused."""
    import tensorflow as tf

    trainer(records_dir, tmp_path, "--optimizer", "sgd", check=True)

    def slots(run_dir):
        names = tf.train.list_variables(str(run_dir / "checkpoints" / "epoch-0002" / "ckpt"))
        return sum(n.startswith("optimizer/_variables/") for n, _ in names)

    n_weights = len(weights(baseline))
    assert (slots(baseline), slots(tmp_path)) == (2 * n_weights, n_weights)
    assert not same(weights(baseline), weights(tmp_path))
    # a resume keeps the optimizer state's shape: the same kind, a loss scale or not (a
    # restore of Adam's two moments into SGD's momentum failed as "weights do not fit")
    resumed = ["--resume", "--epochs", 3]
    assert_one_line_error(trainer(records_dir, tmp_path, *resumed),
                          "--optimizer: adam, but ", "was trained with sgd", "resume with --optimizer sgd")
    # the other refusals come from the same check (resume.check_same_kind): asked in-process
    meta = checkpoints.read_meta(tmp_path / "checkpoints" / "epoch-0002")
    asked = {"model": "small_cnn", "optimizer": "sgd", "precision": "fp32"}
    for flags, trained, match in (
            ({"precision": "mixed_float16"}, {}, "--precision: mixed_float16, but .* was trained with fp32"),
            ({"model": "resnet50"}, {}, "--model: resnet50, but .* was trained with small_cnn"),
            ({}, {"precision": "mixed_float16"}, "--precision: fp32, but .* was trained with mixed_float16")):
        with pytest.raises(cli.InputError, match=match):
            resume.check_same_kind(SimpleNamespace(**asked | flags), tmp_path, meta | trained)
    trainer(records_dir, tmp_path, *resumed, "--optimizer", "sgd", "--precision", "mixed_bfloat16", check=True)
    assert epochs(tmp_path)[-1]["epoch"] == 3


def test_a_resume_with_another_size_or_schedule_says_so_or_names_the_size_that_fits(records_dir, tmp_path):
    """The small CNN pools its last map to 8x8 at 64 and at 128 px, so its weights fit both (a
    progressive resize): the resume says it, and its checkpoints carry the new size; at 32 px
    they do not fit, and the error names --image-size and the size they were trained at. A
    finished cosine run extended to 2 epochs says so too (its lr rises again); another batch
    (the lr rescaled to it) is not such a change."""
    trainer(records_dir, tmp_path, "--image-size", 64, "--epochs", 1, "--schedule", "cosine", "--no-augment",
            check=True)
    resumed = trainer(records_dir, tmp_path, "--image-size", 128, "--schedule", "cosine", "--batch-size", 8,
                      "--resume", check=True)
    notes = [line for line in resumed.stderr.splitlines() if line.startswith("resume: ")]
    assert len(notes) == 1 and re.search(r"epoch-0001's run trained \(--image-size 64 -> 128, --no-augment -> "
                                         r"--augment, --epochs 1 -> 2\)", notes[0]), resumed.stderr[-2000:]
    assert checkpoints.read_meta(tmp_path / "checkpoints" / "epoch-0002")["image_size"] == 128
    assert_one_line_error(trainer(records_dir, tmp_path, "--image-size", 32, "--resume", "--epochs", 3),
                          "--image-size: 32, but ", "was trained at 128 px", "resume with --image-size 128")


def test_lr_reference_batch_threads_timing_validation_and_output(records_dir, baseline, tmp_path):
    """Flags with their own observable, in one run: the scaled lr the optimizer used, TF's
    threads, the timed steps, the validated split and its batches, rank 0's output, the
    TensorBoard scalars (the run log's numbers) and a profiler trace."""
    proc = trainer(records_dir, tmp_path, "--lr", 0.002, "--reference-batch", 4, "--threads", 1,
                   "--timing-warmup-steps", 1, "--val-split", "test", "--val-batch-size", 7,
                   "--steps-per-epoch", 5, "--verbose", 1, "--profile-steps", "2,3", check=True)
    start, last = read_runlog(tmp_path)[0], epochs(tmp_path)[-1]
    assert start["scaled_lr"] == pytest.approx(0.002 * 16 / 4)
    assert last["lr"] == pytest.approx(0.002 * 16 / 4)  # what the optimizer really used
    assert [r["threads"] for r in start["ranks"]] == [1]
    assert [r["threads"] for r in read_runlog(baseline)[0]["ranks"]] == [len(os.sched_getaffinity(0))]
    assert (last["steps"], last["timed_steps"]) == (5, 4)
    n_test = records.load_manifest(records_dir)["splits"]["test"]["count"]
    assert (last["val_n"], last["val_batches"]) == (n_test, -(-n_test // 7))
    assert "img/s" not in trainer(records_dir, tmp_path / "quiet", "--no-tensorboard").stdout  # --verbose 0
    assert not (tmp_path / "quiet" / "tensorboard").exists()
    scalars = tensorboard_scalars(tmp_path / "tensorboard")
    for tag in ("val_mean_auroc", "images_per_sec", "lr", "train_loss", "val_loss"):
        assert scalars[tag] == [(e["epoch"], pytest.approx(e[tag], rel=1e-6)) for e in epochs(tmp_path)]
    assert {t for t in scalars if t.startswith("val_auroc/")} == {
        f"val_auroc/{name}" for name, v in last["val_auroc"].items() if v is not None}
    assert list((tmp_path / "tensorboard" / "profile").rglob("*.xplane.pb"))  # --profile-steps
    assert_one_line_error(trainer(records_dir, tmp_path / "bad", "--profile-steps", "3-5"), "--profile-steps")
    lines = [line for line in proc.stdout.splitlines() if line.strip()]  # --verbose 1, not a terminal:
    assert lines[0].startswith("start: ")  # the start line, then one line per epoch, no progress bar
    assert len(lines) == 3 and all(line.startswith("epoch ") for line in lines[1:])
    assert "\r" not in proc.stdout
    from chexnet_hvd import models

    small = models.build_model("small_cnn", 32, records.load_manifest(records_dir)["num_classes"])
    assert start["trainable_params"] == sum(int(np.prod(w.shape)) for w in small.trainable_weights)
    assert checkpoints.read_meta(tmp_path / "checkpoints" / "epoch-0002")["image_size"] == 32


def tensorboard_scalars(logdir) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in a directory's event files: {tag: [(step, value), ...]}."""
    import tensorflow as tf

    found: dict[str, list] = {}
    for path in sorted(logdir.glob("events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for value in event.summary.value:
                found.setdefault(value.tag, []).append((event.step, float(tf.make_ndarray(value.tensor))))
    return found


def test_schedules_cosine_and_step(records_dir, tmp_path):
    """The lr logged per epoch is the one its end was trained at (its limit from the left, at
    1 and 2 of 2 epochs): cosine, half-cosine to zero at the end; step with --step-epochs 1,
    x0.1 after epoch 1."""
    import math

    trainer(records_dir, tmp_path / "cos", "--schedule", "cosine", check=True)
    trainer(records_dir, tmp_path / "step", "--schedule", "step", "--step-epochs", 1, check=True)
    peak = 1e-3
    cosine = [peak * 0.5 * (1 + math.cos(math.pi * progress / 2)) for progress in (1, 2)]
    assert [e["lr"] for e in epochs(tmp_path / "cos")] == pytest.approx(cosine, rel=1e-5, abs=1e-9)
    assert [e["lr"] for e in epochs(tmp_path / "step")] == pytest.approx([peak, peak / 10], rel=1e-5)


@pytest.mark.horovod
def test_backward_passes_per_step_and_keep_checkpoints(records_dir, tmp_path):
    """2 passes per update, 1 step per epoch: the weights change after every second step only;
    --keep-checkpoints 4 keeps all 4 epoch checkpoints (the default keeps 3)."""
    trainer(records_dir, tmp_path, "--engine", "horovod", "--backward-passes-per-step", 2, "--steps-per-epoch", 1,
            "--epochs", 4, "--keep-checkpoints", 4, check=True)
    after = [checkpoints.load(tmp_path / "checkpoints" / f"epoch-{e:04d}")[0].get_weights()
             for e in (1, 2, 3, 4)]
    initial = weights(tmp_path, "-initial")
    assert same(after[0], initial) and not same(after[1], initial)
    assert same(after[2], after[1]) and not same(after[3], after[2])


def test_steps_per_execution_trains_what_one_step_per_call_does(records_dir, tmp_path):
    """3 steps per call of Keras' train function, 2 backward passes per update: the update of
    steps 3 and 4 sums passes from two calls (Horovod's accumulation lives in the graph's
    variables), and the weights end bitwise where one step per call takes them.
    --checkpoint-every-steps 2 checkpoints at the end of the call that passes step 2 (step 3);
    the call that passes step 4 ends the epoch, which its epoch checkpoint covers. A profiler
    trace of steps 2..5 spans both calls (and changes nothing learned)."""
    for calls in (1, 3):
        trainer(records_dir, tmp_path / f"calls{calls}", "--engine", "horovod", "--backward-passes-per-step", 2,
                "--steps-per-epoch", 6, "--epochs", 1, "--steps-per-execution", calls,
                "--checkpoint-every-steps", 2, *["--profile-steps", "2,5"] * (calls > 1), check=True)
    assert same(weights(tmp_path / "calls1"), weights(tmp_path / "calls3"))
    assert not same(weights(tmp_path / "calls1"), weights(tmp_path / "calls1", "-initial"))
    assert [p.name for p in (tmp_path / "calls3" / "checkpoints").glob("step-*")] == ["step-000000003"]
    assert list((tmp_path / "calls3" / "tensorboard" / "profile").rglob("*.xplane.pb"))


def test_a_resume_in_the_middle_of_an_update_keeps_its_backward_passes(records_dir, tmp_path):
    """2 backward passes per update, stopped after step 3 (step 3's pass summed into the second
    update, not yet applied) and resumed: the checkpoint holds Horovod's sum and its count, so
    step 4 completes that update, and weights and optimizer state end bitwise those of the
    straight run (Horovod keeps them outside the optimizer's checkpoint: the resumed update
    held step 4's pass alone). Resumed at 1 pass per update (the count already reaches it), the
    sum is left out, with a warning (two copies of one stopped run, each resumed one way)."""
    common = ["--engine", "horovod", "--backward-passes-per-step", 2, "--steps-per-epoch", 6,
              "--stop-check-steps", 1]
    trainer(records_dir, tmp_path / "straight", *common, check=True)
    assert trainer(records_dir, tmp_path / "stopped", *common, "--preempt-at-step", 3).returncode == 75
    for name, passes in (("same", 2), ("fewer", 1)):
        run_dir = shutil.copytree(tmp_path / "stopped", tmp_path / name, symlinks=True)
        resumed = trainer(records_dir, run_dir, *common, "--resume", "--backward-passes-per-step", passes, check=True)
        assert ("backward pass(es) of an update in progress left out" in resumed.stderr) == (passes == 1)
    for suffix in ("", "-optimizer"):
        assert same(weights(tmp_path / "straight", suffix), weights(tmp_path / "same", suffix)), suffix


def test_weights_early_stopping_and_step_checkpoints(records_dir, tmp_path):
    """--weights starts from a file (lr 0 keeps it); with weights that never change the val
    AUROC never improves, so --early-stopping 1 ends the run after epoch 2 of 5; and
    --checkpoint-every-steps 3 leaves the newest step checkpoint at step 6."""
    import tensorflow as tf

    from chexnet_hvd import models

    tf.keras.utils.set_random_seed(123)
    model = models.build_model("small_cnn", 32, records.load_manifest(records_dir)["num_classes"])
    model.save_weights(tmp_path / "start.h5")
    run_dir = tmp_path / "run"
    trainer(records_dir, run_dir, "--weights", tmp_path / "start.h5", "--lr", 0, "--epochs", 5,
            "--early-stopping", 1, "--checkpoint-every-steps", 3, check=True)
    assert same(weights(run_dir, "-initial"), model.get_weights())
    assert same(weights(run_dir), model.get_weights())
    assert [e["epoch"] for e in epochs(run_dir)] == [1, 2]
    assert read_runlog(run_dir)[-1]["status"] == "completed"
    steps = sorted(p.name for p in (run_dir / "checkpoints").glob("step-*"))
    assert steps == ["step-000000006"] and checkpoints.read_meta(run_dir / "checkpoints" / steps[0])["step"] == 6


def test_stop_check_steps_and_preempt_at_step(records_dir, tmp_path):
    """A stop raised at step 23 (--preempt-at-step, as SIGUSR1 would) is agreed on at the next
    multiple of --stop-check-steps: step 30 with the default 10, step 23 itself with 1. At
    --steps-per-execution 7 (calls of 7, 7 and 6 steps an epoch, 20 steps an epoch) the stop
    raised in the call of steps 21..27 is agreed on at the end of the call that passes step 30
    (28..34); raised at 39, in epoch 2's last call, the ranks do not stop on the epoch's last
    step (40): they validate and checkpoint epoch 2, agree as epoch 3 begins, and stop after its
    first step, 41 (the call after an agreement at an epoch's start is cut to one step, so this
    is also what one step per call does); epoch 1's timing leaves out its first call (the 3
    warm-up steps rounded up to it): 13 steps timed."""
    stopped = {}
    calls = ["--steps-per-execution", 7]
    for name, flags in {"default": ["--preempt-at-step", 23], "every": ["--preempt-at-step", 23,
                        "--stop-check-steps", 1], "calls": ["--preempt-at-step", 23, *calls],
                        "calls_boundary": ["--preempt-at-step", 39, *calls]}.items():
        proc = trainer(records_dir, tmp_path / name, "--steps-per-epoch", 20, "--epochs", 4, *flags)
        assert proc.returncode == 75, proc.stderr[-2000:]
        stopped[name] = read_runlog(tmp_path / name)[-1]["step"]
    assert stopped == {"default": 30, "every": 23, "calls": 34, "calls_boundary": 41}
    assert (tmp_path / "calls_boundary" / "checkpoints" / "epoch-0002").is_dir()
    assert [(e["steps"], e["timed_steps"]) for e in epochs(tmp_path / "calls")] == [(20, 13)]


def test_xla_compiles_clusters(records_dir, baseline, tmp_path):
    """Also at 4 steps per call: XLA still compiles clusters, and the run completes (without
    --xla, the baseline, none)."""
    with_xla = trainer(records_dir, tmp_path / "xla", "--xla", env=LOG_ALL, check=True)
    in_calls = trainer(records_dir, tmp_path / "xla4", "--xla", "--steps-per-execution", 4, env=LOG_ALL, check=True)
    assert "Compiled cluster using XLA" in with_xla.stderr and "Compiled cluster using XLA" in in_calls.stderr
    assert read_runlog(tmp_path / "xla4")[-1]["status"] == "completed"
    assert "Compiled cluster using XLA" not in (baseline / "stderr.txt").read_text()


def horovodrun(records_dir, run_dir, *extra, check=True):
    return run(["horovodrun", "--gloo", "-np", "2", sys.executable, "-m", "chexnet_hvd.train",
                "--data", str(records_dir), "--run-dir", str(run_dir), *map(str, BASE),
                "--threads", "1", *map(str, extra)], timeout=600, check=check)


@pytest.mark.mpi
@pytest.mark.horovod
def test_a_resume_in_the_middle_of_an_update_on_two_ranks(records_dir, tmp_path):
    """As above on 2 ranks, with epochs of 5 steps (an update spans the epoch's end), stopped
    after step 7: at each checkpoint every rank first takes the mean of the ranks' sums (the
    chief's alone would stand for both), so the resumed run ends where the straight one does
    up to rounding (1.5e-8 here), both ranks bitwise alike; with the chief's sum alone the
    weights ended 3.3e-3 apart."""
    common = ["--backward-passes-per-step", 2, "--steps-per-epoch", 5, "--stop-check-steps", 1]
    horovodrun(records_dir, tmp_path / "straight", *common)
    horovodrun(records_dir, tmp_path / "split", *common, "--preempt-at-step", 7, check=False)
    end = read_runlog(tmp_path / "split")[-1]
    assert (end["status"], end["step"]) == ("preempted", 7), end
    horovodrun(records_dir, tmp_path / "split", *common, "--resume")
    for run_dir in (tmp_path / "straight", tmp_path / "split"):
        assert_ranks_identical(run_dir)
    a, b = weights(tmp_path / "straight"), weights(tmp_path / "split")
    assert max(float(np.abs(x - y).max()) for x, y in zip(a, b, strict=True)) < 1e-5


@pytest.mark.mpi
@pytest.mark.horovod
def test_fp16_allreduce_and_warmup_on_two_ranks(records_dir, tmp_path):
    """fp16 compression rounds the averaged gradients: other weights than plain fp32 allreduce,
    yet close, and still bitwise identical on both ranks. --warmup-epochs 4: epoch 1 ends 1/4 of
    the way from peak / 2 ranks to the peak."""
    horovodrun(records_dir, tmp_path / "plain", "--warmup-epochs", 4)
    horovodrun(records_dir, tmp_path / "fp16", "--warmup-epochs", 4, "--fp16-allreduce")
    for run_dir in (tmp_path / "plain", tmp_path / "fp16"):
        assert_ranks_identical(run_dir)
    a, b = weights(tmp_path / "plain"), weights(tmp_path / "fp16")
    assert not same(a, b)
    assert max(float(np.abs(x - y).max()) for x, y in zip(a, b, strict=True)) < 1e-2
    peak = 1e-3 * 32 / 16
    assert epochs(tmp_path / "plain")[0]["lr"] == pytest.approx(peak / 2 + (peak - peak / 2) / 4)


@pytest.mark.mpi
@pytest.mark.parametrize("engine", ENGINES)
def test_fp16_overflow_on_one_rank_skips_the_step_on_every_rank(tmp_path, engine):
    """Only rank 1's batch of step 3 holds an infinite pixel: both ranks skip step 3 (weights
    unchanged), both halve the loss scale, and the weights stay bitwise identical throughout.
    At 3 steps per call (the overflow the call's last step) and 4 (the overflow inside the first
    call): after every call the scales, step counters and weights of 1 step per call."""
    run([*launcher(engine, 2), sys.executable, "tests/overflow_worker.py", str(tmp_path), engine, "1,3,4"],
        timeout=300, check=True)
    logs = {(r, c): json.loads((tmp_path / f"rank{r}-{c}.json").read_text()) for r in (0, 1) for c in (1, 3, 4)}
    assert all(logs[0, c] == logs[1, c] for c in (1, 3, 4))  # scales, step counters and weights
    log = logs[0, 1]
    overflow = 3
    for before, after in zip(log, log[1:], strict=False):
        if after["step"] == overflow:
            assert after["weights"] == before["weights"] and after["scale"] == before["scale"] / 2
        else:
            assert after["weights"] != before["weights"] and after["scale"] == before["scale"]
    assert [e.get("iterations") for e in log[1:]] == list(range(1, len(log)))
    assert logs[0, 3] == [log[0], log[3], log[6]] and logs[0, 4] == [log[0], log[4], log[6]]
