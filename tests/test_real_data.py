"""Real metadata and images from ../shared/data/real (skipped when absent): NIH official split
and prevalence table, the 121 real NIH PNGs through the records writer, CheXpert CSVs and
uncertainty policies, and the writer under mpirun with 2 ranks (and one of them failing)."""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
from conftest import ROOT, SHARED, VENV_BIN, module, run
from PIL import Image

from chexnet_hvd import data, metadata, records, sources, splits
from chexnet_hvd.labels import PATHOLOGIES
from chexnet_hvd.records import writer

REAL = SHARED / "data" / "real"
NIH = REAL / "nih"
NIH_IMAGES = REAL / "images" / "nih"
CHEXPERT = REAL / "chexpert"
needs_nih = pytest.mark.skipif(not (NIH / "Data_Entry_2017.csv").is_file(), reason="no real NIH metadata")
needs_images = pytest.mark.skipif(not NIH_IMAGES.is_dir(), reason="no real NIH images")
needs_chexpert = pytest.mark.skipif(not (CHEXPERT / "valid.csv").is_file(), reason="no CheXpert CSVs")


def nih_config(csv, **kwargs) -> sources.TableConfig:
    return sources.TableConfig(csv=str(csv), images=str(NIH_IMAGES), **kwargs)


@needs_nih
@pytest.mark.parametrize("csv", ["Data_Entry_2017.csv", "Data_Entry_2017_v2020.csv"])
def test_official_split_of_the_real_metadata(csv):
    table = sources.load_table(nih_config(NIH / csv, split="official", seed=3))
    counts = table["split"].value_counts()
    assert len(table) == 112_120
    assert counts["train"] + counts["val"] == 86_524 and counts["test"] == 25_596
    patients = [set(table.loc[table["split"] == s, "patient"]) for s in splits.SPLITS]
    assert not (patients[0] & patients[1] or patients[0] & patients[2] or patients[1] & patients[2])
    assert len(set().union(*patients)) == 30_805
    assert 0.09 < len(patients[1]) / (len(patients[0]) + len(patients[1])) < 0.11  # val by patient


@needs_nih
def test_dataset_stats_table_from_the_real_metadata(tmp_path):
    proc = run(["python", "tools/dataset_stats.py", "--csv", str(NIH / "Data_Entry_2017_v2020.csv"),
                "--split", "official", "--out", str(tmp_path / "stats")], check=True)
    stats = pd.read_csv(tmp_path / "stats.csv", index_col="row")
    assert list(stats.columns) == ["train", "val", "test", "all"]
    assert list(stats.index) == ["images", "patients", *PATHOLOGIES]
    assert stats.loc["images", "test"] == 25_596 and stats.loc["images", "all"] == 112_120
    # The v2020 release's counts (NIH's README / Kaggle): Atelectasis 11,559, Hernia 227 of 112,120.
    assert stats.loc["Atelectasis", "all"] == pytest.approx(100 * 11_559 / 112_120, abs=0.01)
    assert stats.loc["Hernia", "all"] == pytest.approx(100 * 227 / 112_120, abs=0.01)
    assert "| Hernia |" in proc.stdout and (tmp_path / "stats.md").read_text().strip() == proc.stdout.strip()


def real_subset(tmp_path):
    """The Data_Entry rows of the 121 real images, with the official lists beside them."""
    names = sorted(p.name for p in NIH_IMAGES.glob("*.png"))
    full = pd.read_csv(NIH / "Data_Entry_2017.csv", index_col=False, dtype=str)
    subset = full[full["Image Index"].isin(names)]
    subset.to_csv(tmp_path / "Data_Entry_2017.csv", index=False)
    for name in ("train_val_list.txt", "test_list.txt"):
        shutil.copy(NIH / name, tmp_path / name)
    return names, subset.set_index("Image Index")


@needs_nih
@needs_images
@pytest.mark.slow
def test_the_121_real_pngs_round_trip_through_records(tmp_path):
    names, rows = real_subset(tmp_path)
    out = tmp_path / "records"
    module("records", "--csv", tmp_path / "Data_Entry_2017.csv", "--images", NIH_IMAGES, "--out", out,
           "--split", "official", "--shard-size", 32, "--workers", 2, "--no-progress", check=True)
    manifest = records.load_manifest(out)
    assert manifest["rejected"] == 0 and manifest["splits"]["test"]["count"] == 25
    seen = {}
    for split in splits.SPLITS:
        for batch in data.eval_dataset(out, split, 8, 16):  # labels, ids; pixels below
            seen.update(dict(zip(batch["id"].numpy().astype(str), batch["label"].numpy(), strict=True)))
    assert sorted(seen) == names
    for name, label in seen.items():
        expected = set(rows.loc[name, "Finding Labels"].split("|")) - {"No Finding"}
        assert {PATHOLOGIES[i] for i in np.flatnonzero(label)} == expected, name
    modes = {}
    for path, _ in sum((records.split_shards(manifest, out, s) for s in manifest["splits"]), []):
        for raw in __import__("tensorflow").data.TFRecordDataset(path):
            example = records.parse_example(raw, manifest["num_classes"])
            name = example["image/id"].numpy().decode()
            source = np.asarray(Image.open(NIH_IMAGES / name))
            modes[name] = source.ndim
            # L stays as is; NIH's RGBA images are grey in RGB with opaque alpha: the R plane
            expected = source if source.ndim == 2 else source[..., 0]
            np.testing.assert_array_equal(data.decode(example).numpy()[..., 0], expected, err_msg=name)
    assert len(modes) == 121 and sum(d == 3 for d in modes.values()) == 4


# CheXpert's competition classes under their canonical names, in the canonical (NIH-first) order.
COMPETITION = ("Atelectasis", "Cardiomegaly", "Effusion", "Consolidation", "Edema")


@needs_chexpert
def test_chexpert_csvs_and_uncertainty_policies_on_hand_checked_rows():
    csv = CHEXPERT / "train_sample.csv"
    # Row 2: patient00002/study2/view1_frontal.jpg, all 5 competition labels -1.0 (uncertain);
    # row 1: patient00001, No Finding 1.0, competition labels blank; row 5: patient00003, Edema 1.0.
    expected = {
        "ones": ([1, 1, 1, 1, 1], [1, 1, 1, 1, 1]),
        "zeros": ([0, 0, 0, 0, 0], [1, 1, 1, 1, 1]),
        "ignore": ([0, 0, 0, 0, 0], [0, 0, 0, 0, 0]),
    }
    for policy, (label, mask) in expected.items():
        table = metadata.read_chexpert(csv, "/data", uncertainty=policy)
        y, m = metadata.label_columns(COMPETITION), metadata.mask_columns(COMPETITION)
        assert table.loc[1, y].tolist() == label and table.loc[1, m].tolist() == mask, policy
        assert table.loc[0, y].tolist() == [0] * 5 and table.loc[0, m].tolist() == [1] * 5
        assert table.loc[4, y].tolist() == [0, 0, 0, 0, 1]
    assert table.loc[1, "patient"] == "2" and table["patient"].nunique() == 477
    assert table.loc[0, "path"] == "/data/CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg"
    every = metadata.read_chexpert(csv, "/data/CheXpert-v1.0-small", observations="all")
    assert every.loc[0, "y:No Finding"] == 1 and every.loc[0, "y:Support Devices"] == 1
    assert every.loc[0, "path"] == "/data/CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg"
    valid = metadata.read_chexpert(CHEXPERT / "valid.csv", "/data")
    assert len(valid) == 234 and (valid[metadata.mask_columns(COMPETITION)] == 1).all().all()
    frontal, dropped = metadata.keep_views(valid, "frontal", CHEXPERT / "valid.csv", "Frontal/Lateral")
    assert (len(frontal), dropped) == (202, 32)


@pytest.mark.slow
@needs_chexpert
def test_chexpert_records_carry_the_ignore_mask(tmp_path):
    """Generated JPEGs at the paths of the first 30 sample rows (no CheXpert images ship here)."""
    rows = pd.read_csv(CHEXPERT / "train_sample.csv", dtype=str).head(30)
    rows.to_csv(tmp_path / "train.csv", index=False)
    rng = np.random.default_rng(0)
    for rel in rows["Path"]:
        target = tmp_path / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (40, 36), dtype=np.uint8)).save(target, quality=90)
    out = tmp_path / "records"
    module("records", "--dataset", "chexpert", "--csv", tmp_path / "train.csv", "--images", tmp_path,
           "--out", out, "--uncertainty", "ignore", "--views", "frontal", "--fractions", 1, 0, 0,
           "--image-size", 24, "--workers", 1, "--no-progress", check=True)
    manifest = records.load_manifest(out)
    frontal = int((rows["Frontal/Lateral"] == "Frontal").sum())
    assert manifest["classes"] == list(COMPETITION) and manifest["num_classes"] == 5
    assert manifest["splits"]["train"]["count"] == frontal and manifest["rejected"] == 0
    batch = next(iter(data.eval_dataset(out, "train", 24, 64)))
    by_id = dict(zip(batch["id"].numpy().astype(str), zip(batch["label"].numpy(), batch["mask"].numpy(), strict=False), strict=False))
    label, mask = by_id[rows["Path"][1]]
    assert label.tolist() == [0] * 5 and mask.tolist() == [0] * 5  # the all-uncertain row
    assert by_id[rows["Path"][4]][0].tolist() == [0, 0, 0, 0, 1] and by_id[rows["Path"][4]][1].tolist() == [1] * 5


def digests(out) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob("*.tfrecord"))}


@pytest.mark.mpi
@pytest.mark.slow
def test_writer_under_mpirun_matches_a_single_process_run(synthetic, tmp_path):
    args = ["-m", "chexnet_hvd.records", "--csv", str(synthetic / "Data_Entry_2017.csv"),
            "--images", str(synthetic / "images"), "--shard-size", "50", "--no-progress"]
    run(["python", *args, "--out", str(tmp_path / "single"), "--workers", "2"], check=True)
    run(["mpirun", "--allow-run-as-root", "--oversubscribe", "-np", "2", "--bind-to", "none",
         "python", *args, "--out", str(tmp_path / "mpi"), "--workers", "1"], check=True, timeout=300)
    single, mpi = (json.loads((tmp_path / d / "manifest.json").read_text()) for d in ("single", "mpi"))
    assert (single.pop("writer_ranks"), mpi.pop("writer_ranks")) == (1, 2)
    single.pop("created"), mpi.pop("created")
    assert single == mpi
    shards = sum(len(v["shards"]) for v in mpi["splits"].values())
    assert digests(tmp_path / "single") == digests(tmp_path / "mpi") and len(digests(tmp_path / "mpi")) == shards > 3


@pytest.mark.mpi
@pytest.mark.slow
def test_a_failing_writer_rank_ends_the_mpi_job_at_once(synthetic, tmp_path):
    """Rank 1 cannot write one of its shards (a directory stands at its path, as a full disk or
    a permission would stop it): its one-line error, then the whole job ends, rank 0 included,
    in seconds and with a non-zero exit code; no manifest says the directory is complete. (Before,
    rank 1 waited in MPI_Finalize and rank 0 in gather until the job's time limit.)"""
    cfg = sources.TableConfig(csv=str(synthetic / "Data_Entry_2017.csv"), images=str(synthetic / "images"))
    jobs = writer.plan_shards(sources.load_table(cfg), 50, None, cfg.seed)
    out = tmp_path / "mpi"
    (out / jobs[1].file).mkdir(parents=True)  # jobs[1::2] are rank 1's
    command = ["mpirun", "--allow-run-as-root", "--oversubscribe", "-np", "2", "--bind-to", "none",
               sys.executable, "-m", "chexnet_hvd.records", "--csv", cfg.csv[0], "--images", cfg.images[0],
               "--out", str(out), "--shard-size", "50", "--workers", "1", "--no-progress"]
    env = os.environ | {"PATH": f"{VENV_BIN}:{os.environ['PATH']}"}
    start = time.monotonic()
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)  # mpirun passes it on to the ranks
        _, stderr = proc.communicate(timeout=30)
        pytest.fail(f"the job still ran after 90 s:\n{stderr[-2000:]}")
    seconds = time.monotonic() - start
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode != 0 and seconds < 60, (proc.returncode, seconds)
    assert len(errors) == 1, stderr[-3000:]
    assert jobs[1].file in errors[0] and "(MPI rank 1 of 2; ending the job)" in errors[0], errors[0]
    assert not (out / records.MANIFEST).exists()
