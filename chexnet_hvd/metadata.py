"""Metadata CSVs -> one table (image, path, patient, labels, mask), split by patient (the splits
themselves: chexnet_hvd.splits).

The table has columns `image`, `path`, `patient`, `split`, `view` (frontal, lateral, or blank
when not given), `source`, then one label column per class (`y:<name>`, canonical names,
chexnet_hvd.labels) and one mask column (`m:<name>`; 0 = label unknown, left out of the loss).
`load(TableConfig)` (or `load_table` for the table alone) is the one way the records writer, the
raw-image pipeline and tools/dataset_stats.py turn one or several sources' CSVs (NIH, CheXpert,
your own layout) into one split, leak-checked table.
"""

from __future__ import annotations

import contextlib
import csv as csvlib  # `csv` names the CSV paths below
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
    UnknownLabelError,
    canonical,
    in_canonical_order,
    is_known,
    label_cells,
    parse_finding_labels,
    parse_label_map,
    parse_uncertainty,
    uncertainty_rules,
    unknown_findings,
)
from chexnet_hvd.splits import (
    DEFAULT_FRACTIONS,
    SPLITS,
    check_no_leak,
    chexpert_official_split,
    official_split,
    random_split,
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
    frame = read_csv_checked(csv, NIH_REQUIRED, filled=NIH_REQUIRED)
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
    frame = read_csv_checked(csv, CHEXPERT_REQUIRED + columns, filled=CHEXPERT_REQUIRED)
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


DATASETS = ("nih", "chexpert", "csv")


@dataclasses.dataclass(kw_only=True)
class TableConfig:
    """How datasets' CSVs become one split table (shared by the records writer, the raw-image
    pipeline and dataset_stats). Several --dataset/--csv/--images (one of each per source) merge."""

    csv: list[str] = cli.field(help="metadata CSV per source: NIH Data_Entry_2017.csv (or v2020), "
                               "CheXpert train.csv, or your own CSV (--dataset csv)")
    images: list[str] = cli.field(["."], help="per source, the directory holding the images its "
                                  "CSV lists (CheXpert: the CheXpert-v1.0-small folder or its parent)")
    dataset: list[str] = cli.field(["nih"], help="metadata format per source; several merge into "
                                   "one records set (each record keeps its source; labels a "
                                   "source does not annotate are masked)", choices=list(DATASETS))
    split: str = cli.field("random", help="random: seeded patient-level split by --fractions; "
                           "official: each source's own split (NIH train_val_list.txt/"
                           "test_list.txt, CheXpert valid.csv as test, beside the CSV; val carved "
                           "from the rest by patient; your CSV's split column)",
                           choices=["random", "official"])
    fractions: list[float] = cli.field(list(DEFAULT_FRACTIONS),
                                       help="train/val/test fractions of patients (official: "
                                       "only the val fraction is used)", minimum=0, maximum=1)
    seed: int = cli.field(0, help="seed of the split (and of the records' shard order)", minimum=0)
    observations: str = cli.field("competition", help="CheXpert: the 5 competition pathologies or "
                                  "all 14 observations", choices=["competition", "all"])
    uncertainty: str = cli.field("ones", help="uncertain (-1) labels become positive (ones), "
                                 "negative (zeros) or masked out of loss and metrics (ignore); "
                                 "per class as e.g. 'zeros,Atelectasis=ones,Edema=ones'")
    views: str = cli.field("all", help="keep frontal or lateral images only, by the CSV's view "
                           "column (NIH: View Position; CheXpert: Frontal/Lateral; own CSV: view)",
                           choices=list(VIEWS))
    label_map: list[str] = cli.field([], help="own CSV: 'Their Name=Canonical Name' for a label "
                                     "column with another name, 'Their Name=' to leave it out")

    def __post_init__(self):
        # One source may be given as plain strings (Python callers); the CLI gives lists.
        for name in ("csv", "images", "dataset"):
            if isinstance(getattr(self, name), str):
                setattr(self, name, [getattr(self, name)])


def sources(cfg: TableConfig) -> list[tuple[str, str, str, str]]:
    """(name, dataset, csv, images) per source; names are the datasets', numbered when repeated."""
    n = len(cfg.csv)
    images = cfg.images * n if len(cfg.images) == 1 else cfg.images
    datasets = cfg.dataset * n if len(cfg.dataset) == 1 else cfg.dataset
    if len(images) != n or len(datasets) != n:
        raise InputError("--dataset/--csv/--images", f"{len(cfg.dataset)} datasets, {n} CSVs and "
                         f"{len(cfg.images)} image directories: give one of each per source")
    for dataset in datasets:
        if dataset not in DATASETS:
            raise InputError("--dataset", f"unknown dataset {dataset!r} (known: {', '.join(DATASETS)})")
    names = [d if datasets.count(d) == 1 else f"{d}-{datasets[:i + 1].count(d)}"
             for i, d in enumerate(datasets)]
    return list(zip(names, datasets, cfg.csv, images, strict=True))


def check_split_column(table: pd.DataFrame, csv) -> None:
    """Your CSV's split column holds train, val or test in every row."""
    if (table["split"] == "").all():
        raise InputError(csv, "no split column: --split official needs one (or use --split random)")
    bad = ~table["split"].isin(SPLITS)
    if bad.any():
        raise InputError(csv, f"row {int(bad.to_numpy().argmax()) + 2}: split "
                         f"{table['split'][bad].iloc[0]!r} is not train, val or test "
                         "(--split official reads the split column)")


def label_map(cfg: TableConfig) -> dict[str, str | None]:
    with label_errors("--label-map"):
        return parse_label_map(cfg.label_map)


def load_source(dataset: str, csv: str, images: str, cfg: TableConfig) -> tuple[pd.DataFrame, int]:
    """One source's table, with its own split assigned under --split official, and the number
    of rows --views left out (filtered before any split, so a split is drawn over kept rows)."""
    official = cfg.split == "official"
    dropped = 0

    def kept(table: pd.DataFrame, path) -> pd.DataFrame:
        nonlocal dropped
        table, n = keep_views(table, cfg.views, path, VIEW_COLUMNS[dataset])
        dropped += n
        return table

    if dataset == "chexpert":
        def read(path):
            return kept(read_chexpert(path, images, cfg.observations, cfg.uncertainty), path)

        table = read(csv)
        if official:
            table = chexpert_official_split(table, read(Path(csv).parent / "valid.csv"),
                                            cfg.fractions[1], cfg.seed)
    elif dataset == "csv":
        table = kept(read_generic(csv, images, cfg.uncertainty, label_map(cfg)), csv)
        if official:
            check_split_column(table, csv)
        elif (table["split"] != "").any():  # a split the user wrote is never overridden silently
            raise InputError(csv, "has a split column: pass --split official to use it (or drop "
                             "the column for a random patient-level split)")
    else:
        table = kept(read_nih(csv, images), csv)
        if official:
            here = Path(csv).parent
            table = official_split(table, here / "train_val_list.txt", here / "test_list.txt",
                                   cfg.fractions[1], cfg.seed)
    return table, dropped


def merge(tables: dict[tuple[str, str], pd.DataFrame]) -> pd.DataFrame:
    """(source name, dataset) -> table, merged into one table over the union of their classes
    (canonical order). A class a source does not annotate is masked (label 0, mask 0) for its
    rows, never a negative. When merging, image ids get the source's name as a prefix and
    patient ids the dataset's ('nih/1'): NIH's patient 1 is not CheXpert's, while two CSVs of
    one hospital share their patients (and the leak guard sees them)."""
    names = in_canonical_order(n for t in tables.values() for n in class_names(t))
    parts = []
    for (source, dataset), table in tables.items():
        part = table[["image", "path", "patient", "split", "view"]].copy()
        if len(tables) > 1:
            part["image"] = source + "/" + part["image"]
            part["patient"] = dataset + "/" + part["patient"]
        part["source"] = source
        labels = table.reindex(columns=label_columns(names), fill_value=0.0)  # absent: masked
        mask = table.reindex(columns=mask_columns(names), fill_value=0.0)
        parts.append(pd.concat([part, labels, mask], axis=1))
    return pd.concat(parts, ignore_index=True)


@dataclasses.dataclass
class Listing:
    """The sources' merged, split and leak-checked table, and per source the rows --views left
    out (not in the table)."""

    table: pd.DataFrame
    dropped_by_views: dict[str, int]


def load(cfg: TableConfig) -> Listing:
    """The sources' merged table with its split assigned and leak-checked."""
    loaded = {(name, dataset): load_source(dataset, csv, images, cfg)
              for name, dataset, csv, images in sources(cfg)}
    table = merge({key: table for key, (table, _) in loaded.items()})
    twice = table.loc[table["path"].duplicated(), "path"].unique()
    if len(twice):
        more = f" ({len(twice)} images are: {first_few([repr(p) for p in twice])})" if len(twice) > 1 else ""
        raise InputError(twice[0], f"listed by two sources{more}")
    with label_errors("--uncertainty"):
        _, rules = uncertainty_rules(cfg.uncertainty, label_map(cfg))
    if missing := sorted(set(rules) - set(class_names(table))):  # a typo is not silently ignored
        raise InputError("--uncertainty", f"no class {missing[0]!r} in these records (classes: "
                         f"{', '.join(class_names(table))})")
    if cfg.split != "official":
        table = random_split(table, tuple(cfg.fractions), cfg.seed)
    check_no_leak(table)
    return Listing(table, {name: dropped for (name, _), (_, dropped) in loaded.items()})


def load_table(cfg: TableConfig) -> pd.DataFrame:
    """`load`'s table."""
    return load(cfg).table


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
