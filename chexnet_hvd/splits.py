"""Patient-level splits of an image table into train, val and test: seeded random fractions of
patients, NIH's official lists, CheXpert's official validation set, and the leak guard that
refuses a patient in two splits. Pure functions over `chexnet_hvd.metadata` tables
(chexnet_hvd.sources applies them)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from chexnet_hvd.cli import InputError

SPLITS = ("train", "val", "test")
DEFAULT_FRACTIONS = (0.7, 0.1, 0.2)


def random_split(table: pd.DataFrame, fractions: tuple[float, ...] = DEFAULT_FRACTIONS,
                 seed: int = 0) -> pd.DataFrame:
    """Seeded patient-level split into train/val/test by the given fractions of patients. The
    result shares the table's other columns (no copy): copy it before writing into them."""
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise InputError("--fractions", f"need three non-negative fractions summing to 1, got {fractions}")
    patients = np.array(sorted(table["patient"].unique()))
    order = np.random.default_rng(seed).permutation(len(patients))
    cuts = np.round(np.cumsum(fractions)[:2] * len(patients)).astype(int)
    assignment = {}
    for name, part in zip(SPLITS, np.split(patients[order], cuts), strict=True):
        assignment.update(dict.fromkeys(part, name))
    out = table.copy(deep=False)  # shares every column but the new split (a whole column set
    out["split"] = out["patient"].map(assignment)  # is a new array, never written in place)
    return out


def official_split(table: pd.DataFrame, train_val_list: str | Path, test_list: str | Path,
                   val_fraction: float = 0.1, seed: int = 0) -> pd.DataFrame:
    """NIH's train_val_list.txt / test_list.txt; validation carved from train_val by patient."""
    names = {}
    for split, path in (("train_val", train_val_list), ("test", test_list)):
        if not Path(path).is_file():
            raise InputError(path, "no such file")
        names.update(dict.fromkeys(Path(path).read_text().split(), split))
    out = table.copy(deep=False)
    out["split"] = out["image"].map(names)
    unlisted = out["split"].isna()
    if unlisted.any():
        raise InputError(train_val_list, f"{int(unlisted.sum())} images in the CSV are in neither "
                         f"list, e.g. {out['image'][unlisted].iloc[0]!r}")
    train_val = out["split"] == "train_val"
    carved = random_split(out.loc[train_val, ["patient"]], (1 - val_fraction, val_fraction, 0.0), seed)
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
