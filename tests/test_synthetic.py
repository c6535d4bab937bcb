"""Synthetic data (chexnet_hvd.synthetic): reproducible to the byte, with the patient structure asked for."""

import hashlib

import pytest
from conftest import module


def test_synthetic_same_seed_same_bytes(tmp_path):
    digests = []
    for name in ("a", "b"):
        module("synthetic", "--out", tmp_path / name, "--images", 20, "--size", 24, "--seed", 5, check=True)
        files = sorted((tmp_path / name).rglob("*.*"))
        digests.append([(f.name, hashlib.sha256(f.read_bytes()).hexdigest()) for f in files])
    assert digests[0] == digests[1] and len(digests[0]) == 22


@pytest.mark.slow
def test_synthetic_mean_images_per_patient(tmp_path):
    import pandas as pd

    patients = {}
    for mean in (1.0, 5.0):
        module("synthetic", "--out", tmp_path / str(mean), "--images", 200, "--size", 16,
               "--mean-images-per-patient", mean, check=True)
        patients[mean] = pd.read_csv(tmp_path / str(mean) / "Data_Entry_2017.csv")["Patient ID"].nunique()
    assert patients[1.0] > 150 and 25 < patients[5.0] < 60, patients
