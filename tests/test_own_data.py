"""Your own data: the generic CSV layout, label alignment onto the canonical list, DICOM sources
(generated; pydicom writes them), the view filter, and a merged NIH + CheXpert records set from
the real CSVs in ../shared/data/real, checked on hand-picked rows, trained and evaluated. (Every
PNG/JPEG mode and bit depth: test_images.py.)"""

import dataclasses
import json
import shutil

import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
from conftest import SHARED, assert_one_line_error, module
from PIL import Image
from test_images import gray, write_dicom

from chexnet_hvd import data, labels, records, sources
from chexnet_hvd.cli import InputError
from chexnet_hvd.runlog import read_runlog

REAL = SHARED / "data" / "real"
needs_real = pytest.mark.skipif(not (REAL / "chexpert" / "valid.csv").is_file(), reason="no real CSVs")


OWN_CSV = """path,patient,view,split,Atelectasis,Pleural Effusion,nodule,Lungs,Age
a.png,p1,PA,train,1,0,-1,,71
b.png,p1,LL,train,0,1,1,1,71
c.png,p2,AP,val,-1,,0,0,45
d.png,p3,frontal,test,,-1,1,-1,60
"""


def own_dataset(tmp_path, csv_text=OWN_CSV):
    images = tmp_path / "images"
    images.mkdir(exist_ok=True)
    for name in "abcd":
        Image.fromarray(gray((12, 12), ord(name))).save(images / f"{name}.png")
    (tmp_path / "own.csv").write_text(csv_text)
    return ["--dataset", "csv", "--csv", tmp_path / "own.csv", "--images", images]


@pytest.mark.slow
def test_own_csv_aligns_labels_applies_policies_and_filters_views(tmp_path):
    out = tmp_path / "records"
    module("records", *own_dataset(tmp_path), "--out", out, "--split", "official", "--views", "frontal",
           "--label-map", "Lungs=Lung Opacity", "Age=", "--uncertainty", "zeros,Atelectasis=ones",
           "--workers", 1, "--no-progress", check=True)
    manifest = records.load_manifest(out)
    # canonical names in canonical order; the lateral row b.png left out; the CSV's splits kept
    assert manifest["classes"] == ["Atelectasis", "Effusion", "Nodule", "Lung Opacity"]
    assert {s: v["count"] for s, v in manifest["splits"].items()} == {"train": 1, "val": 1, "test": 1}
    got = {}
    for split in ("train", "val", "test"):
        for batch in data.eval_dataset(out, split, 12, 4):
            for i, y, m in zip(batch["id"].numpy(), batch["label"].numpy(), batch["mask"].numpy(), strict=True):
                got[i.decode()] = (y.tolist(), m.tolist())
    # -1: Atelectasis=ones, others zeros; blank: not annotated = masked
    assert got["a.png"] == ([1, 0, 0, 0], [1, 1, 1, 0])
    assert got["c.png"] == ([1, 0, 0, 0], [1, 0, 1, 1])
    assert got["d.png"] == ([0, 0, 1, 0], [0, 1, 1, 1])
    assert manifest["labels"]["label_map"] == ["Lungs=Lung Opacity", "Age="]
    module("records", *own_dataset(tmp_path), "--out", tmp_path / "lateral", "--split", "official",
           "--views", "lateral", "--label-map", "lungs=Lung Opacity", "AGE=", "--workers", 1,
           "--no-progress", check=True)  # map keys as blind to case as the names
    assert {s: v["count"] for s, v in records.load_manifest(tmp_path / "lateral")["splits"].items()} == {"train": 1}


def test_two_csvs_of_one_hospital_share_patients_and_duplicates_are_refused(tmp_path):
    """Sources of one dataset kind share a patient namespace: a patient in both CSVs lands in
    one split; the same file in both is an error."""
    (tmp_path / "a.csv").write_text("path,patient,Edema\n" + "".join(f"a{i}.png,H{i},1\n" for i in range(20)))
    (tmp_path / "b.csv").write_text("path,patient,Edema\n" + "".join(f"b{i}.png,H{i},0\n" for i in range(5, 30)))
    cfg = sources.TableConfig(dataset=["csv"], csv=[str(tmp_path / "a.csv"), str(tmp_path / "b.csv")],
                               images=[str(tmp_path)])
    table = sources.load_table(cfg)
    assert table["patient"].nunique() == 30 and table.groupby("patient")["split"].nunique().max() == 1
    assert set(table["source"]) == {"csv-1", "csv-2"} and table["image"].str.startswith(("csv-1/", "csv-2/")).all()
    (tmp_path / "a.csv").write_text("path,patient,split,Edema\na0.png,H0,train,1\n")
    (tmp_path / "b.csv").write_text("path,patient,split,Edema\nb0.png,H0,test,1\n")
    with pytest.raises(InputError, match="1 patients are in more than one split"):
        sources.load_table(dataclasses.replace(cfg, split="official"))
    (tmp_path / "b.csv").write_text("path,patient,split,Edema\na0.png,H0,train,1\n")
    with pytest.raises(InputError, match="a0.png: listed by two sources"):
        sources.load_table(dataclasses.replace(cfg, split="official"))
    # names are compared blind to case, spaces and underscores
    assert [labels.canonical(n) for n in ("pleural thickening", "PLEURAL_EFFUSION", " lung  opacity")] == \
        ["Pleural_Thickening", "Effusion", "Lung Opacity"]


@pytest.mark.parametrize("extra, csv_text, fragments", [
    (["--split", "official"], OWN_CSV, ["2 label columns are not canonical labels: 'Lungs', 'Age'",
                                        "--label-map"]),
    (["--label-map", "Lungs=Lung Opacity", "Age="], OWN_CSV, ["has a split column", "--split official"]),
    (["--split", "official", "--label-map", "Lungs=Lungs"], OWN_CSV, ["'Lungs' is not a canonical label"]),
    (["--views", "frontal"], "path,patient,view,Edema\na.png,1,oblique,1\n", ["row 2", "'oblique'"]),
    ([], "path,patient,view,Edema\na.png,1,PA,1\nb.png,2,Axial,0\n", ["'view'", "'Axial' (row 3)"]),
    (["--views", "lateral"], "path,patient,view,Edema\na.png,1,L,1\nb.png,2,,0\n",
     ["--views lateral needs a view in every row", "1 of 2 rows have none, e.g. 'b.png'"]),
    ([], "path,patient,Edema,Pulmonary Edema\na.png,1,1,0\n",
     ["not a canonical label"]),
    (["--label-map", "Pulmonary Edema=Edema"], "path,patient,Edema,Pulmonary Edema\na.png,1,1,0\n",
     ["columns 'Edema' and 'Pulmonary Edema' are both 'Edema'"]),
    ([], "path,patient,Edema\na.png,1,yes\n", ["'yes' is not 1, 0, -1 or blank"]),
    (["--uncertainty", "Edema=maybe"], "path,patient,Edema\na.png,1,1\n", ["must be one of"]),
    (["--uncertainty", "Edeam=zeros"], "path,patient,Edema\na.png,1,1\n", ["'Edeam' is not a canonical label"]),
    (["--uncertainty", "zeros,Hernia=ones"], "path,patient,Edema\na.png,1,1\n", ["no class 'Hernia'"]),
    (["--views", "frontal"], "path,patient,view,Edema\na.png,1,LL,1\n", ["no frontal images"]),
    (["--dataset", "csv", "nih"], "path,patient,Edema\na.png,1,1\n", ["2 datasets, 1 CSVs"]),
    (["--label-map", "Age=", "--uncertainty", "Age=ones"], "path,patient,Edema,Age\na.png,1,1,50\n",
     ["'Age' is left out by --label-map"]),
])
def test_own_csv_mistakes_are_one_line_errors(tmp_path, extra, csv_text, fragments):
    out = tmp_path / "records"
    proc = module("records", *own_dataset(tmp_path, csv_text), "--out", out, *extra, "--workers", 1,
                  "--no-progress")
    assert_one_line_error(proc, *fragments)
    assert not (out / records.MANIFEST).exists()


def test_every_duplicate_and_every_unknown_label_is_named_in_one_error(tmp_path):
    """A CSV with 7 images listed twice, or 10 local label names, or several unknown NIH
    findings: one error names the first few (with their rows) and says how many there are."""
    def load(text, dataset="csv"):
        (tmp_path / "x.csv").write_text(text)
        return sources.load_table(sources.TableConfig(csv=str(tmp_path / "x.csv"), dataset=[dataset]))

    rows = [f"img{i}.png,p{i},0" for i in range(10)] + [f"img{i}.png,p{i},1" for i in range(7)]
    with pytest.raises(InputError) as err:
        load("path,patient,Edema\n" + "\n".join(rows) + "\n")
    assert err.value.what == ("7 images listed twice or more: 'img0.png' (rows 2, 12), 'img1.png' "
                              "(rows 3, 13), 'img2.png' (rows 4, 14), 'img3.png' (rows 5, 15), "
                              "'img4.png' (rows 6, 16) and 2 more")
    local = [f"Local {i}" for i in range(10)]
    with pytest.raises(InputError) as err:
        load("path,patient,Edema," + ",".join(local) + "\na.png,1,1" + ",0" * 10 + "\n")
    assert err.value.what.startswith("10 label columns are not canonical labels: 'Local 0', 'Local 1', "
                                     "'Local 2', 'Local 3', 'Local 4' and 5 more; map each with --label-map")
    with pytest.raises(InputError) as err:
        load("Image Index,Finding Labels,Patient ID\na.png,Mass|Covid,1\nb.png,Hernia,2\n"
             "c.png,Covid|Lung Lesion,3\n", "nih")
    assert err.value.what == "unknown pathologies in 'Finding Labels': 'Covid' (rows 2, 4), 'Lung Lesion' (row 4)"
    (tmp_path / "x.csv").write_text("path,patient,Edema\n" + "\n".join(rows) + "\n")
    assert_one_line_error(module("records", "--dataset", "csv", "--csv", tmp_path / "x.csv", "--images",
                                 tmp_path, "--out", tmp_path / "out"), "7 images listed twice", "and 2 more")


# View codes of public sets and their kinds (NIH, CheXpert, MIMIC-CXR, PadChest, DICOM terms).
PUBLIC_VIEWS = {"PA": "frontal", "AP": "frontal", "AP Supine": "frontal", "AP_horizontal": "frontal",
                "Frontal": "frontal", "POSTEROANTERIOR": "frontal", "L": "lateral", "LL": "lateral",
                "RL": "lateral", "Lateral": "lateral", "LATERAL": "lateral"}


@pytest.mark.slow
def test_view_codes_of_public_sets_are_accepted_and_the_filter_says_what_it_dropped(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    lines = ["path,patient,view,Edema"]
    for i, code in enumerate(PUBLIC_VIEWS):
        Image.fromarray(gray((8, 8), i)).save(images / f"{i}.png")
        lines.append(f"{i}.png,p{i},{code},{i % 2}")
    (tmp_path / "views.csv").write_text("\n".join(lines) + "\n")
    source = ["--dataset", "csv", "--csv", tmp_path / "views.csv", "--images", images, "--fractions", 1, 0, 0,
              "--workers", 1, "--no-progress"]
    for views in ("frontal", "lateral"):
        proc = module("records", *source, "--views", views, "--out", tmp_path / views, check=True)
        kept = [f"{i}.png" for i, kind in enumerate(PUBLIC_VIEWS.values()) if kind == views]
        dropped = len(PUBLIC_VIEWS) - len(kept)
        assert proc.stdout.count(f"--views {views}: kept {len(kept)} rows, dropped {dropped} of other views") == 1
        manifest = records.load_manifest(tmp_path / views)
        assert (manifest["listed"], manifest["dropped_by_views"]) == (len(kept), dropped)
        assert manifest["sources"][0]["dropped_by_views"] == dropped
        assert manifest["splits"]["train"]["count"] == len(kept)
    # --views all still checks the codes: a CT's Axial is no chest X-ray view
    (tmp_path / "views.csv").write_text("\n".join(lines[:3] + ["x.png,p9,Axial,0"] + lines[3:]) + "\n")
    for views in ("all", "frontal"):
        proc = module("records", *source, "--views", views, "--out", tmp_path / "axial")
        assert_one_line_error(proc, "views.csv: 'view': 'Axial' (row 4) neither frontal")
    assert not (tmp_path / "axial" / records.MANIFEST).exists()


@pytest.mark.slow
def test_a_corrupt_dicom_is_rejected_with_its_reason_and_raw_format_refuses_dicom(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    write_dicom(images / "good.dcm", np.zeros((8, 8), np.int64), 12)
    (images / "bad.dcm").write_bytes(b"\0" * 200)
    (tmp_path / "own.csv").write_text("path,patient,Edema\ngood.dcm,1,1\nbad.dcm,2,0\n")
    source = ["--dataset", "csv", "--csv", tmp_path / "own.csv", "--images", images]
    module("records", *source, "--out", tmp_path / "r", "--fractions", 1, 0, 0, "--workers", 1,
           "--no-progress", check=True)
    rejects = pd.read_csv(tmp_path / "r" / records.REJECTS)
    assert rejects["image"].tolist() == ["bad.dcm"] and "unreadable image" in rejects["reason"][0]
    assert_one_line_error(module("records", *source, "--out", tmp_path / "raw", "--format", "raw"),
                          "DICOM needs --format tfrecord")
    # the raw pipeline's decoders cannot read a CMYK JPEG: rejected when the index is written
    Image.new("CMYK", (8, 8)).save(images / "cmyk.jpg")
    Image.new("L", (8, 8)).save(images / "grey.jpg")
    Image.new("L", (8, 8)).save(images / "grey.tif")
    (tmp_path / "raw.csv").write_text("path,patient,Edema\ncmyk.jpg,1,1\ngrey.jpg,2,0\ngrey.tif,3,0\n")
    module("records", "--dataset", "csv", "--csv", tmp_path / "raw.csv", "--images", images, "--out",
           tmp_path / "raw", "--format", "raw", "--fractions", 1, 0, 0, check=True)
    rejects = pd.read_csv(tmp_path / "raw" / records.REJECTS)
    reasons = dict(zip(rejects["image"], rejects["reason"], strict=True))
    assert sorted(reasons) == ["cmyk.jpg", "grey.tif"]
    assert "JPEG CMYK" in reasons["cmyk.jpg"] and "TIFF L" in reasons["grey.tif"]


# Hand-picked rows of the real CSVs (../shared/data/real/README.md lists the NIH images):
# 00000100_000.png: Atelectasis|Effusion|Infiltration, NIH patient 100, an RGBA PNG.
# CheXpert valid.csv row 2, patient64541/study1/view1_frontal.jpg: Enlarged Cardiomediastinum,
# Cardiomegaly and Lung Opacity 1.0, every other observation 0.0.
NIH_ROW = "00000100_000.png"


@pytest.mark.slow
@needs_real
def test_merged_nih_and_chexpert_records_keep_sources_and_mask_what_a_source_lacks(tmp_path):
    """README's merge story as written (official splits, U-Ignore, all observations, frontal),
    scaled down: the 121 real NIH images, CheXpert's first 300 training rows and valid.csv."""
    (tmp_path / "nih").mkdir()
    nih = pd.read_csv(REAL / "nih" / "Data_Entry_2017.csv", dtype=str, index_col=False)
    names = sorted(p.name for p in (REAL / "images" / "nih").glob("*.png"))
    nih[nih["Image Index"].isin(names)].to_csv(tmp_path / "nih" / "Data_Entry_2017.csv", index=False)
    for name in ("train_val_list.txt", "test_list.txt"):  # --split official reads them beside the CSV
        shutil.copy(REAL / "nih" / name, tmp_path / "nih" / name)
    train = pd.read_csv(REAL / "chexpert" / "train_sample.csv", dtype=str, keep_default_na=False).head(300)
    valid = pd.read_csv(REAL / "chexpert" / "valid.csv", dtype=str)
    train.to_csv(tmp_path / "train.csv", index=False)
    valid.to_csv(tmp_path / "valid.csv", index=False)
    for i, rel in enumerate([*train["Path"], *valid["Path"]]):  # no CheXpert images ship: stand-ins
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(gray((48, 40), i)).save(tmp_path / rel, quality=90)
    out = tmp_path / "records"
    module("records", "--dataset", "nih", "chexpert", "--csv", tmp_path / "nih" / "Data_Entry_2017.csv",
           tmp_path / "train.csv", "--images", REAL / "images" / "nih", tmp_path, "--observations", "all",
           "--uncertainty", "ignore", "--views", "frontal", "--split", "official", "--image-size", 32,
           "--encoding", "uint8", "--out", out, "--no-progress", check=True, timeout=900)
    manifest = records.load_manifest(out)
    assert manifest["classes"] == list(labels.CANONICAL)  # NIH's 14, then CheXpert's other 7
    frontal = int((train["Frontal/Lateral"] == "Frontal").sum()) + 202
    assert [(s["name"], s["listed"]) for s in manifest["sources"]] == [("nih", 121), ("chexpert", frontal)]
    assert manifest["dataset"] == "nih+chexpert" and manifest["rejected"] == 0
    rows = {}
    for split in manifest["splits"]:
        for raw in tf.data.TFRecordDataset([str(out / s["file"]) for s in manifest["splits"][split]["shards"]]):
            ex = records.parse_example(raw, manifest["num_classes"], "uint8")
            rows[ex["image/id"].numpy().decode()] = {
                "split": split, "patient": ex["patient/id"].numpy().decode(), "source": ex["source"].numpy().decode(),
                "label": dict(zip(manifest["classes"], ex["label"].numpy().tolist(), strict=True)),
                "mask": dict(zip(manifest["classes"], ex["mask"].numpy().tolist(), strict=True))}
    # official splits: NIH's test list is test, CheXpert's valid.csv is test
    test_list = set((REAL / "nih" / "test_list.txt").read_text().split())
    assert all((r["split"] == "test") == (i[4:] in test_list) for i, r in rows.items() if i.startswith("nih/"))
    assert {r["split"] for i, r in rows.items() if "/valid/" in i} == {"test"}
    assert "test" not in {r["split"] for i, r in rows.items() if "/train/" in i}
    assert len(rows) == 121 + frontal
    nih_only = set(labels.PATHOLOGIES) - {"Atelectasis", "Cardiomegaly", "Effusion", "Pneumonia",
                                           "Pneumothorax", "Consolidation", "Edema"}
    chexpert_only = set(labels.CANONICAL) - set(labels.PATHOLOGIES)
    row = rows["nih/" + NIH_ROW]
    assert (row["source"], row["patient"]) == ("nih", "nih/100")
    assert {n for n, v in row["label"].items() if v} == {"Atelectasis", "Effusion", "Infiltration"}
    assert {n for n, v in row["mask"].items() if not v} == chexpert_only  # not negatives: unknown
    cx = valid.iloc[0]
    row = rows["chexpert/" + cx["Path"]]
    assert (row["source"], row["patient"]) == ("chexpert", "chexpert/64541")
    assert {n for n, v in row["mask"].items() if not v} == nih_only
    positive = {labels.canonical(c) for c in labels.CHEXPERT_OBSERVATIONS if cx[c] == "1.0"}
    assert {n for n, v in row["label"].items() if v} == positive
    assert positive == {"Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity"}
    # U-Ignore: row 2 of the training sample, patient00002/study2: its -1.0 cells are masked too
    uncertain = train.iloc[1]
    row = rows["chexpert/" + uncertain["Path"]]
    masked = {labels.canonical(c) for c in labels.CHEXPERT_OBSERVATIONS if uncertain[c] == "-1.0"}
    assert masked == {"Cardiomegaly", "Edema", "Consolidation", "Atelectasis", "Effusion"}
    assert {n for n, v in row["mask"].items() if not v} == masked | nih_only
    assert {n for n, v in row["label"].items() if v} == {"Lung Opacity", "Fracture"}
    # class weights count labelled entries only: NIH's rows for Infiltration, CheXpert's for
    # Lung Opacity, no masked row as a negative
    counts = manifest["splits"]["train"]
    for name, source in (("Infiltration", "nih"), ("Lung Opacity", "chexpert")):
        labelled = [r for r in rows.values() if r["split"] == "train" and r["mask"][name]]
        assert {r["source"] for r in labelled} == {source}
        assert counts["positives"][name] + counts["negatives"][name] == len(labelled) < counts["count"]
    # trained and evaluated end to end: the masks reach the loss and the metrics (the recipe's
    # --crop takes 28-px windows of the 32-px records)
    run_dir = tmp_path / "run"
    module("train", "--recipe", "chexnet", "--data", out, "--run-dir", run_dir, "--model", "small_cnn",
           "--weights", "none", "--image-size", 28, "--batch-size", 8, "--epochs", 1, "--verbose", 0,
           check=True, timeout=900)
    assert read_runlog(run_dir)[-1]["status"] == "completed"
    report = tmp_path / "eval"
    module("evaluate", "--data", out, "--checkpoint", run_dir / "checkpoints" / "best", "--out", report,
           "--bootstrap", 20, check=True, timeout=600)
    classes = json.loads((report / "report.json").read_text())["classes"]
    assert [r["pathology"] for r in classes] == list(labels.CANONICAL)


@pytest.mark.slow
def test_hospital_dicoms_story_records_train_evaluate(tmp_path):
    """README's hospital story, scaled down: 36 generated DICOMs of 12 patients (MONOCHROME1 and
    2, a lateral view each), the CSV's own split, a mapped and a dropped column."""
    images = tmp_path / "dicoms"
    images.mkdir()
    rows = []
    rng = np.random.default_rng(0)
    for p in range(12):
        split = ["train"] * 8 + ["val", "val", "test", "test"]
        for k, view in enumerate(["PA", "AP", "LL"]):
            name = f"{p:03d}_{k}.dcm"
            finding = (p + k) % 2
            stored = rng.integers(0, 1024, (40, 40)) + 2048 * finding  # a brighter image if positive
            write_dicom(images / name, stored, 12, photometric="MONOCHROME1" if p % 3 == 0 else "MONOCHROME2")
            rows.append([name, f"H{p:04d}", view, split[p], finding, 1 - finding, 40 + p])
    pd.DataFrame(rows, columns=["path", "patient", "view", "split", "Pneumothorax", "Lungs", "Age"]).to_csv(
        tmp_path / "hospital.csv", index=False)
    out, run_dir = tmp_path / "hospital", tmp_path / "run"
    module("records", "--dataset", "csv", "--csv", tmp_path / "hospital.csv", "--images", images,
           "--split", "official", "--views", "frontal", "--label-map", "Lungs=Lung Opacity", "Age=",
           "--image-size", 32, "--encoding", "uint8", "--out", out, "--no-progress", check=True)
    manifest = records.load_manifest(out)
    assert manifest["classes"] == ["Pneumothorax", "Lung Opacity"]
    assert {s: v["count"] for s, v in manifest["splits"].items()} == {"train": 16, "val": 4, "test": 4}
    module("train", "--recipe", "chexnet", "--data", out, "--run-dir", run_dir, "--model", "small_cnn",
           "--weights", "none", "--image-size", 28, "--batch-size", 4, "--epochs", 1, "--verbose", 0,
           check=True, timeout=900)
    module("evaluate", "--checkpoint", run_dir / "checkpoints" / "best", "--data", out, "--out",
           tmp_path / "eval", "--bootstrap", 20, check=True, timeout=600)
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert report["n"] == 4 and [c["positives"] for c in report["classes"]] == [2, 2]


@pytest.mark.slow
def test_predict_reads_dicoms_and_refuses_a_broken_one(trained_cnn, tmp_path):
    ckpt = trained_cnn / "run" / "checkpoints" / "best"
    write_dicom(tmp_path / "a.dcm", gray((80, 64), 7).astype(np.int64) * 16, 12, photometric="MONOCHROME1")
    proc = module("predict", tmp_path, "--checkpoint", ckpt, "--format", "json", check=True)
    [row] = json.loads(proc.stdout)
    assert row["file"].endswith("a.dcm") and all(0 <= row[p] <= 1 for p in labels.PATHOLOGIES)
    (tmp_path / "b.dcm").write_bytes(b"\0" * 64)
    assert_one_line_error(module("predict", tmp_path / "b.dcm", "--checkpoint", ckpt), "b.dcm",
                          "not a readable image")
