"""One dataset's metadata CSV -> a table (image, path, patient, labels, mask): a reader per
format (NIH, CheXpert, your own layout), the view codes each uses, and the table's columns.

The table has columns `image`, `path`, `patient`, `split`, `view` (frontal, lateral, or blank
when not given), then one label column per class (`y:<name>`, canonical names,
chexnet_hvd.labels) and one mask column (`m:<name>`; 0 = label unknown, left out of the loss).
Several sources merged, split and leak-checked into one table: chexnet_hvd.sources.
"""

from __future__ import annotations

import contextlib
import csv as csvlib  # `csv` names the CSV paths below
import hashlib
import re
from pathlib import Path

import numpy as np
import pandas as pd

from chexnet_hvd.cli import InputError
from chexnet_hvd.labels import (
    CHEXPERT_COMPETITION,
    CHEXPERT_OBSERVATIONS,
    PATHOLOGIES,
    UnknownLabelError,
    canonical,
    in_canonical_order,
    is_known,
    label_cells,
    parse_finding_labels,
    parse_uncertainty,
    unknown_findings,
)

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
    with open(path, newline="", encoding="utf-8", errors="replace") as fh:
        rows = csvlib.reader(fh)
        next(rows, None)
        first = None
        for line, row in enumerate(rows, 2):
            if not row:
                continue
            first = first or len(row)
            if len(row) < first:
                return line, len(row), first
    return None


VIEWS = ("all", "frontal", "lateral")
# View codes -> frontal / lateral, compared blind to case, spaces, "_" and "-": NIH's View Position
# (PA, AP), CheXpert's Frontal/Lateral and AP/PA (PA, AP, LL, RL), MIMIC-CXR's ViewPosition (PA, AP,
# LATERAL, LL), PadChest's Projection (PA, AP, AP_horizontal, L) and ViewPosition_DICOM
# (POSTEROANTERIOR, ANTEROPOSTERIOR, LATERAL), DICOM ViewPosition terms and hospital exports'
# spellings. Anything else (Axial, oblique, decubitus, a CT) is an error, whatever --views is.
VIEW_KINDS = {
    **dict.fromkeys(("frontal", "pa", "ap", "ap supine", "ap horizontal", "pa horizontal",
                     "posteroanterior", "postero anterior", "anteroposterior", "antero posterior"),
                    "frontal"),
    **dict.fromkeys(("lateral", "lat", "l", "ll", "rl", "left lateral", "right lateral",
                     "xtable lateral"), "lateral"),
}
VIEW_COLUMNS = {"nih": "View Position", "chexpert": "Frontal/Lateral", "csv": "view"}


def view_kinds(frame: pd.DataFrame, column: str, csv) -> pd.Series:
    """Each row's view as frontal or lateral ("" where the cell is blank or there is no view
    column); every unknown code is named, with its rows, in one error."""
    if column not in frame.columns:
        return pd.Series("", index=frame.index)
    codes = frame[column]
    kinds = codes.map(lambda c: VIEW_KINDS.get(" ".join(c.replace("_", " ").replace("-", " ").split()).casefold(),
                                               None if c.strip() else ""))
    bad = codes[kinds.isna()]
    if len(bad):
        rows = bad.groupby(bad, sort=False).groups
        known = {kind: ", ".join(k for k, v in VIEW_KINDS.items() if v == kind) for kind in ("frontal", "lateral")}
        raise InputError(csv, f"{column!r}: " + first_few([f"{c!r} ({rows_text(i)})" for c, i in rows.items()])
                         + f" neither frontal ({known['frontal']}) nor lateral ({known['lateral']}): drop "
                         "such rows from the CSV")
    return kinds


def keep_views(table: pd.DataFrame, views: str, csv, column: str) -> tuple[pd.DataFrame, int]:
    """The rows whose view is a `views` view (all: every row), and how many were dropped."""
    if views == "all":
        return table, 0
    blank = table["view"] == ""
    if blank.any():
        raise InputError(csv, f"--views {views} needs a view in every row ({column!r} column): "
                         f"{int(blank.sum())} of {len(table)} rows have none, e.g. "
                         f"{table['image'][blank].iloc[0]!r}")
    kept = table[(table["view"] == views).to_numpy()].reset_index(drop=True)
    if kept.empty:
        raise InputError(csv, f"no {views} images (--views {views})")
    return kept, len(table) - len(kept)


def first_few(items: list[str], limit: int = 5) -> str:
    """The first few of a list of offenders for an error message, and how many there are."""
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def rows_text(rows) -> str:
    """CSV line numbers (header = 1) of 0-based data rows: 'row 7' or 'rows 7, 9'."""
    rows = [int(r) + 2 for r in rows]
    return f"row{'s' if len(rows) > 1 else ''} {first_few(list(map(str, rows)), 3)}"


def check_unique(csv, images: pd.Series) -> None:
    """Every image listed once; all that are not are named in one error."""
    twice = images[images.duplicated(keep=False)]
    if len(twice):
        rows = twice.groupby(twice, sort=False).groups  # image -> its row indices, in CSV order
        raise InputError(csv, f"{len(rows)} image{'s' if len(rows) > 1 else ''} listed twice or more: "
                         + first_few([f"{name!r} ({rows_text(index)})" for name, index in rows.items()]))


def read_nih(csv: str | Path, images_dir: str | Path) -> pd.DataFrame:
    """Read Data_Entry_2017.csv (2017 release with trailing comma, or the v2020 revision)."""
    wanted = NIH_REQUIRED + (VIEW_COLUMNS["nih"],)  # of its 11 columns (the full CSV: 8x fewer cells)
    frame = read_csv_checked(csv, NIH_REQUIRED, filled=NIH_REQUIRED, usecols=lambda c: c in wanted)
    if frame.empty:
        raise InputError(csv, "no data rows")
    check_unique(csv, frame["Image Index"])
    unknown: dict[str, list[int]] = {}  # every unknown name with its rows, in one error
    for i, text in enumerate(frame["Finding Labels"]):
        for name in unknown_findings(text):
            unknown.setdefault(name, []).append(i)
    if unknown:
        raise InputError(csv, f"unknown patholog{'ies' if len(unknown) > 1 else 'y'} in 'Finding "
                         f"Labels': " + first_few([f"{n!r} ({rows_text(r)})" for n, r in unknown.items()]))
    labels = np.stack([parse_finding_labels(text) for text in frame["Finding Labels"]])
    # '00000001' (2017) and '1' (v2020) name the same patient.
    patients = frame["Patient ID"].str.strip().str.lstrip("0").replace("", "0")
    table = pd.DataFrame({
        "image": frame["Image Index"].str.strip(),
        "path": [str(Path(images_dir) / name.strip()) for name in frame["Image Index"]],
        "patient": patients,
        "split": "",
        "view": view_kinds(frame, VIEW_COLUMNS["nih"], csv),
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


@contextlib.contextmanager
def label_errors(where):
    """A label name, cell, policy or map item the suite cannot take, as a one-line InputError."""
    try:
        yield
    except UnknownLabelError as err:
        raise InputError(where, str(err)) from None


def cell_labels(csv, frame: pd.DataFrame, columns: list[str], names: tuple[str, ...],
                uncertainty: str, blank: str, mapping: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The label cells of `columns` (canonical `names`) under the uncertainty policy per class."""
    with label_errors(csv):
        policies = list(parse_uncertainty(uncertainty, names, mapping).values())
        return label_cells(frame[columns].to_numpy(), policies, blank)


def read_chexpert(csv: str | Path, images_dir: str | Path, observations: str = "competition",
                  uncertainty: str = "ones") -> pd.DataFrame:
    """CheXpert train.csv / valid.csv: the 5 competition pathologies or all 14 observations under
    their canonical names, uncertain labels by `uncertainty` (ones / zeros / ignore = masked,
    or per class), blanks negative, patient from the path (`.../patient00001/study1/...`)."""
    columns = CHEXPERT_COMPETITION if observations == "competition" else CHEXPERT_OBSERVATIONS
    frame = read_csv_checked(csv, CHEXPERT_REQUIRED + columns, filled=CHEXPERT_REQUIRED,
                             usecols=lambda c: c in CHEXPERT_REQUIRED + columns)
    if frame.empty:
        raise InputError(csv, "no data rows")
    paths = frame["Path"].str.strip()
    patients = paths.str.extract(CHEXPERT_PATIENT, expand=False)
    if patients.isna().any():
        raise InputError(csv, f"row {int(patients.isna().idxmax()) + 2}: no patientNNNNN in path "
                         f"{paths[patients.isna()].iloc[0]!r}")
    check_unique(csv, paths)
    by_name = {canonical(c): c for c in columns}
    names = in_canonical_order(by_name)
    labels, mask = cell_labels(csv, frame, [by_name[n] for n in names], names, uncertainty, "negative")
    table = pd.DataFrame({
        "image": paths,
        "path": [chexpert_image_path(images_dir, p) for p in paths],
        "patient": patients.str.lstrip("0").replace("", "0"),
        "split": "",
        "view": view_kinds(frame, VIEW_COLUMNS["chexpert"], csv),
    })
    return attach_labels(table, labels, mask, names)


# The generic layout for your own data: these columns, then one column per label.
GENERIC_REQUIRED = ("path", "patient")
GENERIC_OPTIONAL = ("view", "split")


def read_generic(csv: str | Path, images_dir: str | Path, uncertainty: str = "ones",
                 label_map: dict | None = None) -> pd.DataFrame:
    """Your own data: columns `path` (relative to --images, or absolute), `patient`, optional
    `view` (PA/AP/frontal, LL/lateral) and `split` (train/val/test: --split official uses it),
    and every other column a label named by a canonical name, an alias or --label-map, with
    cells 1 (positive), 0 (negative), -1 (uncertain: --uncertainty) or blank (not annotated:
    masked out of the loss and the metrics)."""
    frame = read_csv_checked(csv, GENERIC_REQUIRED, filled=GENERIC_REQUIRED)
    if frame.empty:
        raise InputError(csv, "no data rows")
    check_unique(csv, frame["path"].str.strip())
    columns = [c for c in frame.columns if c not in GENERIC_REQUIRED + GENERIC_OPTIONAL]
    if len(unknown := [c for c in columns if not is_known(c, label_map)]) > 1:  # one: canonical's error
        raise InputError(csv, f"{len(unknown)} label columns are not canonical labels: "
                         f"{first_few([repr(c.strip()) for c in unknown])}; map each with --label-map "
                         "'NAME=<canonical name>' (or 'NAME=' to leave it out)")
    by_name: dict[str, str] = {}
    for column in columns:
        with label_errors(csv):
            name = canonical(column, label_map)
        if name in by_name:
            raise InputError(csv, f"columns {by_name[name]!r} and {column!r} are both {name!r}")
        if name:
            by_name[name] = column
    if not by_name:
        raise InputError(csv, "no label columns (every column but path, patient, view and split "
                         "is a label)")
    names = in_canonical_order(by_name)
    labels, mask = cell_labels(csv, frame, [by_name[n] for n in names], names, uncertainty, "masked",
                               label_map)
    paths = frame["path"].str.strip()
    table = pd.DataFrame({
        "image": paths,
        "path": [str(Path(images_dir) / p) for p in paths],  # an absolute p stays itself
        "patient": frame["patient"].str.strip(),
        "split": frame["split"].str.strip() if "split" in frame.columns else "",
        "view": view_kinds(frame, VIEW_COLUMNS["csv"], csv),
    })
    return attach_labels(table, labels, mask, names)


def attach_labels(table: pd.DataFrame, labels: np.ndarray, mask: np.ndarray,
                  names: tuple[str, ...]) -> pd.DataFrame:
    """Add the y:/m: columns for `names` to a table."""
    y = pd.DataFrame(labels, columns=label_columns(names), index=table.index)
    m = pd.DataFrame(mask, columns=mask_columns(names), index=table.index)
    return pd.concat([table, y, m], axis=1)
