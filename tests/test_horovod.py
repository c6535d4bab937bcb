"""Real 2-rank Horovod training of the small CNN on synthetic records: Gloo via horovodrun, MPI via
mpirun. Afterwards: bitwise-identical weights on both ranks, disjoint + complete training shards,
and validation AUROC equal to a single-process computation over the same checkpoint."""

import json
import sys

import numpy as np
import pytest
from conftest import assert_ranks_identical, run
from sklearn.metrics import roc_auc_score

from chexnet_hvd import checkpoints, data, metrics, records
from chexnet_hvd.runlog import read_runlog

pytestmark = [pytest.mark.slow, pytest.mark.mpi]
TRAIN = ["-m", "chexnet_hvd.train", "--model", "small_cnn", "--image-size", "32", "--batch-size", "16",
         "--epochs", "2", "--audit", "--verbose", "0", "--threads", "1", "--warmup-epochs", "1"]


def train_args(records_dir, run_dir):
    return [sys.executable, *TRAIN, "--data", str(records_dir), "--run-dir", str(run_dir)]


@pytest.fixture(scope="module")
def gloo_run(records_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("gloo")
    run(["horovodrun", "--gloo", "-np", "2", *train_args(records_dir, run_dir)], timeout=300, check=True)
    return run_dir


def test_gloo_weights_bitwise_identical_on_both_ranks(gloo_run):
    assert_ranks_identical(gloo_run)


def test_gloo_ranks_read_disjoint_records_covering_the_split(gloo_run, records_dir):
    """Epoch 1's records per rank (shard, skip, take): the same count on both ranks, no record
    on both, fewer than one global batch of the split left out."""
    audits = [json.loads((gloo_run / "audit" / f"rank{r}.json").read_text()) for r in (0, 1)]
    taken = [{(f, i) for f, skip, take in a["segments"] for i in range(skip, skip + take)} for a in audits]
    assert len(taken[0]) == len(taken[1]) and not taken[0] & taken[1]
    manifest = records.load_manifest(records_dir)
    assert 0 <= manifest["splits"]["train"]["count"] - len(taken[0] | taken[1]) < 2 * 16


def test_gloo_run_log_describes_the_job(gloo_run):
    log = read_runlog(gloo_run)
    start, epochs, end = log[0], [r for r in log if r["event"] == "epoch"], log[-1]
    assert (start["event"], start["world_size"], start["horovod_backend"]) == ("start", 2, "gloo")
    assert start["global_batch"] == 2 * start["local_batch"] == 32
    assert start["scaled_lr"] == pytest.approx(1e-3 * 32 / 16)
    assert [e["epoch"] for e in epochs] == [1, 2] and end["status"] == "completed"
    assert all(e["images_per_sec"] > 0 and e["timed_steps"] == e["steps"] - 3 for e in epochs)


def test_gloo_validation_auroc_equals_single_process(gloo_run, records_dir):
    model, meta = checkpoints.load(gloo_run / "checkpoints" / "epoch-0002")
    probs, labels = [], []
    for batch in data.eval_dataset(records_dir, "val", 32, 50):
        probs.append(model.predict_on_batch(batch["image"]))
        labels.append(batch["label"].numpy())
    probs, labels = np.concatenate(probs), np.concatenate(labels)
    last = [r for r in read_runlog(gloo_run) if r["event"] == "epoch"][-1]
    assert last["val_n"] == len(labels) == records.load_manifest(records_dir)["splits"]["val"]["count"]
    ours = metrics.per_class_auroc(labels, probs)
    for c, name in enumerate(meta["classes"]):
        logged = last["val_auroc"][name]
        if labels[:, c].min() == labels[:, c].max():
            assert logged is None and np.isnan(ours[c])
        else:
            assert logged == pytest.approx(roc_auc_score(labels[:, c], probs[:, c]), abs=2e-6)
    assert last["val_mean_auroc"] == pytest.approx(metrics.mean_defined(ours), abs=2e-6)


def test_mpirun_two_ranks(records_dir, tmp_path):
    run_dir = tmp_path / "mpi"
    # Open MPI busy-polls; yielding when idle keeps 2 ranks on 2 cores from starving each other.
    run(["mpirun", "--allow-run-as-root", "--oversubscribe", "-np", "2", "--mca", "mpi_yield_when_idle", "1",
         "--bind-to", "none", *train_args(records_dir, run_dir)], timeout=300, check=True)
    assert_ranks_identical(run_dir)
    start = read_runlog(run_dir)[0]
    assert (start["world_size"], start["horovod_backend"]) == (2, "mpi")


def test_a_split_smaller_than_the_world_validates(records_dir, tmp_path):
    """A validation split of 1 record on 2 ranks: rank 1 predicts nothing, the gather still
    works (an empty rank used to crash it) and the epoch reports the one record."""
    import shutil

    import tensorflow as tf

    data_dir = tmp_path / "records"
    shutil.copytree(records_dir, data_dir)
    manifest = json.loads((data_dir / "manifest.json").read_text())
    first_val = manifest["splits"]["val"]["shards"][0]["file"]
    with tf.io.TFRecordWriter(str(data_dir / "one-00000-of-00001.tfrecord")) as writer:
        writer.write(next(iter(tf.data.TFRecordDataset(str(data_dir / first_val)))).numpy())
    manifest["splits"]["one"] = manifest["splits"]["val"] | {
        "count": 1, "shards": [{"file": "one-00000-of-00001.tfrecord", "count": 1}]}
    (data_dir / "manifest.json").write_text(json.dumps(manifest))
    run_dir = tmp_path / "run"
    run(["horovodrun", "--gloo", "-np", "2", *train_args(data_dir, run_dir), "--epochs", "1",
         "--val-split", "one"], timeout=300, check=True)
    last = [r for r in read_runlog(run_dir) if r["event"] == "epoch"][-1]
    assert last["val_n"] == 1 and read_runlog(run_dir)[-1]["status"] == "completed"
