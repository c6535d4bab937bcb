"""Metadata CSVs -> one table (image, path, patient, labels, mask), patient-level splits, leak guard.

The table has columns `image`, `path`, `patient`, `split`, then one label column per class
(`y:<name>`) and one mask column (`m:<name>`; 0 = label unknown, left out of the loss).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd

from chexnet_hvd.cli import InputError
from chexnet_hvd.labels import PATHOLOGIES, UnknownLabelError, parse_finding_labels

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


def read_csv_checked(path: str | Path, required: tuple[str, ...], **kwargs) -> pd.DataFrame:
    """pandas.read_csv with the suite's errors: missing file, unreadable CSV, missing columns."""
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
    return frame


def read_nih(csv: str | Path, images_dir: str | Path) -> pd.DataFrame:
    """Read Data_Entry_2017.csv (2017 release with trailing comma, or the v2020 revision)."""
    frame = read_csv_checked(csv, NIH_REQUIRED)
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
