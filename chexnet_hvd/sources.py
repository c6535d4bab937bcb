"""One or several sources' CSVs -> one split, leak-checked table: `load(TableConfig)` (or
`load_table` for the table alone) is the one way the records writer, the raw-image pipeline and
tools/dataset_stats.py read their inputs. Each source is read by its format's reader
(chexnet_hvd.metadata), its views filtered, its own split kept under --split official; the
sources merge over the union of their classes (a `source` column says whose each row is), and
the split is drawn by patient (chexnet_hvd.splits).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd

from chexnet_hvd import cli
from chexnet_hvd.cli import InputError
from chexnet_hvd.labels import in_canonical_order, parse_label_map, uncertainty_rules
from chexnet_hvd.metadata import (
    VIEW_COLUMNS,
    VIEWS,
    class_names,
    first_few,
    keep_views,
    label_columns,
    label_errors,
    mask_columns,
    read_chexpert,
    read_generic,
    read_nih,
)
from chexnet_hvd.splits import (
    DEFAULT_FRACTIONS,
    SPLITS,
    check_no_leak,
    chexpert_official_split,
    official_split,
    random_split,
)

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
    if len(tables) == 1:  # one source: its table (already in canonical order), shared, not copied
        [((source, _), table)] = tables.items()
        out = table.copy(deep=False)
        out.insert(out.columns.get_loc("view") + 1, "source", source)
        return out
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
    dropped = {name: n for (name, _), (_, n) in loaded.items()}
    table = merge({key: table for key, (table, _) in loaded.items()})
    del loaded  # the sources' own tables: the merged one alone is kept
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
    return Listing(table, dropped)


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
