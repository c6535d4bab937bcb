"""Real 2-rank training on synthetic records under both engines: Horovod (Gloo via `horovodrun
--gloo`, MPI via `horovodrun`) and TensorFlow's MultiWorkerMirroredStrategy (chexnet_hvd.launch).
Afterwards: bitwise-identical weights on both ranks (batch-norm statistics included), disjoint +
complete training shards, and validation AUROC equal to a single-process computation over the
chief's checkpoint."""

import json
import re
import sys

import numpy as np
import pytest
from conftest import (
    BATCH_NORM_MODEL,
    ENGINES,
    assert_one_line_error,
    assert_ranks_identical,
    ranks,
    run,
)
from conftest import launcher as launcher_of
from sklearn.metrics import roc_auc_score

from chexnet_hvd import checkpoints, data, metrics, records
from chexnet_hvd.runlog import read_runlog

pytestmark = [pytest.mark.slow, pytest.mark.mpi]
TRAIN = ["-m", "chexnet_hvd.train", "--model", "small_cnn", "--image-size", "32", "--batch-size", "16",
         "--epochs", "2", "--audit", "--verbose", "0", "--threads", "1", "--warmup-epochs", "1"]


def train_args(records_dir, run_dir):
    return [sys.executable, *TRAIN, "--data", str(records_dir), "--run-dir", str(run_dir)]




@pytest.fixture(scope="module", params=ENGINES)
def two_ranks(request, records_dir, tmp_path_factory):
    """(engine, run dir) of a 2-rank run, once per engine, of a model with batch normalisation:
    each rank updates its moving statistics from its own batches until they are averaged. A
    step checkpoint in each epoch (13 steps) as well as the epoch's: under the tf engine,
    reading the statistics is a collective, so every worker joins each checkpoint write."""
    run_dir = tmp_path_factory.mktemp(request.param)
    proc = run(ranks(request.param, 2, *train_args(records_dir, run_dir), "--model", BATCH_NORM_MODEL,
                     "--checkpoint-every-steps", "12"), timeout=600, check=True)  # 25 s alone, 108 s beside 16 ranks
    (run_dir / "stderr.txt").write_text(proc.stderr)
    return request.param, run_dir


@pytest.fixture
def two_ranks_run(two_ranks):
    return two_ranks[1]


def test_a_run_that_succeeds_ends_without_error_lines(two_ranks_run):
    """No rank leaves before the chief has written the run log's end: a tf worker that exited
    first made the chief's coordination service log errors (`E...` lines, "heartbeat timeout")
    on a run that succeeded. Nor does TF warn that the engine's sum retraced (a graph per shape
    and dtype did, in every log)."""
    stderr = (two_ranks_run / "stderr.txt").read_text()
    assert not re.search(r"^(\[\d\]<std\w+>:)?E\d{4} |heartbeat timeout|Traceback|retracing", stderr,
                         re.M), stderr[-3000:]


def test_weights_bitwise_identical_on_both_ranks(two_ranks_run):
    assert_ranks_identical(two_ranks_run)


def test_ranks_read_disjoint_records_covering_the_split(two_ranks_run, records_dir):
    """The records each rank trained in epoch 1, as its input pipeline delivered them: the same
    count on both ranks, none twice, fewer than one global batch of the split left out."""
    trails = [(two_ranks_run / "audit" / f"rank{r}-trained.jsonl").read_text().splitlines() for r in (0, 1)]
    epoch1 = [json.loads(lines[0])["ids"] for lines in trails]
    taken = [set(ids) for ids in epoch1]
    assert [len(ids) for ids in epoch1] == [len(t) for t in taken]  # none twice on a rank
    assert len(taken[0]) == len(taken[1]) and not taken[0] & taken[1]
    manifest = records.load_manifest(records_dir)
    assert 0 <= manifest["splits"]["train"]["count"] - len(taken[0] | taken[1]) < 2 * 16


def test_run_log_describes_the_job(two_ranks):
    engine, run_dir = two_ranks
    log = read_runlog(run_dir)
    start, epochs, end = log[0], [r for r in log if r["event"] == "epoch"], log[-1]
    assert (start["event"], start["world_size"], start["engine"]) == ("start", 2, engine)
    assert start["backend"] == {"horovod": "gloo", "tf": "ring"}[engine]
    assert ("horovod" in start["versions"]) == (engine == "horovod")
    assert [(r["rank"], r["local_rank"], r["local_size"]) for r in start["ranks"]] == [(0, 0, 2), (1, 1, 2)]
    assert start["global_batch"] == 2 * start["local_batch"] == 32
    assert start["scaled_lr"] == pytest.approx(1e-3 * 32 / 16)
    assert [e["epoch"] for e in epochs] == [1, 2] and end["status"] == "completed"
    assert all(e["images_per_sec"] > 0 and e["timed_steps"] == e["steps"] - 3 for e in epochs)


def near_ties(labels: np.ndarray, probs: np.ndarray, eps: float = 1e-6) -> float:
    """The share of (positive, negative) pairs whose scores lie within `eps` of each other: as
    much as the AUROC can move when the scores are computed in other batches (oneDNN picks its
    kernels, and so its rounding in the 7th digit, by batch shape and CPU)."""
    pos, neg = probs[labels >= 0.5], probs[labels < 0.5]
    return float(np.sum(np.abs(pos[:, None] - neg[None, :]) <= eps)) / (len(pos) * len(neg))


def test_validation_auroc_equals_single_process(two_ranks, records_dir):
    """In one process, the model computed as the engine's predictor computes it (Keras'
    predict_on_batch; the tf engine: a traced call, whose fused kernels round differently in the
    7th digit, enough to flip near-tied scores of a batch-norm model): the same AUROC but for the
    pairs of near-tied scores (this barely trained model scores some pairs within 1e-7 of each
    other: on an Intel CPU one such pair of 122 flipped a class's AUROC by 0.008 between the
    ranks' batches and these)."""
    engine, two_ranks_run = two_ranks
    model, meta = checkpoints.load(two_ranks_run / "checkpoints" / "epoch-0002")
    import tensorflow as tf

    predict = {"horovod": model.predict_on_batch,
               "tf": tf.function(lambda x: model(x, training=False), reduce_retracing=True)}[engine]
    probs, labels = [], []
    for batch in data.eval_dataset(records_dir, "val", 32, 50):
        probs.append(np.asarray(predict(batch["image"])))
        labels.append(batch["label"].numpy())
    probs, labels = np.concatenate(probs), np.concatenate(labels)
    last = [r for r in read_runlog(two_ranks_run) if r["event"] == "epoch"][-1]
    assert last["val_n"] == len(labels) == records.load_manifest(records_dir)["splits"]["val"]["count"]
    ours = metrics.per_class_auroc(labels, probs)
    slack = []
    for c, name in enumerate(meta["classes"]):
        logged = last["val_auroc"][name]
        if labels[:, c].min() == labels[:, c].max():
            assert logged is None and np.isnan(ours[c])
        else:
            slack.append(near_ties(labels[:, c], probs[:, c]))
            assert logged == pytest.approx(roc_auc_score(labels[:, c], probs[:, c]), abs=2e-6 + slack[-1]), name
    assert max(slack) < 0.1  # most pairs apart: the comparison still says something (here up to 0.066)
    assert last["val_mean_auroc"] == pytest.approx(metrics.mean_defined(ours), abs=2e-6 + np.mean(slack))


def test_every_rank_joins_the_step_and_epoch_checkpoints(two_ranks):
    """The run completed with the chief's step and epoch checkpoints there (weights, batch-norm
    statistics included, identical on both ranks: test_weights_bitwise_identical_on_both_ranks)."""
    engine, run_dir = two_ranks
    assert read_runlog(run_dir)[-1]["status"] == "completed"
    assert {p.name for p in (run_dir / "checkpoints").iterdir()} >= {"epoch-0001", "epoch-0002", "step-000000024"}


@pytest.mark.parametrize("flag", [["--fp16-allreduce"], ["--backward-passes-per-step", "2"]])
def test_the_tf_engine_refuses_what_only_horovod_has(records_dir, tmp_path, flag):
    proc = run([*train_args(records_dir, tmp_path), "--engine", "tf", *flag])
    assert_one_line_error(proc, f"error: {flag[0]}:", "--engine tf")


def test_an_unknown_chexnet_engine_is_a_one_line_error(records_dir, tmp_path):
    """(CHEXNET_ENGINE=tf making a run without --engine a tf engine's:
    test_a_batch_log_starts_with_a_line_and_beats_during_epochs[tf-4], whose launcher sets it.)"""
    bad = run(train_args(records_dir, tmp_path / "bad"), env={"CHEXNET_ENGINE": "mxnet"})
    assert_one_line_error(bad, "error: --engine: 'mxnet' (from CHEXNET_ENGINE) is not one of 'horovod', 'tf'")


MPIRUN = ["mpirun", "--allow-run-as-root", "--oversubscribe", "-np", "2", "--bind-to", "none"]
OVER_MPI = {"horovod": "mpi", "tf": "ring"}  # each engine's backend: Horovod started by Open MPI, or the tf ring


@pytest.mark.horovod
@pytest.mark.parametrize("launcher,engine,started_by", [
    ("tf", "horovod", "chexnet_hvd.launch or TF_CONFIG"), ("horovod", "tf", "horovodrun"), ("mpirun", "tf", "mpirun"),
    ("mpirun in a Slurm allocation", "tf", "mpirun")])
def test_an_engine_refuses_the_other_engines_launcher(records_dir, tmp_path, launcher, engine, started_by):
    """Each rank of the other engine's launcher would see a world of one and train alone: N
    copies of the run writing one run directory. Refused, on every rank, before anything is
    written (a launcher may end the other rank before it prints: one line or two, the same).
    mpirun inside a 2-node allocation starts its daemons with srun, one task per node, so its
    ranks inherit that step's variables (here given as the daemons pass them on): the tf engine
    took them for its workers, and the ranks of a node all claimed one worker's place."""
    start = {"mpirun": MPIRUN, "mpirun in a Slurm allocation": [
        *MPIRUN, *(a for var in ("SLURM_STEP_NUM_TASKS=2", "SLURM_PROCID=0", "SLURM_STEP_NODELIST=localhost",
                                 "SLURM_STEP_TASKS_PER_NODE=2") for a in ("-x", var))]}.get(launcher)
    start = start or launcher_of(launcher, 2)
    proc = run([*start, *train_args(records_dir, tmp_path), "--engine", engine], timeout=300)
    errors = [line.split("error: ", 1)[1] for line in (proc.stdout + proc.stderr).splitlines()
              if "error: --engine:" in line]
    assert proc.returncode != 0 and len(errors) in (1, 2) and len(set(errors)) == 1, proc.stderr[-2000:]
    assert "sees a world of 1" in errors[0] and started_by in errors[0]
    assert not (tmp_path / "runlog.jsonl").exists()


def with_a_one_record_split(records_dir, data_dir):
    """A copy of records_dir with a split `one` of 1 record (the first val record)."""
    import shutil

    import tensorflow as tf

    shutil.copytree(records_dir, data_dir)
    manifest = json.loads((data_dir / "manifest.json").read_text())
    first_val = manifest["splits"]["val"]["shards"][0]["file"]
    with tf.io.TFRecordWriter(str(data_dir / "one-00000-of-00001.tfrecord")) as writer:
        writer.write(next(iter(tf.data.TFRecordDataset(str(data_dir / first_val)))).numpy())
    manifest["splits"]["one"] = manifest["splits"]["val"] | {
        "count": 1, "shards": [{"file": "one-00000-of-00001.tfrecord", "count": 1}]}
    (data_dir / "manifest.json").write_text(json.dumps(manifest))
    return data_dir


@pytest.mark.parametrize(("launcher", "calls"), [("tf", 4), pytest.param("horovodrun", 1, marks=pytest.mark.horovod)])
def test_a_batch_log_starts_with_a_line_and_beats_during_epochs(records_dir, tmp_path, launcher, calls):
    """2 workers, their output a batch job's log: a start line before the start-up (input,
    tracing), then a heartbeat line every --heartbeat seconds of an epoch (0.05 s: a few steps
    of the small CNN), before the first epoch line. (DenseNet-121's start-up was minutes of
    silence: the start line comes once the model is built, before it is traced, whatever the
    model.) Under the tf engine at 4 steps per call (beats between calls); under `horovodrun -np
    2`, the README's command, which runs Horovod over MPI here: mpirun gives each rank a
    pseudo-terminal for stdout even when its own goes to a pipe, so the heartbeats were never
    printed there, and the progress bar was. The tf engine's launcher is given no --engine: its
    workers default to its engine (CHEXNET_ENGINE, which it sets), whatever the default engine
    is. Horovod over MPI leaves the ranks' weights bitwise identical, as over Gloo. Validated on
    a split of 1 record: rank 1 predicts nothing, the gather still works (an empty rank used to
    crash it) and the epoch reports the one record."""
    engine = "horovod" if launcher == "horovodrun" else launcher
    data_dir = with_a_one_record_split(records_dir, tmp_path / "records")
    run_dir = tmp_path / "run"
    command = [*train_args(data_dir, run_dir), "--val-split", "one", "--epochs", "1", "--steps-per-epoch", "12",
               "--heartbeat", "0.05", "--verbose", "1", "--steps-per-execution", str(calls),
               *["--engine", engine] * (engine == "horovod")]
    start = ["horovodrun", "-np", "2"] if launcher == "horovodrun" else launcher_of(engine, 2)
    proc = run([*start, *command], timeout=600, check=True)
    lines = [re.sub(r"^\[\d+,\d+\]<stdout>:", "", line) for line in proc.stdout.splitlines()]  # mpirun's tags
    starts = [i for i, line in enumerate(lines) if line.startswith(f"start: 2 rank(s) of the {engine} engine")]
    beats = [i for i, line in enumerate(lines) if re.match(r"epoch 1: step \d+/12, [\d.]+ img/s, loss", line)]
    first_epoch = next(i for i, line in enumerate(lines) if re.match(r"epoch 1: [\d.]+ img/s", line))
    assert len(starts) == 1 and "12 steps per epoch" in lines[starts[0]], proc.stdout[-2000:]
    assert beats and starts[0] < beats[0] < first_epoch, proc.stdout[-2000:]
    assert "\r" not in proc.stdout and "ETA" not in proc.stdout, proc.stdout[-2000:]  # no progress bar
    log = read_runlog(run_dir)
    assert (log[0]["engine"], log[0]["backend"], log[0]["world_size"]) == (engine, OVER_MPI[engine], 2)
    assert [r["val_n"] for r in log if r["event"] == "epoch"] == [1] and log[-1]["status"] == "completed"
    assert_ranks_identical(run_dir)
