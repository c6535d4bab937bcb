"""Metadata CSVs -> one table (image, path, patient, labels, mask), patient-level splits, leak guard.

The table has columns `image`, `path`, `patient`, `split`, then one label column per class
(`y:<name>`) and one mask column (`m:<name>`; 0 = label unknown, left out of the loss).
`load_table(TableConfig)` is the one way the records writer, the raw-image pipeline and
tools/dataset_stats.py turn a dataset's CSV into a split, leak-checked table.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from pathlib import Path

import numpy as np
import pandas as pd

from chexnet_hvd import cli
from chexnet_hvd.cli import InputError
from chexnet_hvd.labels import (
    CHEXPERT_COMPETITION,
    CHEXPERT_OBSERVATIONS,
    PATHOLOGIES,
    UNCERTAINTY_POLICIES,
    UnknownLabelError,
    chexpert_labels,
    parse_finding_labels,
)

SPLITS = ("train", "val", "test")
DEFAULT_FRACTIONS = (0.7, 0.1, 0.2)
NIH_REQUIRED = ("Image Index", "Finding Labels", "Patient ID")


def label_columns(names: tuple[str, ...]) -> list[str]:
    return [f"y:{n}" for n in names]


def mask_columns(names: tuple[str, ...]) -> list[str]:
    return [f"m:{n}" for n in names]


def class_names(table: pd.DataFrame) -> tuple[str, ...]:
    """The class names a table carries, in column order."""
    return tuple(c[2:] for c in table.columns if c.startswith("y:"))


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_csv_checked(path: str | Path, required: tuple[str, ...], filled: tuple[str, ...] = (),
                     **kwargs) -> pd.DataFrame:
    """pandas.read_csv with the suite's errors: missing file, unreadable CSV, missing columns,
    short (truncated) rows, and an empty cell in a `filled` column."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "no such file")
    try:
        frame = pd.read_csv(path, index_col=False, dtype=str, keep_default_na=False, **kwargs)
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as err:
        raise InputError(path, f"not a readable CSV ({str(err).splitlines()[0]})") from None
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise InputError(path, f"missing column {missing[0]!r}")
    short = short_row(path)  # pandas pads short rows: a truncated file would pass unnoticed
    if short:
        raise InputError(path, f"row {short[0]} has {short[1]} fields, the rows before it "
                         f"{short[2]} (a truncated or malformed file)")
    for column in filled:
        empty = frame.index[frame[column].str.strip() == ""]
        if len(empty):
            raise InputError(path, f"row {empty[0] + 2}: no {column!r}")
    return frame


def short_row(path: Path) -> tuple[int, int, int] | None:
    """(line, fields, fields of the first data row) of the first data row with fewer fields
    than the first one, or None. (NIH's 2017 header has one field more than its rows.)"""
    import csv

    with open(path, newline="", encoding="utf-8", errors="replace") as fh:
        rows = csv.reader(fh)
        next(rows, None)
        first = None
        for line, row in enumerate(rows, 2):
            if not row:
                continue
            first = first or len(row)
            if len(row) < first:
                return line, len(row), first
    return None


def read_nih(csv: str | Path, images_dir: str | Path) -> pd.DataFrame:
    """Read Data_Entry_2017.csv (2017 release with trailing comma, or the v2020 revision)."""
    frame = read_csv_checked(csv, NIH_REQUIRED, filled=NIH_REQUIRED)
    if frame.empty:
        raise InputError(csv, "no data rows")
    duplicated = frame["Image Index"].duplicated()
    if duplicated.any():
        raise InputError(csv, f"image {frame['Image Index'][duplicated].iloc[0]!r} listed twice")
    labels = np.zeros((len(frame), len(PATHOLOGIES)), dtype=np.float32)
    for i, text in enumerate(frame["Finding Labels"]):
        try:
            labels[i] = parse_finding_labels(text)
        except UnknownLabelError as err:
            raise InputError(csv, f"row {i + 2}: {err}") from None
    # '00000001' (2017) and '1' (v2020) name the same patient.
    patients = frame["Patient ID"].str.strip().str.lstrip("0").replace("", "0")
    table = pd.DataFrame({
        "image": frame["Image Index"].str.strip(),
        "path": [str(Path(images_dir) / name.strip()) for name in frame["Image Index"]],
        "patient": patients,
        "split": "",
    })
    return attach_labels(table, labels, np.ones_like(labels), PATHOLOGIES)


CHEXPERT_REQUIRED = ("Path", "Frontal/Lateral")
CHEXPERT_PATIENT = re.compile(r"patient(\d+)")


def chexpert_image_path(images_dir: str | Path, rel: str) -> str:
    """CSV paths start with the dataset folder ('CheXpert-v1.0-small/train/...'): accept --images
    as that folder or as its parent."""
    images_dir = Path(images_dir)
    head, _, tail = rel.partition("/")
    return str(images_dir / tail if images_dir.name == head and tail else images_dir / rel)


def read_chexpert(csv: str | Path, images_dir: str | Path, observations: str = "competition",
                  uncertainty: str = "ones", frontal_only: bool = False) -> pd.DataFrame:
    """CheXpert train.csv / valid.csv: the 5 competition pathologies or all 14 observations,
    uncertain labels by `uncertainty` (ones / zeros / ignore = masked), blanks negative,
    patient from the path (`.../patient00001/study1/view1_frontal.jpg`)."""
    names = CHEXPERT_COMPETITION if observations == "competition" else CHEXPERT_OBSERVATIONS
    frame = read_csv_checked(csv, CHEXPERT_REQUIRED + names, filled=CHEXPERT_REQUIRED)
    if frame.empty:
        raise InputError(csv, "no data rows")
    if frontal_only:
        frame = frame[frame["Frontal/Lateral"].str.strip() == "Frontal"].reset_index(drop=True)
    paths = frame["Path"].str.strip()
    patients = paths.str.extract(CHEXPERT_PATIENT, expand=False)
    if patients.isna().any():
        raise InputError(csv, f"row {int(patients.isna().idxmax()) + 2}: no patientNNNNN in path "
                         f"{paths[patients.isna()].iloc[0]!r}")
    if paths.duplicated().any():
        raise InputError(csv, f"image {paths[paths.duplicated()].iloc[0]!r} listed twice")
    try:
        labels, mask = chexpert_labels(frame[list(names)].to_numpy(), uncertainty)
    except UnknownLabelError as err:
        raise InputError(csv, str(err)) from None
    table = pd.DataFrame({
        "image": paths,
        "path": [chexpert_image_path(images_dir, p) for p in paths],
        "patient": patients.str.lstrip("0").replace("", "0"),
        "split": "",
    })
    return attach_labels(table, labels, mask, names)


def attach_labels(table: pd.DataFrame, labels: np.ndarray, mask: np.ndarray,
                  names: tuple[str, ...]) -> pd.DataFrame:
    """Add the y:/m: columns for `names` to a table."""
    y = pd.DataFrame(labels, columns=label_columns(names), index=table.index)
    m = pd.DataFrame(mask, columns=mask_columns(names), index=table.index)
    return pd.concat([table, y, m], axis=1)


def random_split(table: pd.DataFrame, fractions: tuple[float, ...] = DEFAULT_FRACTIONS,
                 seed: int = 0) -> pd.DataFrame:
    """Seeded patient-level split into train/val/test by the given fractions of patients."""
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise InputError("--fractions", f"need three non-negative fractions summing to 1, got {fractions}")
    patients = np.array(sorted(table["patient"].unique()))
    order = np.random.default_rng(seed).permutation(len(patients))
    cuts = np.round(np.cumsum(fractions)[:2] * len(patients)).astype(int)
    assignment = {}
    for name, part in zip(SPLITS, np.split(patients[order], cuts), strict=True):
        assignment.update(dict.fromkeys(part, name))
    out = table.copy()
    out["split"] = out["patient"].map(assignment)
    return out


def official_split(table: pd.DataFrame, train_val_list: str | Path, test_list: str | Path,
                   val_fraction: float = 0.1, seed: int = 0) -> pd.DataFrame:
    """NIH's train_val_list.txt / test_list.txt; validation carved from train_val by patient."""
    names = {}
    for split, path in (("train_val", train_val_list), ("test", test_list)):
        if not Path(path).is_file():
            raise InputError(path, "no such file")
        names.update(dict.fromkeys(Path(path).read_text().split(), split))
    out = table.copy()
    out["split"] = out["image"].map(names)
    unlisted = out["split"].isna()
    if unlisted.any():
        raise InputError(train_val_list, f"{int(unlisted.sum())} images in the CSV are in neither "
                         f"list, e.g. {out['image'][unlisted].iloc[0]!r}")
    train_val = out["split"] == "train_val"
    carved = random_split(out[train_val], (1 - val_fraction, val_fraction, 0.0), seed)
    out.loc[train_val, "split"] = carved["split"]
    return out


def check_no_leak(table: pd.DataFrame) -> None:
    """Leak guard: refuse any split in which one patient appears in two sets."""
    per_patient = table.groupby("patient")["split"].nunique()
    leaked = per_patient[per_patient > 1]
    if len(leaked):
        raise InputError("split", f"{len(leaked)} patients are in more than one split "
                         f"(e.g. patient {leaked.index[0]}); refusing to write a leaking split")


def chexpert_official_split(train: pd.DataFrame, valid: pd.DataFrame, val_fraction: float = 0.1,
                            seed: int = 0) -> pd.DataFrame:
    """CheXpert's valid.csv (radiologist-labelled) becomes the test split; validation is carved
    from train.csv by patient."""
    carved = random_split(train, (1 - val_fraction, val_fraction, 0.0), seed)
    return pd.concat([carved, valid.assign(split="test")], ignore_index=True)


@dataclasses.dataclass(kw_only=True)
class TableConfig:
    """How a dataset's CSV becomes a split table (shared by the records writer, the raw-image
    pipeline and dataset_stats)."""

    csv: str = cli.field(help="metadata CSV: NIH Data_Entry_2017.csv (or v2020) or CheXpert train.csv")
    images: str = cli.field(".", help="directory holding the images the CSV lists (CheXpert: the "
                            "CheXpert-v1.0-small folder or its parent)")
    dataset: str = cli.field("nih", help="metadata format", choices=["nih", "chexpert"])
    split: str = cli.field("random", help="random: seeded patient-level split by --fractions; "
                           "official: NIH train_val_list.txt/test_list.txt, or CheXpert valid.csv "
                           "as test, beside the CSV (val carved from the rest by patient)",
                           choices=["random", "official"])
    fractions: list[float] = cli.field(list(DEFAULT_FRACTIONS),
                                       help="train/val/test fractions of patients (official: "
                                       "only the val fraction is used)")
    seed: int = cli.field(0, help="seed of the split (and of the records' shard order)")
    observations: str = cli.field("competition", help="CheXpert: the 5 competition pathologies or "
                                  "all 14 observations", choices=["competition", "all"])
    uncertainty: str = cli.field("ones", help="CheXpert: uncertain (-1) labels become positive, "
                                 "negative, or masked out of loss and metrics",
                                 choices=list(UNCERTAINTY_POLICIES))
    frontal_only: bool = cli.field(False, help="CheXpert: keep frontal views only")


def load_table(cfg: TableConfig) -> pd.DataFrame:
    """The dataset's table with its split assigned and leak-checked."""
    if cfg.dataset == "chexpert":
        def read(csv):
            return read_chexpert(csv, cfg.images, cfg.observations, cfg.uncertainty, cfg.frontal_only)

        table = read(cfg.csv)
        if cfg.split == "official":
            valid = read(Path(cfg.csv).parent / "valid.csv")
            table = chexpert_official_split(table, valid, cfg.fractions[1], cfg.seed)
    else:
        table = read_nih(cfg.csv, cfg.images)
        if cfg.split == "official":
            here = Path(cfg.csv).parent
            table = official_split(table, here / "train_val_list.txt", here / "test_list.txt",
                                   cfg.fractions[1], cfg.seed)
    if cfg.split != "official":
        table = random_split(table, tuple(cfg.fractions), cfg.seed)
    check_no_leak(table)
    return table


def prevalence(table: pd.DataFrame) -> pd.DataFrame:
    """Per-split images, patients and percent positive per class (masked labels left out): the
    shape of the CheXNet-DDP report's dataset table."""
    names = class_names(table)
    columns = {}
    for split in [s for s in SPLITS if (table["split"] == s).any()] + ["all"]:
        part = table if split == "all" else table[table["split"] == split]
        y = part[label_columns(names)].to_numpy()
        m = part[mask_columns(names)].to_numpy()
        percent = 100 * (y * m).sum(0) / np.maximum(m.sum(0), 1)
        columns[split] = [len(part), part["patient"].nunique(), *percent.round(2)]
    return pd.DataFrame(columns, index=["images", "patients", *names])
